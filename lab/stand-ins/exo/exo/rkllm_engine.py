"""The fork's RKLLM engine and its rkllama HTTP client (rkllm.fleet lab stand-in; stdlib only).

Imitates exo-rkllama 0c831d3: exo/inference/rkllm/rkllm_engine.py and rkllm_http_client.py, bugs included.
The fork runs on one asyncio loop; its HTTP calls to rkllama are aiohttp coroutines (not the
max_workers=1 executor, which only runs the tokenizer: rkllm_engine.py:81,114-118), so concurrent
requests reach rkllama concurrently: plain ones as concurrent `stream: false` calls, DeepSeek ones as
concurrent streams, each read by its own background task (rkllm_engine.py:405-423). Here each of
those is a thread; nothing serializes generations on exo's side.

Tokens: the stand-in has no tokenizer. A text is split into word pieces (what rkllama's stand-in
streams, one piece per token); EOS stands for the tokenizer's eos_token_id and decodes to "".
"""

import http.client
import json
import os
import re
import socket
import sys
import threading
import time

from exo import metrics

# Lab patch 0001-deepseek-stream-wait flips this (the fork's fix:
# roles/exo/files/patches/<commit>/0001-deepseek-stream-wait.patch). False = the fork: when a
# streamed model's token queue is still empty after one 10 ms wait, the engine returns EOS and the
# node ends the answer (rkllm_engine.py:363-382), which happens between any two tokens slower than
# 10 ms apart and whenever DeepSeek "thinks". True: wait for the next token or the stream's real end.
LAB_PATCH_STREAM_WAIT = False

EOS = None  # the tokenizer's eos_token_id (rkllm_engine.py:215-218)

# rkllm_engine.py:37-43
RKLLM_MODEL_MAPPING = {
    "deepseek-r1-1.5b-rkllm": "DeepSeek-R1-1.5B",
    "qwen2.5-1.5b-rkllm": "Qwen2.5-1.5B",
    "qwen2.5-1.5b-instruct-rkllm": "Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b-rkllm": "Qwen2.5-3B",
    "phi-3-mini-rkllm": "Phi-3-mini",
}
# rkllm_engine.py:55-59: only these are streamed from rkllama; every other model goes through /generate
# with stream: false and is replayed token by token afterwards.
STREAMING_MODELS = {"deepseek-r1-1.5b-rkllm", "deepseek-r1-7b-rkllm", "deepseek-r1-14b-rkllm"}

# rkllm_http_client.py:246-251 and 372-377: the first user turn is cut out of the templated prompt.
USER_MARKERS = [
    (r'<｜User｜>(.*?)<｜Assistant｜>', 1),
    (r'<\|user\|>(.*?)<\|assistant\|>', 1),
    (r'\[INST\](.*?)\[/INST\]', 1),
    (r'<\|im_start\|>user\n(.*?)<\|im_end\|>', 1),
]


def encode(text):
    """The stand-in's tokenizer: word pieces whose concatenation is the text."""
    return re.findall(r"\s*\S+|\s+", text or "")


def rkllama_name(model_id):
    """rkllm_engine.py:595-611: the mapping, else a name derived from the id (qwen2.5-7b-rkllm -> Qwen2.5-7b)."""
    model_id = model_id.lower()
    if model_id in RKLLM_MODEL_MAPPING:
        return RKLLM_MODEL_MAPPING[model_id]
    name = model_id.replace("-rkllm", "").replace("_rkllm", "")
    return "-".join(p.capitalize() for p in name.replace("_", "-").split("-"))


def client_timeout():
    """rkllm_http_client.py:22,44-49: a fixed aiohttp ClientTimeout(total=300) on every call to rkllama,
    not configurable in the fork. RKLLM_LAB_EXO_CLIENT_TIMEOUT overrides it for the lab's tests only
    (so a test needs no 5-minute generation); unset, it is the fork's 300 s."""
    return float(os.environ.get("RKLLM_LAB_EXO_CLIENT_TIMEOUT", "300"))


class _Call:
    """One HTTP call to rkllama under a total deadline (aiohttp's `total` covers connect, wait and body)."""

    def __init__(self, host, port, method, path, body=None):
        self.timed_out = False
        total = client_timeout()
        self.conn = http.client.HTTPConnection(host, port, timeout=total)
        self.timer = threading.Timer(total, self._cut)
        self.timer.daemon = True
        self.timer.start()
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        self.resp = self.conn.getresponse()

    def _cut(self):
        self.timed_out = True
        self.close()

    def close(self):
        self.timer.cancel()
        try:
            if self.conn.sock is not None:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()


class HTTPClient:
    """rkllm_http_client.py: every failure becomes False, [], None or "" (never an exception)."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.base_url = f"http://{host}:{port}"

    def _json(self, method, path, body=None):
        call = _Call(self.host, self.port, method, path, body)
        try:
            raw = call.resp.read()
            return call.resp.status, (json.loads(raw) if raw else None)
        finally:
            call.close()

    def health_check(self):  # rkllm_http_client.py:57-68
        try:
            return self._json("GET", "/")[0] == 200
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def list_models(self):  # rkllm_http_client.py:70-82
        try:
            status, data = self._json("GET", "/models")
            return data.get("models", []) if status == 200 else []
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            return []

    def get_current_model(self):  # rkllm_http_client.py:84-96
        try:
            status, data = self._json("GET", "/current_model")
            return data.get("model_name") if status == 200 else None
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            return None

    def load_model(self, name):  # rkllm_http_client.py:98-152
        current = self.get_current_model()
        if current == name:
            return True
        if current:
            self.unload_model()
        try:
            return self._json("POST", "/load_model", {"model_name": name})[0] == 200
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def unload_model(self):  # rkllm_http_client.py:154-166
        try:
            return self._json("POST", "/unload_model")[0] == 200
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def generate(self, messages):
        """rkllm_http_client.py:168-227 with stream=False: the whole answer at once; a timeout,
        a non-200 (400 after rkllama restarted without the model) or any error gives ""."""
        try:
            status, data = self._json("POST", "/generate", {"messages": messages, "stream": False})
            if status == 200 and data and data.get("choices"):
                return data["choices"][0].get("content", "")
            return ""
        except (OSError, ValueError, AttributeError, http.client.HTTPException) as exc:
            sys.stderr.write(f"RKLLM generate failed: {exc}\n")
            return ""

    @staticmethod
    def _messages(prompt):
        for pattern, group in USER_MARKERS:
            match = re.search(pattern, prompt, re.DOTALL | re.IGNORECASE)
            if match:
                return [{"role": "user", "content": match.group(group).strip()}]
        return [{"role": "user", "content": prompt}]

    def generate_from_prompt(self, prompt):  # rkllm_http_client.py:229-269
        return self.generate(self._messages(prompt))

    def generate_from_prompt_stream(self, prompt, holder=None):
        """rkllm_http_client.py:271-394: yield (text, finished) per rkllama chunk, line by line; the
        stream ends quietly on a timeout, an error or the connection's end (rkllama's chunks never
        say "stop", so in practice only the connection's end ends it)."""
        try:
            call = _Call(self.host, self.port, "POST", "/generate", {"messages": self._messages(prompt), "stream": True})
        except (OSError, http.client.HTTPException) as exc:
            sys.stderr.write(f"RKLLM stream failed: {exc}\n")
            return
        if holder is not None:
            holder.append(call)
        try:
            if call.resp.status != 200:
                return
            while True:
                line = call.resp.readline()
                if not line:
                    return
                for json_str in line.decode("utf-8").strip().split("\n\n"):
                    if not json_str.strip():
                        continue
                    try:
                        data = json.loads(json_str)
                    except ValueError:
                        continue
                    if data.get("choices"):
                        choice = data["choices"][0]
                        content = choice.get("content", "")
                        finished = choice.get("finish_reason") == "stop"
                        if content:
                            yield content, finished
                        if finished:
                            return
        except (OSError, ValueError, http.client.HTTPException) as exc:
            sys.stderr.write(f"RKLLM stream {'timed out' if call.timed_out else 'failed'}: {exc}\n")
        finally:
            call.close()


class Engine:
    """RKLLMInferenceEngine (rkllm_engine.py:62-624), HTTP mode."""

    def __init__(self, host, port):
        self.client = HTTPClient(host, port)
        self.shard = None
        self._model_loaded = False
        self._use_streaming = False
        self._shard_lock = threading.Lock()
        self.session = {}
        self._stream_tasks = {}

    def ensure_shard(self, model_id):
        """rkllm_engine.py:493-593: checks rkllama and loads only when the model changes. After that it
        checks nothing: rkllama restarted without the model => every answer is an empty 200."""
        with self._shard_lock:
            if self.shard == model_id and self._model_loaded:
                return
            up = self.client.health_check()
            metrics.set_gauge("rkllm_server_up", 1 if up else 0)  # the only place it is set (rkllm_engine.py:506)
            metrics.inc("rkllm_http_requests_total", 1, {"endpoint": "/health", "status": "success" if up else "error"})
            if not up:
                raise RuntimeError(f"RKLLM server not available at {self.client.base_url}. Please start the rkllama server with: "
                                   f"python server.py --target_platform rk3588 --port {self.client.port}")
            name = rkllama_name(model_id)
            start = time.time()
            ok = self.client.load_model(name)
            metrics.observe("rkllm_model_load_duration_seconds", time.time() - start)
            metrics.inc("rkllm_http_requests_total", 1, {"endpoint": "/load_model", "status": "success" if ok else "error"})
            if not ok:
                raise RuntimeError(f"Failed to load RKLLM model: {name}. Available models: {self.client.list_models()}")
            self._model_loaded = True
            self.shard = model_id
            self.session = {}  # rkllm_engine.py:585: a model switch drops every request's state
            self._use_streaming = model_id.lower() in STREAMING_MODELS  # rkllm_engine.py:588

    def infer_tensor(self, request_id, model_id, input_text):
        """rkllm_engine.py:182-313. input_text: the prompt on the first call, then the previous token."""
        self.ensure_shard(model_id)
        cache_key, index_key = f"response_tokens_{request_id}", f"token_index_{request_id}"
        if self._use_streaming:
            return self._infer_tensor_streaming(request_id, input_text)
        if cache_key in self.session:  # rkllm_engine.py:236-263: replay the cached answer, then EOS
            cached, index = self.session[cache_key], self.session.get(index_key, 0)
            if index < len(cached):
                self.session[index_key] = index + 1
                return cached[index]
            del self.session[cache_key]
            self.session.pop(index_key, None)
            return EOS
        # rkllm_engine.py:284-313: the whole generation first (stream: false), then the first token.
        start = time.time()
        text = self.client.generate_from_prompt(input_text or "")
        metrics.observe("rkllm_inference_duration_seconds", time.time() - start)
        metrics.inc("rkllm_http_requests_total", 1, {"endpoint": "/generate", "status": "success" if text else "error"})
        tokens = encode(text)
        if tokens:
            self.session[cache_key] = tokens
            self.session[index_key] = 1
            return tokens[0]
        return EOS

    def _infer_tensor_streaming(self, request_id, input_text):
        """rkllm_engine.py:315-458."""
        queue_key, done_key = f"stream_queue_{request_id}", f"stream_done_{request_id}"
        if queue_key in self.session:
            queue = self.session[queue_key]
            if queue:  # rkllm_engine.py:339-353
                return queue.pop(0)
            if self.session.get(done_key, False):  # rkllm_engine.py:356-362
                self._cleanup_stream_session(request_id)
                return EOS
            if LAB_PATCH_STREAM_WAIT:
                # 0001-deepseek-stream-wait: wait for the next token or the stream's real end.
                while not queue and not self.session.get(done_key, True):
                    time.sleep(0.01)
            else:
                time.sleep(0.01)  # rkllm_engine.py:365: one 10 ms wait ...
            if queue:  # rkllm_engine.py:368-378
                return queue.pop(0)
            if LAB_PATCH_STREAM_WAIT:
                self._cleanup_stream_session(request_id)
            # rkllm_engine.py:380-382: ... then EOS, and the node ends the answer. The stream task is
            # neither cancelled nor awaited: it keeps reading rkllama's generation into a queue nobody reads.
            return EOS

        # rkllm_engine.py:400-423: first call, start the stream task.
        self.session[queue_key] = []
        self.session[done_key] = False
        holder = []

        def stream_tokens():
            start = time.time()
            try:
                for text, finished in self.client.generate_from_prompt_stream(input_text or "", holder):
                    if queue_key in self.session:
                        self.session[queue_key].append(text)
                    if finished:
                        break
            finally:
                if done_key in self.session:
                    self.session[done_key] = True
                if metrics.LAB_PATCH_STREAM_METRICS:
                    # 0002-stream-metrics: the streamed generation's time, as the plain path records it.
                    metrics.observe("rkllm_inference_duration_seconds", time.time() - start)

        task = threading.Thread(target=stream_tokens, daemon=True)
        self._stream_tasks[request_id] = (task, holder)
        task.start()
        # rkllm_engine.py:425-458: poll every 0.1 s, up to 60 s, for the first token; a model that thinks
        # longer than that (rkllama sends nothing meanwhile) gets an empty answer. 0001 waits for the
        # first token or the stream's end (the client's 300 s timeout still bounds it).
        max_wait = float("inf") if LAB_PATCH_STREAM_WAIT else 60
        total_wait = 0.0
        while total_wait < max_wait:
            time.sleep(0.1)
            total_wait += 0.1
            if self.session.get(queue_key):
                return self.session[queue_key].pop(0)
            if self.session.get(done_key, False):
                break
        self._cleanup_stream_session(request_id)
        return EOS

    def _cleanup_stream_session(self, request_id):
        """rkllm_engine.py:460-476 (task.cancel() closes the connection to rkllama)."""
        for key in (f"stream_queue_{request_id}", f"stream_done_{request_id}",
                    f"response_tokens_{request_id}", f"token_index_{request_id}"):
            self.session.pop(key, None)
        task = self._stream_tasks.pop(request_id, None)
        if task is not None and task[0].is_alive():
            for call in task[1]:
                call.close()
