"""The exo-rkllama lab stand-in answers and fails like the fork (jfreed-dev/exo-rkllama at HEAD).

exo runs as a subprocess (Python >= 3.12, as the fork needs) in front of a running rkllama
stand-in, both on free 127.0.0.1 ports.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_standin_rkllama import QWEN, Server, call, free_port, make_lab  # noqa: E402  pylint: disable=wrong-import-position

EXO = Path(__file__).resolve().parents[2] / "lab" / "stand-ins" / "exo"


def _python312():
    """A Python >= 3.12 that really runs (pyenv shims exist for versions that are not selected)."""
    for cand in (sys.executable, shutil.which("python3.13"), shutil.which("python3.12"),
                 "/root/.pyenv/versions/3.12.1/bin/python3", "/root/.pyenv/versions/3.13.0/bin/python3"):
        if cand and os.access(cand, os.X_OK) and subprocess.run(
                [cand, "-c", "import sys; sys.exit(sys.version_info < (3, 12))"], capture_output=True, check=False).returncode == 0:
            return cand
    return None


PY312 = _python312()
pytestmark = pytest.mark.skipif(PY312 is None, reason="the exo stand-in needs Python >= 3.12 (as the fork); none found")
HI = {"model": "qwen2.5-1.5b-instruct-rkllm", "messages": [{"role": "user", "content": "hi"}]}
METRICS = ("exo_requests_total", "exo_requests_in_progress", "exo_tokens_generated_total", "exo_request_duration_seconds",
           "exo_first_token_latency_seconds", "exo_tokens_per_second", "rkllm_server_up",
           "rkllm_inference_duration_seconds", "rkllm_model_load_duration_seconds")


class Exo:
    def __init__(self, tmp, rkllama_port, src=EXO, extra=None):
        cfg = tmp / "discovery.json"
        cfg.write_text(json.dumps({"peers": {"n1": {"address": "127.0.0.1", "port": 5678, "device_capabilities": {
            "model": "m", "chip": "c", "memory": 0, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}}}}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = extra if extra is not None else [
            "--inference-engine", "rkllm", "--disable-tui", "--discovery-module", "manual",
            "--discovery-config-path", str(cfg), "--node-id", "n1", "--chatgpt-api-port", str(self.port)]
        self.proc = subprocess.Popen([PY312, "-m", "exo.main", *args], cwd=src,
                                     env=dict(os.environ, RKLLM_SERVER_HOST="127.0.0.1", RKLLM_SERVER_PORT=str(rkllama_port)),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.up = False
        for _ in range(200):
            if self.proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(self.url + "/healthcheck", timeout=1).close()
                self.up = True
                break
            except OSError:
                time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate()[0].decode(errors="replace")


def metric(text, name):
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
    return float(values[0]) if values else None


@pytest.fixture()
def stack(tmp_path):
    make_lab(tmp_path)
    rk = Server(tmp_path)
    assert rk.up, rk.stop()
    exo = Exo(tmp_path, rk.port)
    assert exo.up, exo.stop()
    yield rk, exo
    exo.stop()
    rk.stop()


def test_healthcheck_models_and_node_header(stack):
    _, exo = stack
    code, text, headers = call(exo.url, "/healthcheck")
    assert code == 200 and json.loads(text) == {"status": "ok"} and headers["X-Exo-Node-Id"] == "n1"
    ids = [m["id"] for m in json.loads(call(exo.url, "/v1/models")[1])["data"]]
    assert "qwen2.5-1.5b-instruct-rkllm" in ids and "deepseek-r1-1.5b-rkllm" in ids


def test_metrics_names_and_what_is_not_set(stack):
    _, exo = stack
    code, text, headers = call(exo.url, "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    for name in METRICS:
        assert f"# TYPE {name} " in text
    # Only a model load sets rkllm_server_up (a scrape does not); exo_tokens_per_second is never set.
    assert metric(text, "rkllm_server_up") == 0 and metric(text, "exo_tokens_per_second") is None
    assert call(exo.url, "/v1/chat/completions", HI)[0] == 200
    text = call(exo.url, "/metrics")[1]
    assert metric(text, "rkllm_server_up") == 1 and metric(text, "exo_tokens_per_second") is None
    assert 'exo_requests_total{model="qwen2.5-1.5b-instruct-rkllm",status="success"} 1' in text


def test_plain_completion_through_rkllama(stack):
    rk, exo = stack
    code, text, headers = call(exo.url, "/v1/chat/completions", HI)
    answer = json.loads(text)
    plain = json.loads(call(rk.url, "/generate", {"messages": HI["messages"]})[1])["choices"][0]["content"]
    assert code == 200 and headers["X-Exo-Node-Id"] == "n1" and answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": plain}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert set(answer["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_stream_ends_like_the_fork(stack):
    _, exo = stack
    code, text, headers = call(exo.url, "/v1/chat/completions", dict(HI, stream=True))
    events = [e for e in text.split("\n\n") if e]
    assert code == 200 and headers["Content-Type"] == "text/event-stream"
    assert all(e.startswith("data: {") for e in events)  # no `data: [DONE]`
    parts = [json.loads(e[len("data: "):]) for e in events]
    assert [p["choices"][0]["finish_reason"] for p in parts] == [None] * (len(parts) - 1) + ["stop"]
    assert all("usage" not in p for p in parts)  # no final usage chunk
    content = "".join(p["choices"][0]["delta"]["content"] for p in parts)
    assert content == json.loads(call(exo.url, "/v1/chat/completions", HI)[1])["choices"][0]["message"]["content"]


def test_model_ids_map_to_rkllama_dirs(stack):
    rk, exo = stack
    assert call(exo.url, "/v1/chat/completions", HI)[0] == 200
    assert json.loads(call(rk.url, "/current_model")[1]) == {"model_name": QWEN}
    code, _, _ = call(exo.url, "/v1/chat/completions", dict(HI, model="deepseek-r1-1.5b-rkllm"))
    assert code == 200 and json.loads(call(rk.url, "/current_model")[1]) == {"model_name": "DeepSeek-R1-1.5B"}
    # An unknown model id is answered by the default model, not refused.
    code, text, _ = call(exo.url, "/v1/chat/completions", dict(HI, model="no-such-model"))
    assert code == 200 and json.loads(text)["model"] == "qwen2.5-1.5b-instruct-rkllm"
    assert json.loads(call(rk.url, "/current_model")[1]) == {"model_name": QWEN}


def test_rkllama_restart_gives_empty_answers(stack, tmp_path):
    rk, exo = stack
    assert json.loads(call(exo.url, "/v1/chat/completions", HI)[1])["choices"][0]["message"]["content"]
    rk.stop()
    # rkllama down after a load: the engine checks nothing more, so 200 with no text, and
    # rkllm_server_up keeps the 1 of the last load.
    code, text, _ = call(exo.url, "/v1/chat/completions", HI)
    assert code == 200 and json.loads(text)["choices"][0]["message"]["content"] == ""
    assert metric(call(exo.url, "/metrics")[1], "rkllm_server_up") == 1
    again = Server(tmp_path, port=rk.port)  # same port, no model loaded
    try:
        assert again.up
        code, text, _ = call(exo.url, "/v1/chat/completions", HI)
        assert code == 200 and json.loads(text)["choices"][0]["message"]["content"] == ""
        assert call(again.url, "/current_model")[0] == 404  # exo did not notice and did not reload
    finally:
        again.stop()


def test_rkllama_down_before_the_first_load_is_a_500(tmp_path):
    exo = Exo(tmp_path, free_port())
    try:
        assert exo.up
        code, text, _ = call(exo.url, "/v1/chat/completions", HI)
        assert code == 500 and "RKLLM server not available at http://127.0.0.1:" in json.loads(text)["detail"]
        assert metric(call(exo.url, "/metrics")[1], "rkllm_server_up") == 0
    finally:
        exo.stop()


def test_lab_build_bad_answers(tmp_path):
    src = tmp_path / "exo-src"
    shutil.copytree(EXO, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (src / "lab_build.json").write_text(json.dumps({"version": "v-broken", "fault": "bad_answers"}))
    exo = Exo(tmp_path, free_port(), src=src)
    try:
        assert exo.up and call(exo.url, "/healthcheck")[0] == 200
        assert call(exo.url, "/v1/chat/completions", HI)[0] == 500
    finally:
        exo.stop()


def test_lab_build_no_start(tmp_path):
    src = tmp_path / "exo-src"
    shutil.copytree(EXO, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (src / "lab_build.json").write_text(json.dumps({"version": "v-broken", "fault": "no_start"}))
    exo = Exo(tmp_path, free_port(), src=src)
    log = exo.stop()
    assert not exo.up and exo.proc.returncode != 0 and "does not start" in log


def test_unknown_flag_is_refused(tmp_path):
    exo = Exo(tmp_path, free_port(), extra=["--disable-tui", "--no-such-flag"])
    log = exo.stop()
    assert not exo.up and exo.proc.returncode == 2 and "unrecognized arguments: --no-such-flag" in log


def test_manual_discovery_needs_a_config_path(tmp_path):
    exo = Exo(tmp_path, free_port(), extra=["--disable-tui", "--discovery-module", "manual", "--chatgpt-api-port", str(free_port())])
    log = exo.stop()
    assert not exo.up and exo.proc.returncode != 0 and "--discovery-config-path is required" in log
