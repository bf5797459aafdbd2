"""Unit tests for rkllm.fleet.chat_load against a local threaded HTTP server playing exo behind the gateway."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ansible_collections.rkllm.fleet.plugins.modules import chat_load


class FakeExo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-exo"

    def log_message(self, *args):
        pass

    def _send(self, status, body, content_type="application/json", headers=None):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self._answered()
        self.wfile.write(data)

    def _answered(self):
        """The request is answered: count it out of in_flight BEFORE its last bytes go out, since the
        client sends its next request as soon as it has read them (issue #15: decrementing afterwards
        let a serial client's next request arrive first, and max_in_flight read 2 one run in three)."""
        if not self._counted_out:
            self._counted_out = True
            with self.server.lock:
                self.server.in_flight -= 1

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append({"body": body, "auth": self.headers.get("Authorization")})
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            n = len(srv.requests)
        self._counted_out = False
        try:
            mode = srv.mode(n) if callable(srv.mode) else srv.mode
            headers = {}
            if srv.boards:
                headers["X-Rkllm-Board"] = srv.boards[(n - 1) % len(srv.boards)]
            if mode == "500":
                self._send(502, json.dumps({"error": {"message": "No board answered."}}), headers=headers)
                return
            if mode == "empty":
                answer = {"choices": [{"message": {"role": "assistant", "content": ""}}]}
                self._send(200, json.dumps(answer), headers=headers)
                return
            if mode == "garbage":
                self._send(200, "<html>oops</html>", "text/html", headers=headers)
                return
            time.sleep(srv.delay)
            if body["stream"]:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                for i, word in enumerate(srv.words):
                    last = i == len(srv.words) - 1 and mode == "finish-no-done"
                    chunk = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": "stop" if last else None}]}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                    time.sleep(srv.chunk_delay)
                self._answered()
                if mode not in ("no-done", "finish-no-done"):
                    self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True
                return
            answer = {"choices": [{"message": {"role": "assistant", "content": " ".join(srv.words)}}],
                      "usage": {"completion_tokens": srv.usage_tokens}}
            self._send(200, json.dumps(answer), headers=headers)
        finally:
            self._answered()


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeExo)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.requests = []
    srv.in_flight = 0
    srv.max_in_flight = 0
    srv.mode = "ok"
    srv.delay = 0.0
    srv.chunk_delay = 0.0
    srv.words = ["Paris", " is", " the", " capital", "."]
    srv.usage_tokens = 7
    srv.boards = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = "http://127.0.0.1:%d" % srv.server_address[1]
    yield srv
    srv.shutdown()
    srv.server_close()


def params(url, **overrides):
    spec = chat_load.argument_spec()
    values = {name: opt.get("default") for name, opt in spec.items()}
    values.update(url=url, model="qwen2.5-1.5b-instruct-rkllm", timeout=10, duration=30)
    values.update(overrides)
    return values


def run(url, **overrides):
    return chat_load.LoadRun(params(url, **overrides)).run()


def test_streamed_requests_count_chunks_and_measure_ttft(server):
    server.delay = 0.2
    result = run(server.url, requests=3, stream=True, api_key="sekrit")
    assert (result["sent"], result["succeeded"], result["failed_requests"]) == (3, 3, 0)
    assert result["completion_tokens"] == 3 * len(server.words)
    assert result["time_to_first_token"]["p50"] >= 0.2
    assert result["latency"]["max"] >= result["time_to_first_token"]["p95"]
    assert result["tokens_per_second"] == pytest.approx(result["completion_tokens"] / result["elapsed"], rel=0.01)
    assert server.requests[0]["body"]["stream"] is True
    assert server.requests[0]["body"]["model"] == "qwen2.5-1.5b-instruct-rkllm"
    assert server.requests[0]["auth"] == "Bearer sekrit"
    assert result["stopped_by"] == "requests"


def test_plain_requests_use_reported_usage(server):
    server.usage_tokens = 11
    result = run(server.url, requests=2, stream=False)
    assert result["succeeded"] == 2
    assert result["completion_tokens"] == 22
    assert result["time_to_first_token"] == {"p50": None, "p95": None}
    assert server.requests[0]["auth"] is None


def test_stream_is_read_to_its_end(server):
    server.chunk_delay = 0.1
    result = run(server.url, requests=1, stream=True)
    assert result["succeeded"] == 1
    assert result["latency"]["p50"] >= 0.1 * len(server.words)


def test_a_stream_ending_with_a_finish_reason_is_complete(server):
    # exo-rkllama closes its streams after the chunk with a finish_reason, without data: [DONE].
    server.mode = "finish-no-done"
    result = run(server.url, requests=2, stream=True)
    assert (result["succeeded"], result["failed_requests"]) == (2, 0)


@pytest.mark.parametrize("mode, stream, sentence", [
    ("500", True, "HTTP 502"),
    ("empty", False, "Empty answer"),
    ("garbage", False, "Malformed answer"),
    ("no-done", True, "ended before its last chunk"),
])
def test_failures_are_counted_with_their_sentence(server, mode, stream, sentence):
    server.mode = mode
    result = run(server.url, requests=3, stream=stream)
    assert (result["sent"], result["succeeded"], result["failed_requests"]) == (3, 0, 3)
    assert len(result["errors"]) == 1
    assert sentence in result["errors"][0]["error"]
    assert result["errors"][0]["count"] == 3
    assert result["latency"]["p50"] is None


def test_http_error_message_from_the_body_is_reported(server):
    server.mode = "500"
    result = run(server.url, requests=1)
    assert "No board answered." in result["errors"][0]["error"]


def test_exo_detail_is_reported():
    assert chat_load.error_detail('{"detail": "Unsupported model: x"}') == "Unsupported model: x"
    assert chat_load.error_detail('{"error": "busy"}') == "busy"
    assert chat_load.error_detail("<html>502</html>") == "<html>502</html>"


def test_mixed_results_rank_errors_by_count(server):
    server.mode = lambda n: "500" if n % 2 else "ok"
    result = run(server.url, requests=6, stream=False)
    assert (result["succeeded"], result["failed_requests"]) == (3, 3)
    assert result["errors"][0]["count"] == 3


def test_connection_refused_is_a_failure_not_a_crash():
    result = run("http://127.0.0.1:9", requests=2)
    assert result["failed_requests"] == 2
    assert "Connection to http://127.0.0.1:9" in result["errors"][0]["error"]


def test_timeout_fails_the_request(server):
    server.delay = 2
    result = run(server.url, requests=1, timeout=0.5)
    assert result["failed_requests"] == 1
    assert "Timed out" in result["errors"][0]["error"]


class DripServer(object):
    """A server that answers one byte every `interval` seconds for ever: in the status line, in a plain
    body whose Content-Length it never reaches, or in a stream line that never ends. Each byte resets a
    socket timeout, so only a total deadline per request ends such a request."""

    HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %s\r\n\r\n"

    def __init__(self, where, interval):
        self.where, self.interval = where, interval
        self.stop = threading.Event()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn = self.listener.accept()[0]
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn):
        with conn:
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            if self.where == "headers":
                head, payload = b"", b"HTTP/1.1 200 OK\r\n"
            elif self.where == "plain-body":
                head, payload = self.HEAD % (b"application/json", b"1000000"), b'{"choices": ['
            else:  # a stream whose first data line never ends
                head, payload = self.HEAD % (b"text/event-stream", b"1000000"), b'data: {"choices": [{"delta": {"content": "P'
            try:
                conn.sendall(head)
                i = 0
                while not self.stop.wait(self.interval):
                    conn.sendall(payload[i % len(payload):i % len(payload) + 1])
                    i += 1
            except OSError:
                return  # the client gave up

    def close(self):
        self.stop.set()
        self.listener.close()


@pytest.mark.parametrize("where, stream", [("headers", False), ("plain-body", False), ("stream-line", True)])
def test_a_dripping_server_cannot_keep_a_request_past_its_timeout(where, stream):
    # Issue #13: a byte every 2 s kept a request alive for ever (each read's socket timeout was 3 s);
    # without the total deadline this run ends only at duration + 5 s, with "Still waiting ...".
    drip = DripServer(where, interval=2.0)
    try:
        started = time.time()
        result = run(drip.url, requests=1, stream=stream, timeout=3, duration=20)
        took = time.time() - started
    finally:
        drip.close()
    assert result["failed_requests"] == 1
    assert "Timed out waiting for" in result["errors"][0]["error"], result["errors"]
    assert 2.9 <= took < 5, took


def test_concurrency_is_actually_concurrent(server):
    server.delay = 0.5
    started = time.time()
    result = run(server.url, requests=4, concurrency=4, stream=False)
    assert result["succeeded"] == 4
    assert server.max_in_flight == 4
    assert time.time() - started < 1.5  # serial would take 2 s


def test_single_client_is_serial(server):
    server.delay = 0.1
    run(server.url, requests=3, concurrency=1, stream=False)
    assert server.max_in_flight == 1


def test_duration_caps_the_run(server):
    server.delay = 0.2
    started = time.time()
    result = run(server.url, requests=1000, duration=1.0, stream=False)
    assert time.time() - started < 3
    assert result["stopped_by"] == "duration"
    assert 0 < result["sent"] < 1000


def test_duration_abandons_a_request_in_flight(server):
    server.delay = 5
    started = time.time()
    result = run(server.url, requests=1, duration=0.5, timeout=60, stream=False)
    assert time.time() - started < 3
    assert result["failed_requests"] == 1


def test_stop_file_keeps_sending_until_it_exists(server, tmp_path):
    stop = tmp_path / "stop"
    server.delay = 0.05

    def create_later():
        time.sleep(0.8)
        stop.write_text("")

    threading.Thread(target=create_later).start()
    started = time.time()
    result = run(server.url, requests=2, stop_file=str(stop), stream=False)
    assert time.time() - started >= 0.8
    assert result["sent"] > 2
    assert result["stopped_by"] == "stop_file"


def test_stop_file_still_sends_the_minimum(server, tmp_path):
    stop = tmp_path / "stop"
    stop.write_text("")
    result = run(server.url, requests=3, stop_file=str(stop), stream=False)
    assert result["sent"] == 3


def test_by_board_counts_the_header(server):
    server.boards = ["rock5b-1", "opi5-1"]
    result = run(server.url, requests=4, stream=False)
    assert result["by_board"] == {"rock5b-1": 2, "opi5-1": 2}


def test_by_board_is_empty_without_a_header(server):
    result = run(server.url, requests=2, stream=False)
    assert result["by_board"] == {}


def test_record_file_has_one_line_per_request(server, tmp_path):
    record = tmp_path / "load.jsonl"
    server.boards = ["b1"]
    server.mode = lambda n: "500" if n == 2 else "ok"
    run(server.url, requests=3, record_file=str(record), stream=True)
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(lines) == 3
    assert sorted(line["status"] for line in lines) == [200, 200, 502]
    assert all(line["end"] >= line["start"] >= 0 for line in lines)
    assert {line["board"] for line in lines} == {"b1"}
    assert sum(1 for line in lines if line["error"]) == 1
    assert all(line["ttft"] is not None for line in lines if not line["error"])


@pytest.mark.parametrize("overrides, word", [
    ({"url": "127.0.0.1:18080"}, "url"),
    ({"concurrency": 0}, "concurrency"),
    ({"requests": 0}, "requests"),
    ({"duration": 0}, "duration"),
    ({"timeout": -1}, "timeout"),
])
def test_bad_options_are_named(overrides, word):
    values = params("http://x")
    values.update(overrides)
    problems = chat_load.validate_options(values)
    assert len(problems) == 1 and problems[0].startswith(word)


def test_good_options_pass():
    assert chat_load.validate_options(params("https://gw.example:8443")) == []


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert chat_load.percentile(values, 50) == 50
    assert chat_load.percentile(values, 95) == 95
    assert chat_load.percentile([3.0], 95) == 3.0
    assert chat_load.percentile([], 50) is None
