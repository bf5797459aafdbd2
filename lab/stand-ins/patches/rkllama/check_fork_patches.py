"""Run the real fork's src/process.py with a stub runtime: its faults unpatched, gone patched.

Not a unit test (the fork's code is not in this repository). Usage, from a machine with the
mirror of jfreed-dev/rkllama (any directory holding the fork's src/ at 1d8d210 will do):

    git -C MIRROR archive 1d8d210ae34cf960b688183bdfe256e0b8043cab src | tar -x -C /tmp/fork
    python3 check_fork_patches.py /tmp/fork                  # unpatched: leaks and interleaving
    cd /tmp/fork && git init -q && git apply .../roles/rkllama/files/patches/1d8d210*/*.patch
    python3 check_fork_patches.py /tmp/fork                  # patched: every answer whole

Needs Flask (werkzeug) importable. transformers is stubbed, and src/__init__.py (which loads
librkllmrt.so) is skipped: the runtime is a stub that appends eight tokens, 60 ms apart, to the
fork's shared buffer, as the fork's callback does.
"""
import json
import socket
import sys
import threading
import time
import types
import urllib.request

tree = sys.argv[1]
sys.path.insert(0, tree)
tf = types.ModuleType("transformers")
class Tok:
    chat_template = ""
    def apply_chat_template(self, prompt, tokenize=True, add_generation_prompt=True):
        return [1, 2, 3]
tf.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: Tok())
sys.modules["transformers"] = tf
pkg = types.ModuleType("src"); pkg.__path__ = [tree + "/src"]; sys.modules["src"] = pkg  # skip src/__init__ (loads the runtime)
import src.variables as variables
from src.process import Request
from flask import Flask
from werkzeug.serving import make_server

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]
class Model:
    def __init__(self): self.abort_flag = threading.Event()
    def run(self, prompt):
        self.abort_flag.clear()
        for w in WORDS:
            time.sleep(0.06)
            if self.abort_flag.is_set(): break
            variables.global_text.append(w)
    def abort(self): self.abort_flag.set()

model = Model()
app = Flask(__name__)
@app.route("/generate", methods=["POST"])
def gen():
    variables.verrou.acquire()
    return Request(model)
srv = make_server("127.0.0.1", 0, app, threaded=True)
threading.Thread(target=srv.serve_forever, daemon=True).start()
url = "http://127.0.0.1:%d/generate" % srv.server_port
def call(stream):
    req = urllib.request.Request(url, data=json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode(), headers={"Content-Type": "application/json"})
    body = urllib.request.urlopen(req, timeout=30).read().decode()
    if stream:
        return "".join(json.loads(c)["choices"][0]["content"] for c in body.split("\n\n") if c.strip())
    return json.loads(body)["choices"][0]["content"]
full = "".join(WORDS)
plain = [call(False) for _ in range(4)]
streams = [call(True) for _ in range(4)]
print("back-to-back plain  :", plain, "all whole:", all(a == full for a in plain))
print("back-to-back streams:", streams, "all whole:", all(a == full for a in streams))
res = [None] * 3
def one(i): res[i] = call(True)
t0 = time.time(); ts = [threading.Thread(target=one, args=(i,)) for i in range(3)]
[t.start() for t in ts]; [t.join() for t in ts]
print("3 concurrent streams:", res, "all whole:", all(a == full for a in res), "took %.2fs (one: %.2fs)" % (time.time() - t0, 0.06 * len(WORDS)))
# a client that goes away after the first chunk
s = socket.create_connection(("127.0.0.1", srv.server_port))
body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
seen = b""
while b"rkllm_chat" not in seen: seen += s.recv(4096)
s.close()
after = call(False)
print("after an abandoned stream:", repr(after), "whole:", after == full)
print("lock free at the end:", not variables.verrou.locked() or (time.sleep(1) or not variables.verrou.locked()))
