"""The exo-rkllama lab stand-in answers and fails like the fork (jfreed-dev/exo-rkllama at 0c831d3).

exo runs as a subprocess (Python >= 3.12, as the fork needs). The API, model-id and lab-build tests
put it in front of the rkllama stand-in; the timing, concurrency and metric tests put it in front
of FakeRkllama (below), an rkllama that streams a script of tokens with exact gaps and records what
exo sent it, so each behaviour of exo is seen on its own. "Patched" runs use a copy of the stand-in
with the lab patches (lab/stand-ins/patches/exo) applied by `git apply`, as the role applies them.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_standin_rkllama import QWEN, Server, call, free_port, make_lab  # noqa: E402  pylint: disable=wrong-import-position

ROOT = Path(__file__).resolve().parents[2]
EXO = ROOT / "lab" / "stand-ins" / "exo"
LAB_PATCHES = ROOT / "lab" / "stand-ins" / "patches" / "exo"
FORK_PATCHES = ROOT / "roles" / "exo" / "files" / "patches" / "0c831d39a0c42772aa68df9bacd6af8c8bd3cd84"


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
QWEN_ID = "qwen2.5-1.5b-instruct-rkllm"
DEEPSEEK_ID = "deepseek-r1-1.5b-rkllm"
HI = {"model": QWEN_ID, "messages": [{"role": "user", "content": "hi"}]}
SUPPORTED = ("['qwen2.5-1.5b-rkllm', 'qwen2.5-1.5b-instruct-rkllm', 'qwen2.5-3b-rkllm', 'qwen2.5-7b-rkllm', "
             "'deepseek-r1-1.5b-rkllm', 'phi-3-mini-rkllm']")
METRICS = ("exo_requests_total", "exo_requests_in_progress", "exo_tokens_generated_total", "exo_request_duration_seconds",
           "exo_first_token_latency_seconds", "exo_tokens_per_second", "rkllm_server_up",
           "rkllm_inference_duration_seconds", "rkllm_model_load_duration_seconds")


def patched_src(tmp, names=None):
    """A copy of the stand-in with the lab patches (all, or those named) applied as the role does."""
    src = tmp / "exo-patched"
    shutil.copytree(EXO, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    patches = sorted(LAB_PATCHES.glob("*.patch"))
    patches = [p for p in patches if names is None or p.name in names]
    assert patches
    subprocess.run(["git", "apply", *map(str, patches)], cwd=src, check=True)
    return src


class Exo:
    def __init__(self, tmp, rkllama_port, src=EXO, extra=None, default_model=None, env=None):
        cfg = tmp / "discovery.json"
        cfg.write_text(json.dumps({"peers": {"n1": {"address": "127.0.0.1", "port": 5678, "device_capabilities": {
            "model": "m", "chip": "c", "memory": 0, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}}}}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = extra if extra is not None else [
            "--inference-engine", "rkllm", "--disable-tui", "--discovery-module", "manual",
            "--discovery-config-path", str(cfg), "--node-id", "n1", "--chatgpt-api-port", str(self.port)]
        if default_model:
            args = args + ["--default-model", default_model]
        self.proc = subprocess.Popen([PY312, "-m", "exo.main", *args], cwd=src,
                                     env=dict(os.environ, RKLLM_SERVER_HOST="127.0.0.1", RKLLM_SERVER_PORT=str(rkllama_port),
                                              **(env or {})),
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

    def metrics(self):
        return call(self.url, "/metrics")[1]


def metric(text, name):
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
    return float(values[0]) if values else None


def events(text):
    return [json.loads(e[len("data: "):]) for e in text.split("\n\n") if e.strip()]


def timed_stream(url, body, timeout=30):
    """Send a streamed completion on a raw socket; (seconds to the response's first byte, status, events)."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    data = json.dumps(dict(body, stream=True)).encode()
    start = time.time()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data))
        first = sock.recv(1)
        first_at = time.time() - start
        raw = first
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            raw += piece
    head, _, body_raw = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    text, rest = b"", body_raw
    while rest:  # de-chunk
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        text, rest = text + rest[:size], rest[size + 2:]
    return first_at, status, events(text.decode())


def content(parts, key="delta"):
    return "".join(p["choices"][0][key]["content"] for p in parts)


# --- FakeRkllama: rkllama's old API with scripted timing ----------------------------------------

class FakeRkllama:
    """GET / , /current_model, /models; POST /load_model, /unload_model, /generate.

    /generate sends `tokens`, each after its gap in `gaps` (seconds; a long gap is DeepSeek "thinking":
    rkllama sends nothing meanwhile), as rkllama does: plain => one JSON at the end; streamed => one
    JSON chunk per token followed by a blank line, finish_reason null, end = the connection's end.
    It records every /generate body and the most generations it ran at once.
    """

    def __init__(self, tokens, gaps):
        self.tokens, self.gaps = tokens, gaps
        self.loaded = None
        self.generates = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def _json(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # pylint: disable=invalid-name
                if self.path == "/":
                    self._json(200, {"message": "Welcome to RKLLama !"})
                elif self.path == "/models":
                    self._json(200, {"models": [QWEN, "DeepSeek-R1-1.5B"]})
                elif fake.loaded:
                    self._json(200, {"model_name": fake.loaded})
                else:
                    self._json(404, {"error": "No models are currently loaded."})

            def do_POST(self):  # pylint: disable=invalid-name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path == "/load_model":
                    fake.loaded = body["model_name"]
                    self._json(200, {"message": "loaded"})
                elif self.path == "/unload_model":
                    fake.loaded = None
                    self._json(200, {"message": "unloaded"})
                else:
                    fake.generate(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def generate(self, handler, body):
        with self.lock:
            self.generates.append(body)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if not body.get("stream"):
                time.sleep(sum(self.gaps))
                handler._json(200, {"choices": [{"role": "assistant", "content": "".join(self.tokens), "finish_reason": "stop"}]})
                return
            handler.send_response(200)
            handler.send_header("Content-Type", "text/plain")
            handler.end_headers()
            for token, gap in zip(self.tokens, self.gaps):
                time.sleep(gap)
                chunk = {"choices": [{"role": "assistant", "content": token, "finish_reason": None}]}
                handler.wfile.write(json.dumps(chunk).encode() + b"\n\n")
                handler.wfile.flush()
        except OSError:
            pass
        finally:
            with self.lock:
                self.active -= 1

    def close(self):
        self.server.shutdown()
        self.server.server_close()


TOKENS = ["<think>", " Let", " me", " think", ".", "</think>", " The", " answer", " is", " 42", "."]
ANSWER = "".join(TOKENS)
# exo re-encodes a plain answer with its tokenizer; the stand-in's splits it into word pieces.
PIECES = re.findall(r"\s*\S+|\s+", ANSWER)


@pytest.fixture()
def fake():
    # 50 ms between tokens (an RK3588 gives DeepSeek-R1-1.5B about 15 tokens/s: 66 ms), and a 0.5 s
    # silence after the first token while the model "thinks".
    srv = FakeRkllama(TOKENS, [0.05, 0.5] + [0.05] * (len(TOKENS) - 2))
    yield srv
    srv.close()


def start(tmp_path, fake_srv, **kwargs):
    exo = Exo(tmp_path, fake_srv.port, **kwargs)
    assert exo.up, exo.stop()
    return exo


# --- the fork's API, with the rkllama stand-in -----------------------------------------------

@pytest.fixture()
def stack(tmp_path):
    make_lab(tmp_path)
    rk = Server(tmp_path)
    assert rk.up, rk.stop()
    exo = Exo(tmp_path, rk.port, default_model=QWEN_ID)
    assert exo.up, exo.stop()
    yield rk, exo
    exo.stop()
    rk.stop()


def test_healthcheck_models_and_no_node_header(stack):
    _, exo = stack
    code, text, headers = call(exo.url, "/healthcheck")
    assert code == 200 and json.loads(text) == {"status": "ok"}
    # chatgpt_api.py never sets a node header: the gateway's X-Rkllm-Board is the only board name a client sees.
    assert "X-Exo-Node-Id" not in headers
    assert "X-Exo-Node-Id" not in call(exo.url, "/v1/chat/completions", HI)[2]
    ids = [m["id"] for m in json.loads(call(exo.url, "/v1/models")[1])["data"]]
    assert QWEN_ID in ids and DEEPSEEK_ID in ids and "llama-3.2-1b" in ids  # every model card, as the fork lists them


def test_metrics_names_buckets_and_server_up_before_the_first_load(stack):
    _, exo = stack
    code, text, headers = call(exo.url, "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    for name in METRICS:
        assert f"# TYPE {name} " in text
    # rkllm_server_up is unlabelled and 0 from exo's start until the first model load (an idle,
    # healthy board reads 0); exo_tokens_per_second is never set.
    assert "rkllm_server_up 0" in text.splitlines() and metric(text, "exo_tokens_per_second") is None
    # The fork's highest finite buckets: inference 30 s, first token 60 s, request 300 s.
    for name, top, absent in (("rkllm_inference_duration_seconds", "30.0", "60.0"),
                              ("exo_first_token_latency_seconds", "60.0", "120.0"),
                              ("exo_request_duration_seconds", "300.0", "600.0")):
        assert f'{name}_bucket{{le="{top}"}}' in text and f'{name}_bucket{{le="{absent}"}}' not in text
    assert call(exo.url, "/v1/chat/completions", HI)[0] == 200
    # exo counts a request after its answer went out (chatgpt_api.py's finally): wait for the count.
    wanted, deadline = f'exo_requests_total{{model="{QWEN_ID}",status="success"}} 1', time.monotonic() + 5
    while wanted not in exo.metrics() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = exo.metrics()
    assert "rkllm_server_up 1" in text.splitlines() and metric(text, "exo_tokens_per_second") is None
    assert wanted in text


def test_plain_completion_through_rkllama(stack):
    rk, exo = stack
    code, text, _ = call(exo.url, "/v1/chat/completions", HI)
    answer = json.loads(text)
    plain = json.loads(call(rk.url, "/generate", {"messages": HI["messages"]})[1])["choices"][0]["content"]
    assert code == 200 and answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": plain}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert set(answer["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_stream_ends_like_the_fork(stack):
    _, exo = stack
    code, text, headers = call(exo.url, "/v1/chat/completions", dict(HI, stream=True))
    parts = events(text)
    assert code == 200 and headers["Content-Type"] == "text/event-stream"
    assert all(e.startswith("data: {") for e in text.split("\n\n") if e)  # no `data: [DONE]`
    assert [p["choices"][0]["finish_reason"] for p in parts] == [None] * (len(parts) - 1) + ["stop"]
    assert all("usage" not in p for p in parts)  # no final usage chunk
    assert content(parts) == json.loads(call(exo.url, "/v1/chat/completions", HI)[1])["choices"][0]["message"]["content"]


def test_model_ids_map_to_rkllama_dirs(stack):
    rk, exo = stack
    assert call(exo.url, "/v1/chat/completions", HI)[0] == 200
    assert json.loads(call(rk.url, "/current_model")[1]) == {"model_name": QWEN}
    code, _, _ = call(exo.url, "/v1/chat/completions", dict(HI, model=DEEPSEEK_ID), timeout=60)
    assert code == 200 and json.loads(call(rk.url, "/current_model")[1]) == {"model_name": "DeepSeek-R1-1.5B"}
    # An unknown model id (and any gpt-*) is the default model, here set with --default-model.
    code, text, _ = call(exo.url, "/v1/chat/completions", dict(HI, model="no-such-model"))
    assert code == 200 and json.loads(text)["model"] == QWEN_ID
    assert json.loads(call(rk.url, "/current_model")[1]) == {"model_name": QWEN}


def _loads(exo):
    return metric(exo.metrics(), "rkllm_model_load_duration_seconds_count")


def test_every_model_switch_is_counted_as_a_load(stack):
    rk, exo = stack
    assert _loads(exo) == 0
    # The first request after exo starts counts one, even when rkllama already holds the model
    # (ensure_shard observes after load_model, which returns at once: rkllm_engine.py:549-553).
    assert call(rk.url, "/load_model", {"model_name": QWEN})[0] == 200
    assert call(exo.url, "/v1/chat/completions", HI)[0] == 200
    assert _loads(exo) == 1
    assert call(exo.url, "/v1/chat/completions", HI)[0] == 200
    assert _loads(exo) == 1
    assert call(exo.url, "/v1/chat/completions", dict(HI, model=DEEPSEEK_ID), timeout=60)[0] == 200
    assert call(exo.url, "/v1/chat/completions", HI)[0] == 200
    assert _loads(exo) == 3


def test_a_swap_behind_exos_back_answers_the_model_exo_remembers_with_the_loaded_one(stack, tmp_path):
    # site.yml's model check puts the board's model back in rkllama; exo's engine still remembers the
    # client's model (rkllm_engine.py:495-497) and skips the load for a request for it.
    rk, exo = stack
    assert call(exo.url, "/v1/chat/completions", dict(HI, model=DEEPSEEK_ID), timeout=60)[0] == 200
    assert call(rk.url, "/unload_model", {})[0] == 200 and call(rk.url, "/load_model", {"model_name": QWEN})[0] == 200
    code, text, _ = call(exo.url, "/v1/chat/completions", dict(HI, model=DEEPSEEK_ID), timeout=60)
    assert code == 200 and json.loads(text)["model"] == DEEPSEEK_ID
    assert json.loads(call(rk.url, "/current_model")[1]) == {"model_name": QWEN}  # answered by Qwen
    # A fresh exo (what the rkllama role's restart after a swap gives) loads what the request names.
    fresh = Exo(tmp_path, rk.port, default_model=QWEN_ID)
    try:
        assert fresh.up
        assert call(fresh.url, "/v1/chat/completions", dict(HI, model=DEEPSEEK_ID), timeout=60)[0] == 200
        assert json.loads(call(rk.url, "/current_model")[1]) == {"model_name": "DeepSeek-R1-1.5B"}
    finally:
        fresh.stop()


def test_rkllama_restart_gives_empty_answers(stack, tmp_path):
    rk, exo = stack
    assert json.loads(call(exo.url, "/v1/chat/completions", HI)[1])["choices"][0]["message"]["content"]
    rk.stop()
    # rkllama down after a load: the engine checks nothing more, so 200 with no text, and
    # rkllm_server_up keeps the 1 of the last load.
    code, text, _ = call(exo.url, "/v1/chat/completions", HI)
    assert code == 200 and json.loads(text)["choices"][0]["message"]["content"] == ""
    assert metric(exo.metrics(), "rkllm_server_up") == 1
    again = Server(tmp_path, port=rk.port)  # same port, no model loaded
    try:
        assert again.up
        code, text, _ = call(exo.url, "/v1/chat/completions", HI)
        assert code == 200 and json.loads(text)["choices"][0]["message"]["content"] == ""
        assert call(again.url, "/current_model")[0] == 404  # exo did not notice and did not reload
    finally:
        again.stop()


def test_rkllama_down_before_the_first_load_is_a_500(tmp_path):
    exo = Exo(tmp_path, free_port(), default_model=QWEN_ID)
    try:
        assert exo.up
        code, text, _ = call(exo.url, "/v1/chat/completions", HI)
        assert code == 500 and "RKLLM server not available at http://127.0.0.1:" in json.loads(text)["detail"]
        assert metric(exo.metrics(), "rkllm_server_up") == 0
    finally:
        exo.stop()


# --- default model (chatgpt_api.py:203,346-361) ------------------------------------------------

@pytest.mark.parametrize("model", [None, "gpt-4o-mini", "no-such-model", "llama-3.2-1b"])
def test_without_default_model_missing_gpt_and_unknown_ids_get_400(tmp_path, fake, model):
    exo = start(tmp_path, fake)
    try:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        if model:
            body["model"] = model
        for stream in (False, True):
            code, text, _ = call(exo.url, "/v1/chat/completions", dict(body, stream=stream))
            assert code == 400, text
            assert json.loads(text) == {"detail": "Unsupported model: llama-3.2-1b with inference engine RKLLMInferenceEngine. "
                                                  f"Supported models for this engine: {SUPPORTED}"}
        assert fake.generates == []
        # exo counts a request after its answer went out (chatgpt_api.py's finally): wait for the count.
        wanted = 'exo_requests_total{model="llama-3.2-1b",status="error"} 2'
        deadline = time.monotonic() + 5
        while wanted not in exo.metrics() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert wanted in exo.metrics()
    finally:
        exo.stop()


@pytest.mark.parametrize("model", [None, "gpt-4o-mini", "no-such-model"])
def test_with_default_model_they_are_served_by_it(tmp_path, fake, model):
    exo = start(tmp_path, fake, default_model=QWEN_ID)
    try:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        if model:
            body["model"] = model
        code, text, _ = call(exo.url, "/v1/chat/completions", body)
        assert code == 200 and json.loads(text)["model"] == QWEN_ID
        assert json.loads(text)["choices"][0]["message"]["content"] == ANSWER and fake.loaded == QWEN
    finally:
        exo.stop()


# --- plain models: generated whole, then replayed (rkllm_engine.py:284-313) ---------------------

def test_plain_model_first_token_only_after_the_whole_generation(tmp_path, fake):
    exo = start(tmp_path, fake, default_model=QWEN_ID)
    try:
        generation = sum(fake.gaps)  # 1 s
        first_at, status, parts = timed_stream(exo.url, HI)
        assert status == 200 and content(parts) == ANSWER
        # Streamed to the client, but rkllama was asked with stream: false: nothing (not even the
        # headers) reaches the client before the whole generation is done.
        assert fake.generates[-1]["stream"] is False
        assert first_at >= generation * 0.9, first_at
        # replayed one token (a word piece for the stand-in's tokenizer) per event, then the EOS event
        assert len(parts) == len(PIECES) + 1
    finally:
        exo.stop()


def test_plain_generation_longer_than_the_client_timeout_is_cut(tmp_path, fake):
    # The fork's ClientTimeout(total=300) (rkllm_http_client.py:22,47); the lab lowers it to 0.6 s here.
    exo = start(tmp_path, fake, default_model=QWEN_ID, env={"RKLLM_LAB_EXO_CLIENT_TIMEOUT": "0.6"})
    try:
        code, text, _ = call(exo.url, "/v1/chat/completions", HI)
        assert code == 200 and json.loads(text)["choices"][0]["message"]["content"] == ""
    finally:
        exo.stop()


def test_the_client_timeout_is_the_forks_300_s_unless_the_lab_sets_it(monkeypatch):
    sys.path.insert(0, str(EXO))
    try:
        from exo import rkllm_engine  # pylint: disable=import-outside-toplevel
        monkeypatch.delenv("RKLLM_LAB_EXO_CLIENT_TIMEOUT", raising=False)
        assert rkllm_engine.client_timeout() == 300.0
    finally:
        sys.path.remove(str(EXO))
        sys.modules.pop("exo.rkllm_engine", None)
        sys.modules.pop("exo.metrics", None)
        sys.modules.pop("exo", None)


# --- DeepSeek: streamed from rkllama (rkllm_engine.py:315-458) ---------------------------------

DS = {"model": DEEPSEEK_ID, "messages": [{"role": "user", "content": "hi"}]}


def test_deepseek_answer_is_cut_at_the_first_pause_unpatched(tmp_path, fake):
    exo = start(tmp_path, fake)
    try:
        for stream in (True, False):
            code, text, _ = call(exo.url, "/v1/chat/completions", dict(DS, stream=stream))
            assert code == 200
            parts = events(text) if stream else [json.loads(text)]
            got = content(parts, "delta" if stream else "message")
            # The engine gives up after one 10 ms wait: the answer ends with the model's thinking,
            # and still says finish_reason "stop" (the EOS the engine made up).
            assert got and ANSWER.startswith(got) and len(got) < len(ANSWER) and "42" not in got
            assert parts[-1]["choices"][0]["finish_reason"] == "stop"
            assert fake.generates[-1]["stream"] is True
    finally:
        exo.stop()


def test_deepseek_answer_is_whole_patched(tmp_path, fake):
    exo = start(tmp_path, fake, src=patched_src(tmp_path, ["0001-deepseek-stream-wait.patch"]))
    try:
        code, text, _ = call(exo.url, "/v1/chat/completions", dict(DS, stream=True))
        parts = events(text)
        assert code == 200 and content(parts) == ANSWER
        assert parts[-1]["choices"][0]["finish_reason"] == "stop" and parts[-1]["choices"][0]["delta"]["content"] == ""
        code, text, _ = call(exo.url, "/v1/chat/completions", DS)
        assert code == 200 and json.loads(text)["choices"][0]["message"]["content"] == ANSWER
    finally:
        exo.stop()


def test_deepseek_stream_longer_than_the_client_timeout_is_cut_patched(tmp_path, fake):
    exo = start(tmp_path, fake, src=patched_src(tmp_path), env={"RKLLM_LAB_EXO_CLIENT_TIMEOUT": "0.4"})
    try:
        code, text, _ = call(exo.url, "/v1/chat/completions", dict(DS, stream=True))
        got = content(events(text))
        assert code == 200 and ANSWER.startswith(got) and len(got) < len(ANSWER)
    finally:
        exo.stop()


# --- concurrency: nothing on exo's side serializes requests -------------------------------------

@pytest.mark.parametrize("model,streamed", [(DEEPSEEK_ID, True), (QWEN_ID, False)])
def test_four_concurrent_client_streams_reach_rkllama_at_once(tmp_path, fake, model, streamed):
    exo = start(tmp_path, fake, src=patched_src(tmp_path))
    try:
        assert call(exo.url, "/v1/chat/completions", dict(DS, model=model))[0] == 200  # load first
        fake.max_active = 0
        results = []
        threads = [threading.Thread(target=lambda: results.append(timed_stream(exo.url, dict(DS, model=model))))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [r[1] for r in results] == [200] * 4
        # All four generations run on rkllama at the same time: exo has no queue of its own (one
        # asyncio loop, aiohttp calls, one stream task per request: rkllm_engine.py:405-423), so
        # keeping two generations off one board is rkllama's job.
        assert fake.max_active == 4
        assert all(g["stream"] is streamed for g in fake.generates)
    finally:
        exo.stop()


# --- metrics as they really behave (chatgpt_api.py:413,440,476-477; rkllm_engine.py:285-287) ----

def _counts(exo, model):
    text = exo.metrics()
    return (metric(text, f'exo_tokens_generated_total{{model="{model}"}}') or 0,
            metric(text, "rkllm_inference_duration_seconds_count"), metric(text, "rkllm_inference_duration_seconds_sum"))


@pytest.mark.parametrize("patched", [False, True])
def test_tokens_and_inference_time_for_streamed_and_plain_requests(tmp_path, fake, patched):
    exo = start(tmp_path, fake, src=patched_src(tmp_path) if patched else EXO, default_model=QWEN_ID)
    try:
        n = len(PIECES) + 1  # the answer's tokens and the EOS
        assert call(exo.url, "/v1/chat/completions", HI)[0] == 200
        assert _counts(exo, QWEN_ID)[:2] == (n, 1)  # plain: every token, one inference
        assert call(exo.url, "/v1/chat/completions", dict(HI, stream=True))[0] == 200
        # streamed: the fork adds only the last batch (1 token); the engine's plain path still times it
        assert _counts(exo, QWEN_ID)[:2] == ((2 * n, 2) if patched else (n + 1, 2))
        before = _counts(exo, QWEN_ID)[2]
        assert call(exo.url, "/v1/chat/completions", dict(DS, stream=True))[0] == 200
        time.sleep(sum(fake.gaps))  # unpatched, rkllama's stream goes on after the cut answer: let it end
        tokens, count, total = _counts(exo, DEEPSEEK_ID)
        if patched:
            # every streamed token and the EOS; the stream's generation time (about 1 s) as an inference
            assert tokens == len(TOKENS) + 1 and count == 3 and total - before >= sum(fake.gaps) * 0.9
        else:
            assert tokens == 1 and count == 2 and total == before  # the streaming path records no inference time
    finally:
        exo.stop()


# --- lab builds and command line -----------------------------------------------------------------

def test_lab_build_bad_answers(tmp_path):
    src = tmp_path / "exo-src"
    shutil.copytree(EXO, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (src / "lab_build.json").write_text(json.dumps({"version": "v-broken", "fault": "bad_answers"}))
    exo = Exo(tmp_path, free_port(), src=src, default_model=QWEN_ID)
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


# --- the patches themselves ------------------------------------------------------------------------

def test_lab_patches_mirror_the_fork_patches():
    fork = sorted(p.name for p in FORK_PATCHES.glob("*.patch"))
    lab = sorted(p.name for p in LAB_PATCHES.glob("*.patch"))
    assert fork == lab == ["0001-deepseek-stream-wait.patch", "0002-stream-metrics.patch"]
    for patch in FORK_PATCHES.glob("*.patch"):
        head = patch.read_text(encoding="utf-8").split("diff --git", 1)[0]
        assert head.startswith("Subject: ") and ".py:" in head  # a reason with the fork's file and line
