"""The rkllama lab stand-in behaves like the fork (run as a subprocess on 127.0.0.1)."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "lab" / "stand-ins" / "rkllama"
EXO = ROOT / "lab" / "stand-ins" / "exo"
PY312 = shutil.which("python3.12") and "/root/.pyenv/versions/3.12.1/bin/python"


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(path, platform="rk3588", toolkit="1.1.4", corrupt=False):
    body = b"RKLLM-LAB-MODEL 1\n" + json.dumps({"model": "Q", "platform": platform, "toolkit_version": toolkit,
                                                "dtype": "W8A8", "max_context": 4096}).encode() + b"\n" + b"x" * 64
    digest = hashlib.sha256(body).digest()
    path.write_bytes(body + (b"\0" * 32 if corrupt else digest))


@pytest.fixture()
def home(tmp_path):
    lib = tmp_path / "home" / "RKLLAMA" / "lib"
    lib.mkdir(parents=True)
    (tmp_path / "l.c").write_text('const char v[]="rkllm-runtime version: 1.2.3";int rkllm_init(void){return 0;}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib / "librkllmrt.so"), str(tmp_path / "l.c")], check=True)
    dt = tmp_path / "sys" / "proc" / "device-tree"
    dt.mkdir(parents=True)
    (dt / "compatible").write_bytes(b"rockchip,rk3588s-orangepi-5\0rockchip,rk3588\0")
    drv = tmp_path / "sys" / "sys" / "module" / "rknpu"
    drv.mkdir(parents=True)
    (drv / "version").write_text("0.9.8\n")
    for name, kw in {"Q": {}, "Bad": {"corrupt": True}, "Other": {"platform": "rk3576"}, "New": {"toolkit": "1.3.0"}}.items():
        d = tmp_path / "home" / "RKLLAMA" / "models" / name
        d.mkdir(parents=True)
        _model(d / "q.rkllm", **kw)
        (d / "Modelfile").write_text('FROM="q.rkllm"\nHUGGINGFACE_PATH="Qwen/Q"\n')
    snap = tmp_path / "home" / ".cache" / "huggingface" / "hub" / "models--Qwen--Q"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc")
    (snap / "snapshots" / "abc").mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (snap / "snapshots" / "abc" / f).write_text("{}")
    return tmp_path


def _start(tmp, **env):
    port = _port()
    e = dict(os.environ, HOME=str(tmp / "home"), RKLLM_LAB_SYSROOT=str(tmp / "sys"), RKLLM_LAB_NOFILE_DEMAND="16384",
             RKLLM_LAB_TOKENS_PER_SECOND="400", HF_HUB_OFFLINE="1")
    e.update(env)
    proc = subprocess.Popen([sys.executable, "server.py", "--port", str(port)], cwd=SRC, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in range(100):
        if proc.poll() is not None:
            return proc, None
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    return proc, None


def _call(url, path, body=None):
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture()
def server(home):
    proc, url = _start(home)
    assert url, proc.stdout.read().decode()
    yield url
    proc.kill()
    proc.wait()


def test_routes_answer_like_the_fork(server):
    assert json.loads(_call(server, "/")[1])["message"] == "Welcome to RKLLama !"
    assert _call(server, "/current_model")[0] == 404
    assert _call(server, "/generate", {"messages": [{"role": "user", "content": "hi"}]})[0] == 400
    assert _call(server, "/load_model", {"model_name": "Nope"})[0] == 400
    assert _call(server, "/load_model", {"model_name": "Q"})[0] == 200
    assert _call(server, "/load_model", {"model_name": "Q"}) == (400, json.dumps(
        {"error": "A model is already loaded. Please unload it first."}, separators=(",", ":")) + "\n")
    code, text = _call(server, "/generate", {"messages": [{"role": "user", "content": "hi"}]})
    answer = json.loads(text)
    assert code == 200 and answer["choices"][0]["finish_reason"] == "stop"
    assert set(answer["usage"]) == {"prompt_tokens", "completion_tokens", "tokens_per_second", "total_tokens"}
    assert answer["usage"]["completion_tokens"] == 24
    code, text = _call(server, "/generate", {"messages": [{"role": "user", "content": "hi"}], "stream": True})
    chunks = [json.loads(c) for c in text.split("\n\n") if c.strip()]
    assert code == 200 and len(chunks) == 24 and all(c["usage"]["completion_tokens"] == i + 1 for i, c in enumerate(chunks))
    assert _call(server, "/unload_model", {})[0] == 200
    assert _call(server, "/unload_model", {})[0] == 400


@pytest.mark.parametrize("model", ["Bad", "Other", "New"])
def test_model_the_runtime_refuses_gives_html_500(server, model):
    code, text = _call(server, "/load_model", {"model_name": model})
    assert code == 500 and "Internal Server Error" in text


def test_no_tokenizer_offline_gives_500(server, home):
    shutil.rmtree(home / "home" / ".cache")
    assert _call(server, "/load_model", {"model_name": "Q"})[0] == 200
    assert _call(server, "/generate", {"messages": [{"role": "user", "content": "hi"}]})[0] == 500


def test_no_start_without_library(home):
    (home / "home" / "RKLLAMA" / "lib" / "librkllmrt.so").unlink()
    proc, url = _start(home)
    assert url is None and proc.wait() != 0 and b"librkllmrt.so" in proc.stdout.read()


def test_no_start_when_open_files_limit_cannot_be_raised(home):
    proc, url = _start(home, RKLLM_LAB_NOFILE_DEMAND="10000000")
    assert url is None and proc.wait() != 0 and b"Traceback" in proc.stdout.read()


@pytest.mark.skipif(not PY312 or not os.path.exists("/root/.pyenv/versions/3.12.1/bin/python"), reason="needs Python 3.12")
def test_exo_fails_requests_when_rkllama_is_down(tmp_path):
    cfg = tmp_path / "d.json"
    cfg.write_text(json.dumps({"peers": {"n1": {"address": "127.0.0.1", "port": 1, "device_capabilities": {
        "model": "m", "chip": "c", "memory": 0, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}}}}))
    port = _port()
    proc = subprocess.Popen(["/root/.pyenv/versions/3.12.1/bin/python", "-m", "exo.main", "--inference-engine", "rkllm",
                             "--disable-tui", "--discovery-module", "manual", "--discovery-config-path", str(cfg),
                             "--node-id", "n1", "--chatgpt-api-port", str(port)], cwd=EXO,
                            env=dict(os.environ, RKLLM_SERVER_HOST="127.0.0.1", RKLLM_SERVER_PORT=str(_port())))
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/healthcheck", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        code, text = _call(url, "/v1/chat/completions", {"model": "qwen2.5-1.5b-instruct-rkllm",
                                                           "messages": [{"role": "user", "content": "hi"}]})
        assert code == 500 and "RKLLM server not available" in text
        metrics = _call(url, "/metrics")[1]
        assert "rkllm_server_up 0" in metrics
        for name in ("exo_requests_total", "exo_requests_in_progress", "exo_tokens_generated_total",
                     "exo_request_duration_seconds", "exo_first_token_latency_seconds", "exo_tokens_per_second",
                     "rkllm_inference_duration_seconds", "rkllm_model_load_duration_seconds"):
            assert f"# TYPE {name} " in metrics
    finally:
        proc.kill()
        proc.wait()
