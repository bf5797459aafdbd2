"""The rkllama lab stand-in answers and fails like the fork (jfreed-dev/rkllama at 1d8d210).

Each test runs server.py as a subprocess on a free 127.0.0.1 port, with a temporary HOME
(~/RKLLAMA with the lab runtime library and lab models, a warm Hugging Face cache) and a
temporary sysroot written by lab/boards.py. `patched` servers run a copy of the stand-in with
the lab's patches (lab/stand-ins/patches/rkllama) applied by `git apply`, as the role applies
them on a lab board; the others behave like the unpatched fork.
"""
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "lab" / "stand-ins" / "rkllama"
RUNTIME = ROOT / "lab" / "runtime" / "dist" / "1.2.3"
LAB_PATCHES = ROOT / "lab" / "stand-ins" / "patches" / "rkllama"
QWEN = "Qwen2.5-1.5B-Instruct"
QWEN_TOKENIZER = "Qwen/Qwen2.5-1.5B-Instruct"
HI = [{"role": "user", "content": "hi"}]
# The stand-in's answer at the default RKLLM_LAB_ANSWER_TOKENS (24).
ANSWER = "The NPU on this board answers one request at a time." + "The NPU on this board answers one request at a time Done."
LAST = " Done."  # the answer's last token
RATE = 100  # tokens/s in these tests: slow enough for the fork's 5 ms read loop to keep up


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


boards = _load("rkllm_lab_boards_standin", ROOT / "lab" / "boards.py")
upstream = _load("rkllm_lab_upstream_standin", ROOT / "lab" / "upstream" / "build.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lab_model(platform="rk3588", toolkit=None):
    """A lab .rkllm file: the builder's for the defaults, else one with another toolkit version."""
    if toolkit is None:
        return upstream.model_file(QWEN, platform)
    body = upstream.MODEL_MAGIC + json.dumps({"model": QWEN, "platform": platform, "toolkit_version": toolkit,
                                              "dtype": "W8A8", "max_context": 4096}).encode() + b"\n" + b"x" * 256
    return body + hashlib.sha256(body).digest()


def add_model(home, name, data=None, modelfile=None):
    d = home / "RKLLAMA" / "models" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "m.rkllm").write_bytes(lab_model() if data is None else data)
    (d / "Modelfile").write_text(modelfile if modelfile is not None
                                 else f'FROM="m.rkllm"\nHUGGINGFACE_PATH="{QWEN_TOKENIZER}"\n')
    return d


def add_tokenizer(home, repo):
    snap = home / ".cache" / "huggingface" / "hub" / ("models--" + repo.replace("/", "--"))
    rev = upstream.lab_revision(repo)
    (snap / "refs").mkdir(parents=True, exist_ok=True)
    (snap / "refs" / "main").write_text(rev)
    (snap / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
    for name, data in upstream.tokenizer_files(repo).items():
        (snap / "snapshots" / rev / name).write_bytes(data)


def make_lab(tmp, board="orangepi5-vendor", arch="x86_64"):
    """HOME with ~/RKLLAMA (library, models Qwen2.5-1.5B-Instruct and DeepSeek-R1-1.5B) and a sysroot."""
    home = tmp / "home"
    lib = home / "RKLLAMA" / "lib"
    lib.mkdir(parents=True)
    shutil.copy(RUNTIME / arch / "librkllmrt.so", lib / "librkllmrt.so")
    add_model(home, QWEN)
    add_model(home, "DeepSeek-R1-1.5B", upstream.model_file("DeepSeek-R1-1.5B", "rk3588"),
              'FROM="m.rkllm"\nHUGGINGFACE_PATH="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"\nMAX_NEW_TOKENS="8192"\n')
    add_tokenizer(home, QWEN_TOKENIZER)
    add_tokenizer(home, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    boards.build(board, str(tmp / "sys"))
    return home


class Server:
    """server.py running as a subprocess; .log holds its output once stopped."""

    def __init__(self, tmp, src=SRC, env=None, preexec_fn=None, port=None, patched=False, args=()):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        e = dict(os.environ, HOME=str(tmp / "home"), RKLLM_LAB_SYSROOT=str(tmp / "sys"),
                 RKLLM_LAB_NOFILE_DEMAND="4096", RKLLM_LAB_TOKENS_PER_SECOND=str(RATE), HF_HUB_OFFLINE="1",
                 RKLLM_LAB_PREFILL_SECONDS="0.05", RKLLM_LAB_THINKING_TOKENS="4")
        e.update(env or {})
        if patched:
            src = patched_copy(src, tmp / f"patched-src-{self.port}")
        self.proc = subprocess.Popen([sys.executable, "server.py", "--port", str(self.port)] + list(args), cwd=src, env=e,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        self.log = ""
        self.up = False
        for _ in range(200):
            if self.proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).close()
                self.up = True
                break
            except OSError:
                time.sleep(0.05)

    def stop(self):
        if self.proc.returncode is not None and self.proc.stdout.closed:
            return self.log
        if self.proc.poll() is None:
            self.proc.kill()
        self.log = self.proc.communicate()[0].decode(errors="replace")
        return self.log


def patched_copy(src, dest):
    """A copy of the stand-in with every lab patch applied in name order, as the role applies them."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for patch in sorted(LAB_PATCHES.glob("*.patch")):
        subprocess.run(["git", "apply", str(patch)], cwd=dest, check=True)
    return dest


def call(url, path, body=None, method=None, timeout=10):
    """(status, text, headers) of one request; JSON body when given."""
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers


def chunks(text):
    return [json.loads(c) for c in text.split("\n\n") if c.strip()]


@pytest.fixture()
def lab(tmp_path):
    make_lab(tmp_path)
    return tmp_path


@pytest.fixture()
def server(lab):
    srv = Server(lab)
    assert srv.up, srv.stop()
    yield srv
    srv.stop()


@pytest.fixture()
def patched(lab):
    """The stand-in with the lab's patches: the fork as the role runs it."""
    srv = Server(lab, patched=True)
    assert srv.up, srv.stop()
    yield srv
    srv.stop()


def load(srv, name=QWEN):
    return call(srv.url, "/load_model", {"model_name": name})


# --- the API table (REFERENCE.md) -------------------------------------------------------------

def test_welcome_is_the_health_check(server):
    code, text, _ = call(server.url, "/")
    assert code == 200 and json.loads(text)["message"] == "Welcome to RKLLama !"


def test_models_lists_dirs_with_a_model_and_moves_loose_files(server, lab):
    models = lab / "home" / "RKLLAMA" / "models"
    (models / "Loose.rkllm").write_bytes(lab_model())
    (models / "Empty").mkdir()
    code, text, _ = call(server.url, "/models")
    assert code == 200 and sorted(json.loads(text)["models"]) == ["DeepSeek-R1-1.5B", "Loose", QWEN]
    assert (models / "Loose" / "Loose.rkllm").is_file() and not (models / "Loose.rkllm").exists()


def test_load_model_200_then_400_while_one_is_loaded(server):
    assert load(server)[:2] == (200, json.dumps({"message": f"Model {QWEN} loaded successfully."}, separators=(",", ":")) + "\n")
    # One model at a time: another one is refused until the first is unloaded.
    code, text, _ = load(server, "DeepSeek-R1-1.5B")
    assert code == 400 and json.loads(text) == {"error": "A model is already loaded. Please unload it first."}
    assert json.loads(call(server.url, "/current_model")[1]) == {"model_name": QWEN}


def test_load_model_400_for_missing_dir_or_modelfile(server, lab):
    (lab / "home" / "RKLLAMA" / "models" / "NoModelfile").mkdir()
    code, text, _ = load(server, "Nope")
    assert code == 400 and json.loads(text)["error"] == "Model directory 'Nope' not found."
    code, text, _ = load(server, "NoModelfile")
    assert code == 400 and json.loads(text)["error"] == "Modelfile not found in 'NoModelfile' directory."
    assert call(server.url, "/current_model")[0] == 404


def test_load_model_500_is_flasks_html_page(server, lab):
    add_model(lab / "home", "Bad", lab_model()[:-1] + b"\0")
    code, text, headers = load(server, "Bad")
    assert code == 500 and "text/html" in headers["Content-Type"] and "Internal Server Error" in text
    assert call(server.url, "/current_model")[0] == 404


def test_a_load_takes_rkllm_lab_load_seconds_and_the_model_is_not_current_meanwhile(lab):
    # rkllm_init puts the weights into NPU memory (src/rkllm.py:76-79): a swap costs time, as on a board.
    srv = Server(lab, env={"RKLLM_LAB_LOAD_SECONDS": "1.5"})
    try:
        assert srv.up, srv.stop()
        answer = []
        started = time.monotonic()
        loader = threading.Thread(target=lambda: answer.append(load(srv)[0]))
        loader.start()
        time.sleep(0.5)
        assert call(srv.url, "/current_model")[0] == 404  # still loading
        loader.join(10)
        assert answer == [200] and time.monotonic() - started >= 1.5
        assert json.loads(call(srv.url, "/current_model")[1]) == {"model_name": QWEN}
        # A model that fails to initialise fails before the wait, as rkllm_init refuses it at once.
        assert call(srv.url, "/unload_model", {})[0] == 200
        add_model(lab / "home", "Bad", lab_model()[:-1] + b"\0")
        started = time.monotonic()
        assert load(srv, "Bad")[0] == 500 and time.monotonic() - started < 1.5
    finally:
        srv.stop()


def test_a_load_is_instant_by_default(server):
    started = time.monotonic()
    assert load(server)[0] == 200 and time.monotonic() - started < 1.0


def test_a_faster_npu_for_a_while_gives_the_same_answers_sooner(lab):
    # The lab's traffic tests write a speed factor under the sysroot; the answer and the fork's handling
    # of it stay the same, only the simulated chip is faster while the file is there.
    srv = Server(lab, env={"RKLLM_LAB_TOKENS_PER_SECOND": "10"}, patched=True)
    try:
        assert srv.up, srv.stop()
        assert load(srv)[0] == 200
        timed = []
        for speed in (None, "4"):
            if speed:
                (lab / "sys" / "lab-npu-speed").write_text(speed)
            started = time.monotonic()
            code, text, _ = call(srv.url, "/generate", {"messages": [{"role": "user", "content": "hi"}]})
            timed.append((time.monotonic() - started, json.loads(text)["choices"][0]["content"]))
            assert code == 200
        (lab / "sys" / "lab-npu-speed").unlink()
        assert timed[0][1] == timed[1][1] == ANSWER
        assert timed[0][0] >= 2.4 and timed[1][0] < 1.2, timed
    finally:
        srv.stop()


def test_unload_model_200_then_400(server):
    assert load(server)[0] == 200
    assert call(server.url, "/unload_model", {})[:2] == (200, '{"message":"Model successfully unloaded!"}\n')
    code, text, _ = call(server.url, "/unload_model", {})
    assert code == 400 and json.loads(text) == {"error": "No models are currently loaded."}


def test_current_model_404_when_none(server):
    code, text, _ = call(server.url, "/current_model")
    assert code == 404 and json.loads(text) == {"error": "No models are currently loaded."}


def test_generate_plain_answer_with_usage(patched):
    server = patched
    assert load(server)[0] == 200
    code, text, _ = call(server.url, "/generate", {"messages": HI})
    answer = json.loads(text)
    assert code == 200 and answer["id"] == "rkllm_chat"
    assert answer["choices"][0] == {"role": "assistant", "content": ANSWER, "logprobs": None, "finish_reason": "stop"}
    usage = answer["usage"]
    assert usage["completion_tokens"] == 24 and usage["total_tokens"] == usage["prompt_tokens"] + 24
    assert usage["prompt_tokens"] > 0 and usage["tokens_per_second"] > 0


def test_generate_stream_one_object_per_token_and_finish_reason_null(patched):
    server = patched
    assert load(server)[0] == 200
    code, text, headers = call(server.url, "/generate", {"messages": HI, "stream": True})
    parts = chunks(text)
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    assert [p["usage"]["completion_tokens"] for p in parts] == list(range(1, 25))
    assert "".join(p["choices"][0]["content"] for p in parts) == ANSWER
    # The fork never reports the end in the stream: finish_reason stays null, the last chunk too.
    assert all(p["choices"][0]["finish_reason"] is None for p in parts)


def test_generate_400_without_a_model_or_messages(server):
    code, text, _ = call(server.url, "/generate", {"messages": HI})
    assert code == 400 and json.loads(text) == {"error": "No models are currently loaded."}
    assert load(server)[0] == 200
    code, text, _ = call(server.url, "/generate", {"prompt": "hi"})
    assert code == 400 and json.loads(text) == {"status": "error", "message": "Données JSON invalides !"}


def test_pull_and_rm_are_broken(server):
    code, text, _ = call(server.url, "/pull", {"model": "x/y/z.rkllm"})
    assert code == 200 and text.startswith("Error:") and "huggingface.co" in text
    assert call(server.url, "/rm", {"model": QWEN}, method="DELETE")[0] == 500


# --- failure modes ----------------------------------------------------------------------------

def test_no_start_without_library(lab):
    (lab / "home" / "RKLLAMA" / "lib" / "librkllmrt.so").unlink()
    srv = Server(lab)
    log = srv.stop()
    assert not srv.up and srv.proc.returncode != 0 and "librkllmrt.so" in log and "Traceback" in log


def test_no_start_with_a_library_for_another_architecture(tmp_path):
    make_lab(tmp_path, arch="aarch64")
    srv = Server(tmp_path)
    log = srv.stop()
    assert not srv.up and srv.proc.returncode != 0 and "OSError" in log and "librkllmrt.so" in log


def _nofile_setup():
    """(env, preexec_fn) making setrlimit(NOFILE, demand) fail the way it does for the fork's non-root user."""
    if os.getuid() != 0:
        def lower():
            resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
        return {"RKLLM_LAB_NOFILE_DEMAND": "102400"}, lower
    # Root may raise its own hard limit, and its interpreter lives under /root (0700), out of reach
    # of an unprivileged uid: demand more than the kernel allows anyone (fs.nr_open) instead.
    with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
        return {"RKLLM_LAB_NOFILE_DEMAND": str(int(f.read()) + 1)}, None


def test_no_start_when_open_files_limit_cannot_be_raised(lab):
    env, preexec = _nofile_setup()
    srv = Server(lab, env=env, preexec_fn=preexec)
    log = srv.stop()
    assert not srv.up and srv.proc.returncode != 0 and "Traceback" in log and "setrlimit" in log


def test_modelfile_is_parsed_with_dotenv(lab):
    home = lab / "home"
    add_model(home, "Spaced", modelfile=f"FROM m.rkllm\nHUGGINGFACE_PATH {QWEN_TOKENIZER}\n")
    srv = Server(lab)
    try:
        code, text, _ = load(srv, "Spaced")
        assert code == 400 and json.loads(text) == {"error": "FROM or HUGGINGFACE_PATH not defined in Modelfile."}
        assert load(srv)[0] == 200  # KEY="value" works
    finally:
        srv.stop()


def test_modelfile_values_leak_into_the_next_load(patched, lab):
    """load_dotenv(override=True): a key the next Modelfile leaves out keeps the previous value."""
    server = patched
    home = lab / "home"
    add_model(home, "Short", modelfile=f'FROM="m.rkllm"\nHUGGINGFACE_PATH="{QWEN_TOKENIZER}"\nMAX_NEW_TOKENS="5"\n')
    assert load(server, "Short")[0] == 200
    assert json.loads(call(server.url, "/generate", {"messages": HI})[1])["usage"]["completion_tokens"] == 5
    assert call(server.url, "/unload_model", {})[0] == 200
    assert load(server)[0] == 200  # its Modelfile has no MAX_NEW_TOKENS
    assert json.loads(call(server.url, "/generate", {"messages": HI})[1])["usage"]["completion_tokens"] == 5


def test_tokenizer_from_the_offline_cache(lab):
    srv = Server(lab)
    try:
        assert load(srv)[0] == 200
        assert call(srv.url, "/generate", {"messages": HI})[0] == 200
        shutil.rmtree(lab / "home" / ".cache")
        assert call(srv.url, "/generate", {"messages": HI})[0] == 500  # the tokenizer is loaded per request
    finally:
        log = srv.stop()
    assert "couldn't connect to 'https://huggingface.co'" in log


def test_tokenizer_missing_online_is_a_connection_error(lab):
    shutil.rmtree(lab / "home" / ".cache")
    srv = Server(lab, env={"HF_HUB_OFFLINE": "0"})
    try:
        assert load(srv)[0] == 200
        assert call(srv.url, "/generate", {"messages": HI})[0] == 500
    finally:
        log = srv.stop()
    assert "MaxRetryError" in log and "Failed to resolve 'huggingface.co'" in log


def test_model_for_another_platform_fails_to_load(server, lab):
    add_model(lab / "home", "RK3576", upstream.model_file(QWEN, "rk3576"))
    code, text, _ = load(server, "RK3576")
    assert code == 500 and "Internal Server Error" in text
    log = server.stop()
    assert "platform: RK3588" in log and "E rkllm: the model is for RK3576 but this is RK3588" in log
    assert "E rkllm: rkllm_init failed" in log


def test_corrupt_model_is_invalid(server, lab):
    data = bytearray(lab_model())
    data[len(data) // 2] ^= 0xFF
    add_model(lab / "home", "Flipped", bytes(data))
    assert load(server, "Flipped")[0] == 500
    assert "E rkllm: invalid rkllm model!" in server.stop()


def test_model_from_a_newer_toolkit_than_the_runtime_is_invalid(server, lab):
    add_model(lab / "home", "Newer", lab_model(toolkit="1.3.0"))
    assert load(server, "Newer")[0] == 500
    log = server.stop()
    assert "E rkllm: invalid rkllm model!" in log and "1.3.0 is newer than runtime 1.2.3" in log


def test_no_per_request_token_limit(patched):
    server = patched
    assert load(server)[0] == 200
    code, text, _ = call(server.url, "/generate", {"messages": HI, "max_tokens": 3})
    assert code == 200 and json.loads(text)["usage"]["completion_tokens"] == 24


def test_roles_must_alternate(server):
    assert load(server)[0] == 200
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert call(server.url, "/generate", {"messages": two_users})[0] == 500
    # The fork prepends its own system prompt, so a request's own system message makes two in a row.
    with_system = [{"role": "system", "content": "be brief"}] + HI
    assert call(server.url, "/generate", {"messages": with_system})[0] == 500
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert call(server.url, "/generate", {"messages": turns})[0] == 200
    assert "ValueError: Les rôles doivent alterner" in server.stop()


def abandon_stream(srv, chunks_read=2):
    """Start a stream, read CHUNKS_READ of its chunks, then go away."""
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        body = json.dumps({"messages": HI, "stream": True}).encode()
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        seen = b""
        while seen.count(b"rkllm_chat") < 2 * chunks_read:  # each chunk names rkllm_chat twice (id, object)
            seen += sock.recv(4096)


@pytest.mark.parametrize("patches", [False, True], ids=["fork", "patched"])
def test_abandoned_stream_and_the_next_answer(lab, patches):
    """process.py:131-132: the lock is gone once the stream starts, and its generation keeps running."""
    srv = Server(lab, env={"RKLLM_LAB_TOKENS_PER_SECOND": "40"}, patched=patches)
    try:
        assert load(srv)[0] == 200
        abandon_stream(srv)
        answer = json.loads(call(srv.url, "/generate", {"messages": HI})[1])["choices"][0]["content"]
    finally:
        srv.stop()
    if patches:
        # 0002 ends the abandoned generation and unlocks; 0001 drops what it left in the buffer.
        assert answer == ANSWER
    else:
        # The next request starts at once and reads its own tokens mixed with the abandoned one's.
        assert answer != ANSWER and len(answer) > len(ANSWER) - len(LAST)


def test_generation_rate(lab):
    srv = Server(lab, env={"RKLLM_LAB_TOKENS_PER_SECOND": "20", "RKLLM_LAB_ANSWER_TOKENS": "10"}, patched=True)
    try:
        assert load(srv)[0] == 200
        start = time.monotonic()
        answer = json.loads(call(srv.url, "/generate", {"messages": HI})[1])
        elapsed = time.monotonic() - start
    finally:
        srv.stop()
    assert answer["usage"]["completion_tokens"] == 10
    assert elapsed >= 0.45 and answer["usage"]["tokens_per_second"] <= 21


@pytest.fixture()
def faulty_src(tmp_path):
    def make(fault):
        src = tmp_path / f"src-{fault}"
        shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__"))
        (src / "lab_build.json").write_text(json.dumps({"version": "v-broken", "fault": fault}))
        return src
    return make


def test_lab_build_load_fails(lab, faulty_src):
    srv = Server(lab, src=faulty_src("load_fails"))
    try:
        assert json.loads(call(srv.url, "/")[1])["lab_build"] == "v-broken"
        assert load(srv)[0] == 500
    finally:
        log = srv.stop()
    assert "E RKNN: failed to malloc npu memory" in log and "E rkllm: rkllm_init failed" in log


def test_lab_build_no_start(lab, faulty_src):
    srv = Server(lab, src=faulty_src("no_start"))
    log = srv.stop()
    assert not srv.up and srv.proc.returncode != 0 and "Traceback" in log and "does not start" in log


# --- what the pinned fork really does (REFERENCE.md "How the pinned forks really behave") -----

def stream_timed(url, body, timeout=30):
    """[(seconds since the request, chunk)] of one streamed /generate, read to its end."""
    req = urllib.request.Request(url + "/generate", data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.monotonic()
    out, pending = [], b""
    with urllib.request.urlopen(req, timeout=timeout) as r:
        while True:
            data = r.read1(65536)
            if not data:
                break
            pending += data
            *done, pending = pending.split(b"\n\n")
            out += [(time.monotonic() - start, json.loads(c)) for c in done if c.strip()]
    return out


def plain_answer(srv):
    return json.loads(call(srv.url, "/generate", {"messages": HI})[1])["choices"][0]["content"]


def stream_answer(srv):
    return "".join(c["choices"][0]["content"] for _t, c in stream_timed(srv.url, {"messages": HI}))


@pytest.mark.parametrize("read", [plain_answer, stream_answer], ids=["plain", "stream"])
def test_fork_hands_the_last_token_of_an_answer_to_the_next_request(lab, read):
    """process.py:72-79, 102-126: the loop ends with the runtime thread, not with the buffer.

    At 16 tokens/s the plain loop spends most of each token's time where the fork's reader loses
    the race (a real board at 8 tokens/s: more still); the streamed loop loses it nearly always.
    """
    srv = Server(lab, env={"RKLLM_LAB_TOKENS_PER_SECOND": "16", "RKLLM_LAB_ANSWER_TOKENS": "6"})
    answer = "The NPU on this board" + LAST
    try:
        assert load(srv)[0] == 200
        answers = [read(srv) for _ in range(8)]
    finally:
        srv.stop()
    # An answer may lose its last token, and start with the one the answer before it lost.
    assert all(a in (answer, answer[:-len(LAST)], LAST + answer, LAST + answer[:-len(LAST)]) for a in answers), answers
    assert len([a for a in answers[1:] if a.startswith(LAST)]) >= 2, answers


@pytest.mark.parametrize("read", [plain_answer, stream_answer], ids=["plain", "stream"])
def test_patched_answers_carry_no_token_of_another_answer(lab, read):
    """The same requests as the test above (where the fork leaks), with 0001-drain-token-buffer."""
    srv = Server(lab, env={"RKLLM_LAB_TOKENS_PER_SECOND": "16", "RKLLM_LAB_ANSWER_TOKENS": "6"}, patched=True)
    try:
        assert load(srv)[0] == 200
        answers = [read(srv) for _ in range(8)]
    finally:
        srv.stop()
    assert answers == ["The NPU on this board" + LAST] * 8


def test_a_stale_token_is_the_first_chunk_of_the_next_stream_at_once(server):
    """What model_check must not take for the first token: the stale chunk comes before the prefill."""
    assert load(server)[0] == 200
    stream_answer(server)
    timed = stream_timed(server.url, {"messages": HI})
    assert timed[0][1]["choices"][0]["content"] == LAST
    assert timed[1][0] - timed[0][0] >= 0.04  # RKLLM_LAB_PREFILL_SECONDS=0.05: the real first token
    # process.py:24-29, 123: sent before the loop's first pass, its tokens_per_second is still the integer 0.
    assert isinstance(timed[0][1]["usage"]["tokens_per_second"], int)
    assert all(isinstance(c["usage"]["tokens_per_second"], float) for _t, c in timed[1:])


def concurrent_streams(srv, count):
    """Start COUNT streams at once; return [(seconds, chunk) list] per stream."""
    results = [None] * count

    def one(i):
        results[i] = stream_timed(srv.url, {"messages": HI}, timeout=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_fork_runs_two_concurrent_streams_at_once_and_interleaves_their_tokens(server):
    """process.py:131-132 + server.py:277: the lock is released when the streamed Response is returned."""
    assert load(server)[0] == 200
    start = time.monotonic()
    streams = concurrent_streams(server, 2)
    elapsed = time.monotonic() - start
    texts = ["".join(c["choices"][0]["content"] for _t, c in s) for s in streams]
    assert all(t != ANSWER and t for t in texts), texts
    # Both generations ran at once: together they took about as long as one.
    assert elapsed < 1.6 * (0.05 + 24 / RATE) + 0.5
    assert sum(len(s) for s in streams) >= 2 * 24 - 2


def test_fork_serializes_plain_requests(server):
    assert load(server)[0] == 200
    answers = [None, None]

    def one(i):
        answers[i] = plain_answer(server)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # One after the other: each is the answer (give or take the last token the fork moves along).
    assert sorted(answers) == sorted([ANSWER[:-len(LAST)], LAST + ANSWER[:-len(LAST)]]) or \
        all(a.replace(LAST, "") == ANSWER.replace(LAST, "") for a in answers), answers


def test_patched_concurrent_streams_wait_their_turn_and_all_succeed(patched):
    assert load(patched)[0] == 200
    streams = concurrent_streams(patched, 4)
    texts = ["".join(c["choices"][0]["content"] for _t, c in s) for s in streams]
    assert texts == [ANSWER] * 4
    spans = sorted((s[0][0], s[-1][0]) for s in streams)
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert begin >= end - 0.01, spans  # no two generations overlap


def test_deepseek_thinks_in_silence_between_think_and_its_end(lab):
    """callback.py:72-95: `<think>` at the first thinking token, then nothing until `</think> (N tokens)`."""
    srv = Server(lab, env={"RKLLM_LAB_THINKING_TOKENS": "30"}, patched=True)
    try:
        assert load(srv, "DeepSeek-R1-1.5B")[0] == 200
        timed = stream_timed(srv.url, {"messages": HI})
        plain = json.loads(call(srv.url, "/generate", {"messages": HI})[1])
    finally:
        srv.stop()
    contents = [c["choices"][0]["content"] for _t, c in timed]
    assert contents[:2] == ["<think>", "</think> (30 tokens)\n"]
    assert "".join(contents[2:]) == ANSWER
    silence = timed[1][0] - timed[0][0]
    assert silence >= 0.9 * 29 / RATE  # 29 more thinking tokens, each sent nowhere
    assert plain["choices"][0]["content"] == "<think></think> (30 tokens)\n" + ANSWER
    # The fork counts what it read from the buffer, not the tokens the model generated.
    assert plain["usage"]["completion_tokens"] == 2 + 24


def test_deepseek_cut_by_max_new_tokens_while_thinking(lab):
    add_model(lab / "home", "DeepSeek-Short", upstream.model_file("DeepSeek-R1-1.5B", "rk3588"),
              'FROM="m.rkllm"\nHUGGINGFACE_PATH="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"\nMAX_NEW_TOKENS="10"\n')
    srv = Server(lab, env={"RKLLM_LAB_THINKING_TOKENS": "30"}, patched=True)
    try:
        assert load(srv, "DeepSeek-Short")[0] == 200
        answer = json.loads(call(srv.url, "/generate", {"messages": HI})[1])["choices"][0]["content"]
    finally:
        srv.stop()
    assert answer == "<think></think> (10 thinking tokens)\n"  # callback.py:32-40


def test_modelfile_without_from_after_another_model_is_a_500(server, lab):
    """server.py:68-87: FROM stays in the environment from the previous load; its file is not here."""
    home = lab / "home"
    add_model(home, "NoFrom", modelfile=f'HUGGINGFACE_PATH="{QWEN_TOKENIZER}"\n')
    (home / "RKLLAMA" / "models" / "NoFrom" / "m.rkllm").rename(home / "RKLLAMA" / "models" / "NoFrom" / "nofrom.rkllm")
    code, text, _ = load(server, "NoFrom")
    assert code == 400 and json.loads(text)["error"] == "FROM or HUGGINGFACE_PATH not defined in Modelfile."
    assert load(server)[0] == 200
    assert call(server.url, "/unload_model", {})[0] == 200
    code, text, _ = load(server, "NoFrom")
    assert code == 500 and "Internal Server Error" in text


@pytest.mark.parametrize("flag", [False, True], ids=["without", "with"])
def test_start_without_target_platform_prints_the_forks_error(lab, flag):
    srv = Server(lab, args=["--target_platform", "rk3588"] if flag else [])
    try:
        assert srv.up
    finally:
        log = srv.stop()
    assert ("Error argument not found: --target_platform" in log) is not flag


def test_model_check_times_the_first_token_of_its_own_answer_on_the_unpatched_fork(lab):
    """A stale token waits in the fork's buffer (after a stream): it arrives at once; model_check must not time it."""
    from ansible_collections.rkllm.fleet.plugins.module_utils.rkllama_api import RkllamaClient
    from ansible_collections.rkllm.fleet.plugins.modules.model_check import check_model

    srv = Server(lab, env={"RKLLM_LAB_PREFILL_SECONDS": "0.3", "RKLLM_LAB_TOKENS_PER_SECOND": "20"})
    try:
        assert load(srv)[0] == 200
        stream_answer(srv)  # leaves its last token in the buffer
        naive = stream_timed(srv.url, {"messages": HI})  # what a client that trusts the first chunk sees
        assert naive[0][1]["choices"][0]["content"] == LAST and naive[0][0] < 0.1
        result = check_model(RkllamaClient(srv.url, 30), QWEN)
    finally:
        srv.stop()
    assert result["stale_tokens"] == 1
    assert result["time_to_first_token"] >= 0.3
    assert result["response"] in (ANSWER, ANSWER[:-len(LAST)])  # its own last token usually leaks in turn
    assert 15 <= result["tokens_per_second"] <= 21
