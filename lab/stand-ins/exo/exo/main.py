"""exo-rkllama lab stand-in: `python -m exo.main` (rkllm.fleet lab only; not exo).

The API imitates exo/api/chatgpt_api.py and the node exo/orchestration/node.py of exo-rkllama 0c831d3;
the engine is exo/rkllm_engine.py here. File:line references are to the fork at that commit.
"""

import argparse
import json
import os
import queue
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if sys.version_info < (3, 12):
    raise SystemExit("exo requires Python 3.12 or newer")

from exo import metrics  # noqa: E402  (after the version gate, as the fork's imports would fail)
from exo.rkllm_engine import EOS, Engine, encode  # noqa: E402

ENGINE_CLASS = "RKLLMInferenceEngine"
# exo/inference/rkllm/models.py:12-37: the only model cards with a repo for the RKLLM engine.
RKLLM_MODELS = ["qwen2.5-1.5b-rkllm", "qwen2.5-1.5b-instruct-rkllm", "qwen2.5-3b-rkllm", "qwen2.5-7b-rkllm",
                "deepseek-r1-1.5b-rkllm", "phi-3-mini-rkllm"]
# exo/models.py:4-156: the built-in cards (no RKLLM repo); they are "known" models, so they pass the
# model_cards check (chatgpt_api.py:349) and then get 400 (chatgpt_api.py:353-361).
BUILTIN_MODELS = [
    "llama-3.3-70b", "llama-3.2-1b", "llama-3.2-1b-8bit", "llama-3.2-3b", "llama-3.2-3b-8bit", "llama-3.2-3b-bf16",
    "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-70b-bf16", "llama-3-8b", "llama-3-70b", "llama-3.1-405b",
    "llama-3.1-405b-8bit", "mistral-nemo", "mistral-large", "deepseek-coder-v2-lite", "deepseek-coder-v2.5",
    "deepseek-v3", "deepseek-v3-3bit", "deepseek-r1", "deepseek-r1-3bit", "deepseek-r1-distill-qwen-1.5b",
    "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-qwen-14b", "deepseek-r1-distill-qwen-32b",
    "deepseek-r1-distill-llama-8b", "deepseek-r1-distill-llama-70b", "llava-1.5-7b-hf", "qwen-2.5-0.5b",
    "qwen-2.5-1.5b", "qwen-2.5-coder-1.5b", "qwen-2.5-3b", "qwen-2.5-coder-3b", "qwen-2.5-7b", "qwen-2.5-coder-7b",
    "qwen-2.5-math-7b", "qwen-2.5-14b", "qwen-2.5-coder-14b", "qwen-2.5-32b", "qwen-2.5-coder-32b", "qwen-2.5-72b",
    "qwen-2.5-math-72b", "nemotron-70b", "nemotron-70b-bf16", "gemma2-9b", "gemma2-27b", "stable-diffusion-2-1-base",
    "phi-3.5-mini", "phi-4", "dummy",
]
MODEL_CARDS = BUILTIN_MODELS + RKLLM_MODELS  # exo/models.py:157-160 appends the RKLLM cards
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lab_build():
    try:
        with open(os.path.join(HERE, "lab_build.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"version": "dev", "fault": None}


def parse_args(argv=None):
    # exo/main.py:40-100 (the flags the roles and tests use; defaults as the fork's)
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


def build_prompt(messages):
    """A chat-templated prompt (chatgpt_api.py:141-160); the engine's client cuts the first user turn back out."""
    out = [f"<|im_start|>{m.get('role')}\n{m.get('content')}<|im_end|>\n" for m in messages]
    return "".join(out) + "<|im_start|>assistant\n"


class Node:
    """exo/orchestration/node.py: one token per step, each step a new task; the answer ends at EOS or
    at --max-generate-tokens (node.py:116-154). Nothing serializes two requests."""

    def __init__(self, engine, max_generate_tokens):
        self.engine = engine
        self.max_generate_tokens = max_generate_tokens

    def process_prompt(self, model_id, prompt, request_id, on_token):
        """node.py:157-216: returns once the first token is out (for a plain model: after the whole generation)."""
        token = self.engine.infer_tensor(request_id, model_id, prompt)
        buffered = []
        if self._process_inference_result(token, buffered, on_token):
            return
        threading.Thread(target=self._forward, args=(model_id, request_id, buffered, on_token), daemon=True).start()

    def _forward(self, model_id, request_id, buffered, on_token):
        """node.py:355-388,432-451: the following steps feed each token back to the engine."""
        try:
            while True:
                token = self.engine.infer_tensor(request_id, model_id, buffered[-1])
                if self._process_inference_result(token, buffered, on_token):
                    return
        except Exception as exc:  # pylint: disable=broad-except  (node.py:385-388 prints and drops the request)
            sys.stderr.write(f"Error processing tensor for shard {model_id}: {exc}\n")

    def _process_inference_result(self, token, buffered, on_token):
        """node.py:116-154; returns is_finished."""
        is_finished = len(buffered) >= self.max_generate_tokens
        if not is_finished:
            buffered.append(token)
            is_finished = token is EOS or len(buffered) >= self.max_generate_tokens
        on_token([buffered[-1]], is_finished)  # node.py:134,143: one token per callback
        return is_finished


class Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Python/3.12 aiohttp/3.10"

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        sys.stderr.write("%s %s\n" % (self.address_string(), format % args))

    def _send(self, code, body, ctype="application/json; charset=utf-8"):
        # No X-Exo-Node-Id (or any node) header: the fork never sends one.
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # pylint: disable=invalid-name
        if self.path == "/healthcheck":
            self._send(200, {"status": "ok"})
        elif self.path in ("/v1/models", "/models"):  # chatgpt_api.py:300-302: every model card
            self._send(200, {"object": "list", "lab_build": self.server.build.get("version"),
                             "data": [{"id": m, "object": "model", "owned_by": "exo", "ready": True} for m in MODEL_CARDS]})
        elif self.path == "/metrics":
            self._send(200, metrics.render().encode(), "text/plain; charset=utf-8")
        else:
            self._send(404, b"404: Not Found", "text/plain; charset=utf-8")

    def do_POST(self):  # pylint: disable=invalid-name
        if self.path not in ("/v1/chat/completions", "/chat/completions"):
            self._send(404, b"404: Not Found", "text/plain; charset=utf-8")
            return
        self._chat_completions()

    def _chat_completions(self):
        """chatgpt_api.py:334-502."""
        start, first_token_time, model_name, status = time.time(), None, "unknown", "success"
        metrics.inc("exo_requests_in_progress", 1)
        started = False
        try:
            data = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if self.server.build.get("fault") == "bad_answers":
                raise RuntimeError("lab build fault")
            stream = data.get("stream", False)
            # chatgpt_api.py:169-175,346-351: no model => the default model; gpt-* => the default model;
            # an id that is no model card => the default model. Without --default-model that is
            # llama-3.2-1b (chatgpt_api.py:203), which has no RKLLM repo => 400 below.
            model = data.get("model", self.server.default_model)
            messages = data["messages"]
            for msg in messages:
                if "role" not in msg or "content" not in msg:
                    raise ValueError(f"Invalid message: {msg}. Must have 'role' and 'content'")
            if model and model.startswith("gpt-"):
                model = self.server.default_model
            if not model or model not in MODEL_CARDS:
                model = self.server.default_model
            model_name = model
            if model not in RKLLM_MODELS:  # chatgpt_api.py:353-361 (build_base_shard: exo/models.py:263-268)
                status = "error"
                metrics.inc("exo_errors_total", 1, {"type": "unsupported_model", "model": model_name})
                self._send(400, {"detail": f"Unsupported model: {model} with inference engine {ENGINE_CLASS}. "
                                           f"Supported models for this engine: {RKLLM_MODELS}"})
                return
            prompt = build_prompt(messages)
            metrics.inc("exo_prompt_tokens_total", len(encode(prompt)), {"model": model_name})
            request_id = str(uuid.uuid4())
            tokens_q = queue.Queue()
            # chatgpt_api.py:383: the handler waits for process_prompt, i.e. until the first token is out.
            # For every model but DeepSeek that is after the whole generation, so a streamed answer's
            # headers and first token reach the client only when rkllama has finished.
            self.server.node.process_prompt(model, prompt, request_id, lambda toks, fin: tokens_q.put((toks, fin)))
            timeout = self.server.response_timeout
            if stream:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                started = True
                total_tokens = 0
                while True:  # chatgpt_api.py:400-441
                    toks, finished = tokens_q.get(timeout=timeout)
                    if first_token_time is None:
                        first_token_time = time.time()
                        metrics.observe("exo_first_token_latency_seconds", first_token_time - start)
                    if metrics.LAB_PATCH_STREAM_METRICS:
                        total_tokens += len(toks)  # 0002-stream-metrics: every batch counts
                    else:
                        total_tokens = len(toks)  # chatgpt_api.py:413: only the last batch (1 token) counts
                    finish = ("stop" if toks[-1] is EOS else "length") if finished else None
                    chunk = self._completion(request_id, model, toks, finish, stream=True)
                    self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    if finished:
                        break
                # No usage chunk and no `data: [DONE]`: the body just ends (chatgpt_api.py:439).
                self._chunk(b"")
                metrics.inc("exo_tokens_generated_total", total_tokens, {"model": model_name})
                return
            tokens = []
            while True:  # chatgpt_api.py:466-477
                toks, finished = tokens_q.get(timeout=timeout)
                if first_token_time is None:
                    first_token_time = time.time()
                    metrics.observe("exo_first_token_latency_seconds", first_token_time - start)
                tokens.extend(toks)
                if finished:
                    break
            metrics.inc("exo_tokens_generated_total", len(tokens), {"model": model_name})
            answer = self._completion(request_id, model, tokens, "stop" if tokens[-1] is EOS else "length", stream=False)
            prompt_tokens = len(encode(prompt))
            answer["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                               "total_tokens": prompt_tokens + len(tokens)}
            self._send(200, answer)
        except queue.Empty:
            status = "timeout"
            metrics.inc("exo_errors_total", 1, {"type": "timeout", "model": model_name})
            if not started:
                self._send(408, {"detail": "Response generation timed out"})
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            status = "error"
            if started:
                return  # the client went away mid-stream: nothing more to send
            metrics.inc("exo_errors_total", 1, {"type": "exception", "model": model_name})
            # chatgpt_api.py:493-497 (rkllama down before the first load, a failed load, a bad body)
            self._send(500, {"detail": f"Error processing prompt (see logs with DEBUG>=2): {exc}"})
        finally:
            metrics.inc("exo_requests_in_progress", -1)
            metrics.observe("exo_request_duration_seconds", time.time() - start)
            metrics.inc("exo_requests_total", 1, {"model": model_name, "status": status})

    @staticmethod
    def _completion(request_id, model, tokens, finish, stream):
        """chatgpt_api.py:64-104 (EOS decodes to "" here)."""
        content = "".join(t for t in tokens if t is not EOS)
        return {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
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
    # rkllm_engine.py:86-89: RKLLM_SERVER_HOST / RKLLM_SERVER_PORT
    engine = Engine(os.environ.get("RKLLM_SERVER_HOST", "localhost"), int(os.environ.get("RKLLM_SERVER_PORT", "8080")))
    server = ThreadingHTTPServer(("0.0.0.0", args.chatgpt_api_port), Api)
    server.daemon_threads = True
    server.build = build
    server.node = Node(engine, args.max_generate_tokens)
    server.response_timeout = args.chatgpt_api_response_timeout
    server.default_model = args.default_model or "llama-3.2-1b"  # chatgpt_api.py:203
    print(f"Chat interface started: http://0.0.0.0:{args.chatgpt_api_port} (lab build {build.get('version')})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
