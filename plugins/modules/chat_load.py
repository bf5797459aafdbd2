#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: chat_load
short_description: Send a bounded load of chat completions to an OpenAI-compatible endpoint and measure it
version_added: 1.0.0
description:
  - Sends chat completions to C(<url>/v1/chat/completions) from O(concurrency) concurrent clients and reports what a user
    of the endpoint would measure, latency, time to first token, aggregate tokens per second, and which board answered.
  - Every response is read to its end, streamed or not, so a board is never left generating for a client that went away.
  - The load is bounded. It stops after O(requests) requests, or, when O(stop_file) is set, once that file exists and at
    least O(requests) were sent. O(duration) is a hard cap on the whole run in every case.
  - A request fails on a connection error, a non-2xx status, a malformed or empty answer, or a timeout. Failed requests
    are data, not a task failure; the task fails only on bad options. Assert on the returned figures.
author:
  - rkllm.fleet developers (@rkllm)
extends_documentation_fragment: [ansible.builtin.action_common_attributes, rkllm.fleet.attributes]
attributes:
  check_mode:
    details:
      - Sends nothing and returns zero counts.
  platform:
    details:
      - Runs wherever it is delegated, normally the controller or a gateway host. The boards' exo port is reachable
        from the gateway hosts only.
options:
  url:
    description:
      - Base URL of the OpenAI-compatible API, without C(/v1), for example C(http://127.0.0.1:18080) or C(http://board:52415).
    type: str
    required: true
  model:
    description:
      - Model id sent in each request, for example C(qwen2.5-1.5b-instruct-rkllm).
    type: str
    required: true
  api_key:
    description:
      - 'Sent as C(Authorization: Bearer <api_key>). Unset, no Authorization header is sent.'
    type: str
  concurrency:
    description:
      - Number of concurrent clients. Each sends its next request when its previous answer has been read to its end.
    type: int
    default: 1
  requests:
    description:
      - Requests to send in total. With O(stop_file), the minimum to send before the stop file is honoured.
    type: int
    default: 1
  duration:
    description:
      - Hard cap on the run, in seconds. No request is started after it, and requests in flight are abandoned
        (counted as failed with a timeout) when it is reached.
    type: float
    default: 600
  stop_file:
    description:
      - Keep sending until this path exists on the host the module runs on and at least O(requests) were sent.
      - 'Meant for a load run with C(async) and C(poll: 0) during an upgrade, stopped by creating the file afterwards.'
    type: path
  stream:
    description:
      - Ask for a streamed answer (server-sent events). Time to first token is measured only for streams.
    type: bool
    default: true
  prompt:
    description:
      - The user message of every request.
    type: str
    default: "Answer in one short sentence: what is the capital of France?"
  max_tokens:
    description:
      - Sent as C(max_tokens) when set. Boards that ignore it answer until the model stops.
    type: int
  timeout:
    description:
      - Seconds one request may take, from sending it to reading the end of its answer. It is a total deadline,
        not an idle timeout, so a server that keeps sending a byte now and then cannot keep a request alive past it.
    type: float
    default: 300
  validate_certs:
    description:
      - Verify the server's TLS certificate for C(https) URLs.
    type: bool
    default: true
  record_file:
    description:
      - Write one JSON line per request to this path (replaced), with C(start) and C(end) (seconds since the run started),
        C(status), C(error), C(board), C(tokens) and C(ttft).
    type: path
notes:
  - Tokens are the answer's C(usage.completion_tokens) when the server reports it, else, for streams, the number of
    chunks that carried content.
  - The board is taken from the C(X-Rkllm-Board) response header that the rkllm.fleet gateway adds, else from exo's
    C(X-Exo-Node-Id) header; without either C(by_board) stays empty.
  - Proxy settings in the environment are ignored; the endpoint is reached directly.
"""

EXAMPLES = r"""
- name: Send 20 streamed completions through the gateway from 4 clients
  rkllm.fleet.chat_load:
    url: http://gateway.example.net
    model: qwen2.5-1.5b-instruct-rkllm
    api_key: "{{ gateway_api_key }}"
    concurrency: 4
    requests: 20
  delegate_to: localhost
  run_once: true
  register: load

- name: Require every request to succeed
  ansible.builtin.assert:
    that: load.failed_requests == 0
    fail_msg: "{{ load.errors }}"

- name: Keep a load running during an upgrade, stopped by a file
  rkllm.fleet.chat_load:
    url: http://gateway.example.net
    model: qwen2.5-1.5b-instruct-rkllm
    concurrency: 2
    requests: 10
    duration: 3600
    stop_file: /tmp/rkllm-upgrade-done
    record_file: /tmp/rkllm-upgrade-load.jsonl
  delegate_to: localhost
  run_once: true
  async: 3700
  poll: 0
  register: background_load
"""

RETURN = r"""
sent:
  description: Requests sent.
  returned: always
  type: int
  sample: 20
succeeded:
  description: Requests answered with a 2xx status and a well-formed, non-empty answer read to its end.
  returned: always
  type: int
  sample: 19
failed_requests:
  description: Requests that failed (C(sent - succeeded)).
  returned: always
  type: int
  sample: 1
errors:
  description: The first distinct error sentences, each with how many requests it hit, most frequent first.
  returned: always
  type: list
  elements: dict
  sample: [{"error": "HTTP 502 from http://gw/v1/chat/completions: Bad Gateway", "count": 1}]
completion_tokens:
  description: Tokens generated in the successful answers.
  returned: always
  type: int
  sample: 640
elapsed:
  description: Wall time of the run in seconds.
  returned: always
  type: float
  sample: 41.7
tokens_per_second:
  description: Aggregate throughput, RV(completion_tokens) divided by RV(elapsed).
  returned: always
  type: float
  sample: 15.35
requests_per_second:
  description: Successful requests divided by RV(elapsed).
  returned: always
  type: float
  sample: 0.46
latency:
  description: Seconds from sending a request to the end of its answer, over successful requests (null when none).
  returned: always
  type: dict
  sample: {"p50": 4.1, "p95": 8.3, "max": 8.9}
time_to_first_token:
  description: Seconds from sending a streamed request to its first content chunk (null values when not streamed).
  returned: always
  type: dict
  sample: {"p50": 0.31, "p95": 4.2}
by_board:
  description: Successful requests per board that answered, when the response names it.
  returned: always
  type: dict
  sample: {"rock5b-1": 7, "rock5b-2": 7, "opi5-1": 6}
stopped_by:
  description: Why sending stopped, C(requests), C(stop_file), C(duration), or C(check_mode) when nothing was sent.
  returned: always
  type: str
  sample: requests
"""

import io
import json
import os
import socket
import ssl
import threading
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.six.moves import http_client
from ansible.module_utils.six.moves.urllib.parse import urlsplit
from ansible.module_utils.common.text.converters import to_native

MAX_ERRORS = 5
BOARD_HEADERS = ("X-Rkllm-Board", "X-Exo-Node-Id")


class RequestFailed(Exception):
    pass


def percentile(values, pct):
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = int(-(-pct * len(ordered) // 100))  # ceil
    return ordered[max(rank, 1) - 1]


def _round(value, digits=3):
    return None if value is None else round(value, digits)


def validate_options(params):
    """Return one sentence per bad option (empty when all are fine)."""
    problems = []
    parts = urlsplit(params["url"])
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append("url must be http:// or https:// with a host, for example http://127.0.0.1:18080; got %r." % params["url"])
    for name in ("concurrency", "requests"):
        if params[name] < 1:
            problems.append("%s must be at least 1; got %s." % (name, params[name]))
    for name in ("duration", "timeout"):
        if params[name] <= 0:
            problems.append("%s must be more than 0 seconds; got %s." % (name, params[name]))
    if params.get("max_tokens") is not None and params["max_tokens"] < 1:
        problems.append("max_tokens must be at least 1; got %s." % params["max_tokens"])
    if not params["model"]:
        problems.append("model must name the model to ask, for example qwen2.5-1.5b-instruct-rkllm.")
    return problems


def build_body(params):
    body = {
        "model": params["model"],
        "messages": [{"role": "user", "content": params["prompt"]}],
        "stream": bool(params["stream"]),
    }
    if params.get("max_tokens"):
        body["max_tokens"] = params["max_tokens"]
    return json.dumps(body).encode("utf-8")


class DeadlineSocket(object):
    """A connected socket whose every read and write must end by one deadline.

    A socket timeout alone bounds each read, so a server that sends a byte every few seconds would
    keep a request alive for ever; here each read gets only the time left until the request's deadline.
    """

    def __init__(self, sock, deadline):
        self._sock = sock
        self._deadline = deadline
        self._files = 0
        self._close_pending = False

    def _arm(self):
        remaining = self._deadline - time.time()
        if remaining <= 0:
            raise socket.timeout("the request's deadline was reached")
        self._sock.settimeout(remaining)

    def recv_into(self, buffer, nbytes=0, flags=0):
        self._arm()
        return self._sock.recv_into(buffer, nbytes, flags)

    def recv(self, bufsize, flags=0):
        self._arm()
        return self._sock.recv(bufsize, flags)

    def sendall(self, data, flags=0):
        self._arm()
        return self._sock.sendall(data, flags)

    def makefile(self, mode="rb", buffering=None, **kwargs):
        # http.client reads the response through makefile("rb"): route its reads through recv_into above.
        self._files += 1
        return io.BufferedReader(socket.SocketIO(self, mode.replace("b", "") or "r"))

    def _decref_socketios(self):
        # Called by SocketIO.close(). Like socket.socket, the connection may close the socket while the
        # response still reads from it (a body that ends with the connection): close it with its last file.
        self._files -= 1
        if self._files <= 0 and self._close_pending:
            self._sock.close()

    def close(self):
        if self._files > 0:
            self._close_pending = True
        else:
            self._sock.close()

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _connection(url, timeout, validate_certs):
    parts = urlsplit(url)
    if parts.scheme == "https":
        context = ssl.create_default_context()
        if not validate_certs:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return http_client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout, context=context)
    return http_client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)


def _content_of(message):
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def read_plain(response, endpoint):
    raw = response.read()
    try:
        answer = json.loads(raw.decode("utf-8"))
        content = _content_of(answer["choices"][0]["message"])
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
        raise RequestFailed("Malformed answer from %s: not an OpenAI chat completion." % endpoint)
    if not content.strip():
        raise RequestFailed("Empty answer from %s: the completion has no content." % endpoint)
    usage = answer.get("usage") or {}
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return {"tokens": int(tokens) if isinstance(tokens, int) else 0, "ttft": None}


def read_stream(response, endpoint, started, deadline):
    """Read server-sent events to their end; return tokens and time to first token."""
    chunks_with_content = 0
    usage_tokens = None
    ttft = None
    done = False
    while True:
        if time.time() > deadline:
            raise RequestFailed("Timed out reading the stream from %s." % endpoint)
        line = response.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue  # keep reading to the end of the body
        try:
            chunk = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise RequestFailed("Malformed stream from %s: a data line is not JSON." % endpoint)
        if not isinstance(chunk, dict):
            raise RequestFailed("Malformed stream from %s: a chunk is not a JSON object." % endpoint)
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise RequestFailed("Error in the stream from %s: %s" % (endpoint, message))
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            usage_tokens = usage["completion_tokens"]
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                # exo-rkllama ends its streams with the chunk that carries a finish_reason and no
                # [DONE] line; OpenAI sends [DONE] as well. Either marks a complete answer.
                done = True
            if isinstance(choice, dict) and _content_of(choice.get("delta")):
                chunks_with_content += 1
                if ttft is None:
                    ttft = time.time() - started
    if not done:
        raise RequestFailed("Stream from %s ended before its last chunk (no finish_reason, no data: [DONE])." % endpoint)
    if chunks_with_content == 0:
        raise RequestFailed("Empty answer from %s: the stream carried no content." % endpoint)
    return {"tokens": usage_tokens if usage_tokens is not None else chunks_with_content, "ttft": ttft}


def error_detail(text):
    """The message of an error body: OpenAI's {"error": {"message"}}, exo's {"detail"}, else the text itself."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:200]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return to_native(error["message"])
        for value in (error, body.get("detail"), body.get("message")):
            if isinstance(value, str) and value:
                return value
    return text.strip()[:200]


def board_of(response):
    for header in BOARD_HEADERS:
        value = response.getheader(header)
        if value and value.strip() and value.strip() != "-":
            return value.strip()
    return None


def one_request(params, body, run_deadline):
    """Send one completion and read it to its end. Returns a record dict (error None on success)."""
    endpoint = params["url"].rstrip("/") + "/v1/chat/completions"
    started = time.time()
    deadline = min(started + params["timeout"], run_deadline)
    record = {"started_at": started, "ended_at": None, "status": None, "error": None, "board": None, "tokens": 0, "ttft": None}
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if params["stream"] else "application/json"}
    if params.get("api_key"):
        headers["Authorization"] = "Bearer %s" % params["api_key"]
    connection = None
    try:
        connection = _connection(endpoint, max(deadline - started, 0.001), params["validate_certs"])
        connection.connect()
        connection.sock = DeadlineSocket(connection.sock, deadline)
        connection.request("POST", urlsplit(endpoint).path, body=body, headers=headers)
        response = connection.getresponse()
        record["status"] = response.status
        record["board"] = board_of(response)
        if not 200 <= response.status < 300:
            detail = error_detail(response.read(4096).decode("utf-8", "replace")) or response.reason
            raise RequestFailed("HTTP %s from %s: %s" % (response.status, endpoint, detail))
        if params["stream"]:
            result = read_stream(response, endpoint, started, deadline)
        else:
            result = read_plain(response, endpoint)
        record.update(result)
    except RequestFailed as exc:
        record["error"] = to_native(exc)
    except socket.timeout:
        record["error"] = "Timed out waiting for %s (timeout %ss, or the run's duration was reached)." % (endpoint, params["timeout"])
    except ssl.SSLError as exc:
        record["error"] = "TLS error talking to %s: %s" % (endpoint, to_native(exc))
    except (socket.error, http_client.HTTPException) as exc:
        record["error"] = "Connection to %s failed: %s" % (endpoint, to_native(exc) or type(exc).__name__)
    finally:
        if connection is not None:
            connection.close()
    record["ended_at"] = time.time()
    return record


class LoadRun(object):
    """Shared state of the clients: who may send next, and every request's record."""

    def __init__(self, params, sender=one_request):
        self.params = params
        self.sender = sender
        self.body = build_body(params)
        self.lock = threading.Lock()
        self.records = []
        self.sent = 0
        self.stopped_by = None
        self.started = None
        self.deadline = None
        self.record_handle = None

    def _may_send(self):
        """Claim the next request under the lock; False when the run is over."""
        with self.lock:
            if time.time() >= self.deadline:
                self.stopped_by = self.stopped_by or "duration"
                return False
            if self.sent >= self.params["requests"]:
                stop_file = self.params.get("stop_file")
                if not stop_file:
                    self.stopped_by = self.stopped_by or "requests"
                    return False
                if os.path.exists(stop_file):
                    self.stopped_by = self.stopped_by or "stop_file"
                    return False
            self.sent += 1
            return True

    def _client(self):
        while self._may_send():
            record = self.sender(self.params, self.body, self.deadline)
            with self.lock:
                self.records.append(record)
                if self.record_handle is not None:
                    line = dict(record)
                    line["start"] = round(line.pop("started_at") - self.started, 4)
                    line["end"] = round(line.pop("ended_at") - self.started, 4)
                    self.record_handle.write(json.dumps(line, sort_keys=True) + "\n")
                    self.record_handle.flush()

    def run(self):
        self.started = time.time()
        self.deadline = self.started + self.params["duration"]
        if self.params.get("record_file"):
            self.record_handle = open(self.params["record_file"], "w")
        try:
            threads = [threading.Thread(target=self._client) for dummy in range(self.params["concurrency"])]
            for thread in threads:
                thread.daemon = True
                thread.start()
            for thread in threads:
                # Requests cannot outlive the deadline (their timeouts are capped by it); the margin covers a close.
                thread.join(max(self.deadline - time.time(), 0) + 5)
        finally:
            if self.record_handle is not None:
                self.record_handle.close()
        elapsed = time.time() - self.started
        with self.lock:
            return summarize(list(self.records), self.sent, elapsed, self.stopped_by or "duration")


def summarize(records, sent, elapsed, stopped_by):
    ok = [r for r in records if r["error"] is None]
    # Requests still in flight when the clients were abandoned count as failures.
    failed = sent - len(ok)
    counts = {}
    order = []
    for record in records:
        if record["error"] is not None:
            if record["error"] not in counts:
                order.append(record["error"])
                counts[record["error"]] = 0
            counts[record["error"]] += 1
    missing = sent - len(records)
    if missing > 0:
        message = "Still waiting for an answer when the run's duration ran out."
        order.append(message)
        counts[message] = missing
    errors = sorted(({"error": e, "count": counts[e]} for e in order), key=lambda item: -item["count"])[:MAX_ERRORS]
    tokens = sum(r["tokens"] for r in ok)
    latencies = [r["ended_at"] - r["started_at"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    by_board = {}
    for record in ok:
        if record["board"]:
            by_board[record["board"]] = by_board.get(record["board"], 0) + 1
    return {
        "sent": sent,
        "succeeded": len(ok),
        "failed_requests": failed,
        "errors": errors,
        "completion_tokens": tokens,
        "elapsed": round(elapsed, 3),
        "tokens_per_second": round(tokens / elapsed, 3) if elapsed > 0 else 0.0,
        "requests_per_second": round(len(ok) / elapsed, 3) if elapsed > 0 else 0.0,
        "latency": {"p50": _round(percentile(latencies, 50)), "p95": _round(percentile(latencies, 95)),
                    "max": _round(max(latencies) if latencies else None)},
        "time_to_first_token": {"p50": _round(percentile(ttfts, 50)), "p95": _round(percentile(ttfts, 95))},
        "by_board": by_board,
        "stopped_by": stopped_by,
    }


def argument_spec():
    return dict(
        url=dict(type="str", required=True),
        model=dict(type="str", required=True),
        api_key=dict(type="str", no_log=True),
        concurrency=dict(type="int", default=1),
        requests=dict(type="int", default=1),
        duration=dict(type="float", default=600),
        stop_file=dict(type="path"),
        stream=dict(type="bool", default=True),
        prompt=dict(type="str", default="Answer in one short sentence: what is the capital of France?"),
        max_tokens=dict(type="int", no_log=False),
        timeout=dict(type="float", default=300),
        validate_certs=dict(type="bool", default=True),
        record_file=dict(type="path"),
    )


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    problems = validate_options(module.params)
    if problems:
        module.fail_json(msg=" ".join(problems))
    if module.check_mode:
        result = summarize([], 0, 0.0, "check_mode")
        module.exit_json(changed=False, **result)
    try:
        result = LoadRun(module.params).run()
    except (IOError, OSError) as exc:
        module.fail_json(msg="Cannot write record_file %s: %s" % (module.params["record_file"], to_native(exc)))
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
