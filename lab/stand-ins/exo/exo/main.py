"""exo-rkllama lab stand-in: `python -m exo.main` (rkllm.fleet lab only; not exo)."""

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if sys.version_info < (3, 12):
    raise SystemExit("exo requires Python 3.12 or newer")

from exo import metrics  # noqa: E402  (after the version gate, as the fork's imports would fail)

MODEL_MAP = {
    "deepseek-r1-1.5b-rkllm": "DeepSeek-R1-1.5B",
    "qwen2.5-1.5b-rkllm": "Qwen2.5-1.5B",
    "qwen2.5-1.5b-instruct-rkllm": "Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b-rkllm": "Qwen2.5-3B",
    "qwen2.5-7b-rkllm": "Qwen2.5-7B",
    "phi-3-mini-rkllm": "Phi-3-mini",
}
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lab_build():
    try:
        with open(os.path.join(HERE, "lab_build.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"version": "dev", "fault": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("command", nargs="?", choices=["run", "eval", "train"])
    p.add_argument("model_name", nargs="?")
    p.add_argument("--default-model", type=str, default=None)
    p.add_argument("--node-id", type=str, default=None)
    p.add_argument("--node-host", type=str, default="0.0.0.0")
    p.add_argument("--node-port", type=int, default=None)
    p.add_argument("--listen-port", type=int, default=5678)
    p.add_argument("--broadcast-port", type=int, default=5678)
    p.add_argument("--discovery-module", type=str, choices=["udp", "tailscale", "manual"], default="udp")
    p.add_argument("--discovery-timeout", type=int, default=30)
    p.add_argument("--discovery-config-path", type=str, default=None)
    p.add_argument("--wait-for-peers", type=int, default=0)
    p.add_argument("--chatgpt-api-port", type=int, default=52415)
    p.add_argument("--chatgpt-api-response-timeout", type=int, default=900)
    p.add_argument("--max-generate-tokens", type=int, default=10000)
    p.add_argument("--inference-engine", type=str, default=None)
    p.add_argument("--disable-tui", action=argparse.BooleanOptionalAction)
    p.add_argument("--default-temp", type=float, default=0.0)
    p.add_argument("--system-prompt", type=str, default=None)
    p.add_argument("--node-id-filter", type=str, default=None)
    p.add_argument("--interface-type-filter", type=str, default=None)
    return p.parse_args(argv)


class Engine:
    """The RKLLM engine: rkllama's old HTTP API, one request at a time."""

    def __init__(self, host, port, timeout):
        self.base = f"http://{host}:{port}"
        self.timeout = timeout
        self.lock = threading.Lock()
        self.loaded = None

    def _call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(req, timeout=self.timeout)  # pylint: disable=consider-using-with

    def up(self):
        try:
            with self._call("GET", "/") as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def ensure_model(self, name):
        """Make rkllama hold model `name`, as the fork's engine does."""
        # The fork's engine remembers what it loaded and then checks nothing more: if rkllama restarts
        # (and so loses its model) the engine does not notice, and /generate answers 400 from then on.
        if self.loaded == name:
            return
        # rkllm_server_up is set here only, when the engine checks before a load (never on a scrape).
        up = self.up()
        metrics.set_gauge("rkllm_server_up", 1 if up else 0)
        if not up:
            raise ConnectionError(f"RKLLM server not available at {self.base}. Please start the rkllama server with: "
                                  f"python server.py --target_platform rk3588 --port {self.base.rsplit(':', 1)[1]}")
        start = time.time()
        if not self._load(name):
            metrics.observe("rkllm_model_load_duration_seconds", time.time() - start)
            raise RuntimeError(f"Failed to load RKLLM model: {name}. Available models: {self._models()}")
        metrics.observe("rkllm_model_load_duration_seconds", time.time() - start)
        self.loaded = name

    def _load(self, name):
        """The fork's client: /current_model, /unload_model if another is loaded, /load_model; any failure => False."""
        try:
            try:
                with self._call("GET", "/current_model") as resp:
                    current = json.load(resp).get("model_name")
            except urllib.error.HTTPError:
                current = None
            if current == name:
                return True
            if current:
                self._call("POST", "/unload_model", {}).close()
            with self._call("POST", "/load_model", {"model_name": name}) as resp:
                return resp.status == 200
        except (OSError, ValueError):
            return False

    def _models(self):
        try:
            with self._call("GET", "/models") as resp:
                return json.load(resp).get("models", [])
        except (OSError, ValueError):
            return []

    def generate(self, messages):
        """Yield text pieces from rkllama's stream, read to its end.

        Like the fork: rkllama gets one user message (the first user turn the fork finds in the
        templated prompt: history and system prompt are dropped), and any failure of /generate
        (400 after an rkllama restart, 500, timeout, refused connection) just ends the answer,
        so the client gets 200 with whatever came so far, usually nothing.
        """
        users = [m for m in messages if m.get("role") == "user"]
        content = str(users[0].get("content", "")) if users else "\n".join(str(m.get("content", "")) for m in messages)
        try:
            with self._call("POST", "/generate", {"messages": [{"role": "user", "content": content}], "stream": True}) as resp:
                buf = b""
                for line in resp:
                    buf += line
                    if line.strip() == b"" and buf.strip():
                        piece = json.loads(buf)
                        buf = b""
                        yield piece["choices"][0].get("content") or ""
                if buf.strip():
                    yield json.loads(buf)["choices"][0].get("content") or ""
        except (OSError, ValueError, KeyError, IndexError) as exc:
            sys.stderr.write(f"RKLLM stream error: {exc}\n")


class Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "exo-lab"
    _started = False

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        sys.stderr.write("%s %s\n" % (self.address_string(), format % args))

    def _send(self, code, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Exo-Node-Id", self.server.node_id)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # pylint: disable=invalid-name
        if self.path == "/healthcheck":
            self._send(200, {"status": "ok"})
        elif self.path in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "lab_build": self.server.build.get("version"),
                             "data": [{"id": m, "object": "model", "owned_by": "exo", "ready": True} for m in MODEL_MAP]})
        elif self.path == "/metrics":
            self._send(200, metrics.render().encode(), "text/plain; version=0.0.4")
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self):  # pylint: disable=invalid-name
        if self.path not in ("/v1/chat/completions", "/chat/completions"):
            self._send(404, {"detail": "Not Found"})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        model = body.get("model") or self.server.default_model
        stream = bool(body.get("stream"))
        self._started = False
        metrics.inc("exo_requests_in_progress", 1)
        start, status = time.time(), "error"
        try:
            if self.server.build.get("fault") == "bad_answers":
                self._send(500, {"detail": "Error processing prompt: lab build fault"})
                return
            if model not in MODEL_MAP or model.startswith("gpt-"):
                # The fork answers an unknown model (and any gpt-*) with its default model, not an error.
                model = self.server.default_model
            with self.server.engine.lock:
                status = self._complete(model, body.get("messages") or [], stream, start)
        except (OSError, urllib.error.URLError, ValueError, RuntimeError) as exc:
            if self._started:
                raise  # the client went away mid-stream: nothing more to send
            # Raised before the first byte is sent (rkllama down, load failed): the fork's 500.
            self._send(500, {"detail": f"Error processing prompt (see logs with DEBUG>=2): {exc}"})
        finally:
            metrics.inc("exo_requests_in_progress", -1)
            metrics.inc("exo_requests_total", 1, {"model": model or "", "status": status})
            metrics.observe("exo_request_duration_seconds", time.time() - start)

    def _complete(self, model, messages, stream, start):
        engine = self.server.engine
        engine.ensure_model(MODEL_MAP[model])
        cid, created = f"chatcmpl-{int(start * 1000)}", int(start)
        pieces, first = [], None
        if stream:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Exo-Node-Id", self.server.node_id)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._started = True
        infer_start = time.time()
        for piece in engine.generate(messages):
            if first is None:
                first = time.time()
                metrics.observe("exo_first_token_latency_seconds", first - start)
            pieces.append(piece)
            if stream:
                chunk = self._completion(cid, created, model, piece, None, stream=True)
                self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        elapsed = time.time() - infer_start
        metrics.observe("rkllm_inference_duration_seconds", elapsed)
        # The fork never sets exo_tokens_per_second (declared, never written: no sample is exported).
        # Streamed, it counts only the last chunk's tokens (one) into exo_tokens_generated_total.
        metrics.inc("exo_tokens_generated_total", 1 if stream else len(pieces) + 1, {"model": model})
        if stream:
            # The fork's end of a stream: one last chunk with finish_reason "stop" (the end-of-sequence
            # token, decoded to nothing here), no usage, no `data: [DONE]`; then the connection's body ends.
            final = self._completion(cid, created, model, "", "stop", stream=True)
            self._chunk(b"data: " + json.dumps(final).encode() + b"\n\n")
            self._chunk(b"")
        else:
            answer = self._completion(cid, created, model, "".join(pieces), "stop", stream=False)
            prompt_tokens = sum(len(str(m.get("content", ""))) // 4 + 1 for m in messages)
            answer["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces) + 1,
                               "total_tokens": prompt_tokens + len(pieces) + 1}
            self._send(200, answer)
        return "success"

    @staticmethod
    def _completion(cid, created, model, content, finish, stream):
        """The fork's generate_completion shape (delta when streamed, message otherwise)."""
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": "exo_0.0.1",
                "choices": [{"index": 0, "delta" if stream else "message": {"role": "assistant", "content": content},
                             "logprobs": None, "finish_reason": finish}]}

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def main(argv=None):
    args = parse_args(argv)
    build = lab_build()
    if build.get("fault") == "no_start":
        raise RuntimeError("lab build fault: this build does not start")
    if args.discovery_module == "manual":
        if not args.discovery_config_path:
            raise ValueError("--discovery-config-path is required when using manual discovery. Please provide a path to a config json file.")
        with open(args.discovery_config_path, encoding="utf-8") as f:
            peers = json.load(f)["peers"]
        if args.node_id not in peers:
            raise ValueError(f"Node {args.node_id} not found in the discovery config {args.discovery_config_path}")
    engine = Engine(os.environ.get("RKLLM_SERVER_HOST", "localhost"), int(os.environ.get("RKLLM_SERVER_PORT", "8080")),
                    args.chatgpt_api_response_timeout)
    server = ThreadingHTTPServer(("0.0.0.0", args.chatgpt_api_port), Api)
    server.daemon_threads = True
    server.engine, server.build = engine, build
    server.node_id = args.node_id or "exo-node"
    server.default_model = args.default_model or "qwen2.5-1.5b-instruct-rkllm"
    print(f"Chat interface started: http://0.0.0.0:{args.chatgpt_api_port} (lab build {build.get('version')})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
