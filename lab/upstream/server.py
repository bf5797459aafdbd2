"""The lab upstream: a site mirror of the internet for the rkllm.fleet lab.

``https://HOST/PATH`` is served as ``http://<this server>/HOST/PATH`` from the tree that
``build.py --out`` lays out.  Git repositories are served over git's "dumb" HTTP protocol
(bare repositories with ``git update-server-info`` run at build time); a repository stored
as ``NAME.git`` answers under ``NAME`` too.

Control endpoints (lab tests and fault scenarios):

    GET  /_lab/health                 {"status": "ok", "root": ..., "corrupt": [...]}
    GET  /_lab/counters               {"paths": {path: bytes}, "total": n, "requests": n}
    POST /_lab/reset                  zero the counters
    POST /_lab/corrupt?path=/HOST/P   serve that file with its second half bit-flipped (same length)
    POST /_lab/heal[?path=/HOST/P]    serve correct bytes again (all paths, or one)

One log line per request on stdout.  Python 3 standard library only.

    python3 server.py --root /srv/rkllm-lab-upstream --port 8000 --bind 0.0.0.0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 64 * 1024
CONTROL_PREFIX = "/_lab/"
# Build metadata inside the tree, never served.
META_DIR = ".lab"
HEADERS_INDEX = META_DIR + "/headers.json"
JSON_PREFIXES = ("/huggingface.co/api/",)


class Refused(Exception):
    """A request path that escapes the root or names hidden build metadata."""


class Upstream:
    """The served tree, the byte counters and the corrupted paths; shared by all handler threads."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.lock = threading.Lock()
        self.paths: dict = {}
        self.total = 0
        self.requests = 0
        self.corrupt: dict = {}  # real file path -> request path that asked for it
        self.extra_headers = self._load_headers()

    def _load_headers(self) -> dict:
        try:
            with open(os.path.join(self.root, HEADERS_INDEX), encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return {}

    # -- path resolution --

    def resolve(self, url_path: str) -> str | None:
        """Real file path for a request path; None when there is no such file.

        Raises Refused for paths that try to leave the root or reach build metadata.
        """
        path = unquote(url_path)
        if "\0" in path or "\\" in path:
            raise Refused(url_path)
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise Refused(url_path)
        if parts and parts[0] == META_DIR:
            raise Refused(url_path)
        current = self.root
        for part in parts:
            candidate = os.path.join(current, part)
            if not os.path.lexists(candidate):
                # A git repository answers with and without its .git suffix.
                if os.path.isdir(candidate + ".git"):
                    candidate += ".git"
                elif part.endswith(".git") and os.path.isdir(candidate[:-4]):
                    candidate = candidate[:-4]
                else:
                    return None
            current = candidate
        real = os.path.realpath(current)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise Refused(url_path)
        return real if os.path.isfile(real) else None

    # -- counters and faults --

    def count(self, path: str, nbytes: int) -> None:
        with self.lock:
            self.paths[path] = self.paths.get(path, 0) + nbytes
            self.total += nbytes

    def count_request(self) -> None:
        with self.lock:
            self.requests += 1

    def counters(self) -> dict:
        with self.lock:
            return {"paths": dict(sorted(self.paths.items())), "total": self.total, "requests": self.requests}

    def reset(self) -> None:
        with self.lock:
            self.paths.clear()
            self.total = 0
            self.requests = 0

    def is_corrupt(self, real: str) -> bool:
        with self.lock:
            return real in self.corrupt


def content_type(url_path: str, real: str) -> str:
    if real.endswith(".json") or url_path.startswith(JSON_PREFIXES):
        return "application/json"
    if "." not in os.path.basename(real):
        try:
            with open(real, "rb") as handle:
                if handle.read(1) in (b"{", b"["):
                    return "application/json"
        except OSError:
            pass
    return "application/octet-stream"


def corrupted(chunk: bytes, offset: int, size: int) -> bytes:
    """Flip every bit from the middle of the file on: same length, headers intact, wrong bytes."""
    start = size // 2
    if offset + len(chunk) <= start:
        return chunk
    keep = max(0, start - offset)
    return chunk[:keep] + bytes(b ^ 0xFF for b in chunk[keep:])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rkllm-lab-upstream/1"
    upstream: Upstream  # set on the subclass made by make_server

    # -- plumbing --

    def log_message(self, format, *args):  # noqa: A002  (signature of the base class)
        pass  # one line per request is written by _log instead

    def _log(self, status: int, nbytes: int, started: float) -> None:
        elapsed_ms = (time.monotonic() - started) * 1000
        line = '%s - "%s %s" %d %d %.1fms\n' % (self.client_address[0], self.command, self.path, status, nbytes,
                                                elapsed_ms)
        with self.upstream.lock:
            sys.stdout.write(line)
            sys.stdout.flush()

    def _send_json(self, status: int, obj, started: float) -> None:
        body = (json.dumps(obj) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._log(status, len(body), started)

    def _error(self, status: int, message: str, started: float) -> None:
        self._send_json(status, {"error": message}, started)

    # -- methods --

    def do_GET(self):  # noqa: N802
        self._serve(head=False)

    def do_HEAD(self):  # noqa: N802
        self._serve(head=True)

    def do_POST(self):  # noqa: N802
        started = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        up = self.upstream
        if url.path == CONTROL_PREFIX + "reset":
            up.reset()
            self._send_json(200, {"status": "reset"}, started)
        elif url.path in (CONTROL_PREFIX + "corrupt", CONTROL_PREFIX + "heal"):
            self._fault(url.path.endswith("corrupt"), query.get("path", [None])[0], started)
        else:
            self._error(404 if url.path.startswith(CONTROL_PREFIX) else 405,
                        "unknown control endpoint %s" % url.path, started)

    def _fault(self, corrupt: bool, path: str | None, started: float) -> None:
        up = self.upstream
        if path is None:
            if corrupt:
                self._error(400, "corrupt needs ?path=/HOST/PATH", started)
                return
            with up.lock:
                up.corrupt.clear()
            self._send_json(200, {"corrupt": []}, started)
            return
        path = "/" + path.lstrip("/")
        try:
            real = up.resolve(path)
        except Refused:
            self._error(403, "refused path %s" % path, started)
            return
        if real is None:
            self._error(404, "no file at %s" % path, started)
            return
        with up.lock:
            if corrupt:
                up.corrupt[real] = path
            else:
                up.corrupt.pop(real, None)
            state = sorted(up.corrupt.values())
        self._send_json(200, {"corrupt": state}, started)

    def _serve(self, head: bool) -> None:
        started = time.monotonic()
        url = urlsplit(self.path)
        up = self.upstream
        if url.path.startswith(CONTROL_PREFIX):
            if url.path == CONTROL_PREFIX + "health":
                with up.lock:
                    corrupt = sorted(up.corrupt.values())
                self._send_json(200, {"status": "ok", "root": up.root, "corrupt": corrupt}, started)
            elif url.path == CONTROL_PREFIX + "counters":
                self._send_json(200, up.counters(), started)
            else:
                self._error(404, "unknown control endpoint %s" % url.path, started)
            return
        up.count_request()
        try:
            real = up.resolve(url.path)
        except Refused:
            self._error(403, "refused path %s" % url.path, started)
            return
        if real is None:
            self._error(404, "not found: %s" % url.path, started)
            return
        try:
            handle = open(real, "rb")  # pylint: disable=consider-using-with
        except OSError as exc:
            self._error(500, "cannot read %s: %s" % (url.path, exc.strerror), started)
            return
        with handle:
            size = os.fstat(handle.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", content_type(url.path, real))
            self.send_header("Content-Length", str(size))
            for name, value in up.extra_headers.get(url.path, {}).items():
                self.send_header(name, value)
            self.end_headers()
            sent = 0
            if not head:
                corrupt = up.is_corrupt(real)
                try:
                    while sent < size:
                        chunk = handle.read(min(CHUNK, size - sent))
                        if not chunk:
                            break
                        if corrupt:
                            chunk = corrupted(chunk, sent, size)
                        self.wfile.write(chunk)
                        sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                finally:
                    up.count(url.path, sent)
        self._log(200, sent, started)


def make_server(root: str, bind: str, port: int) -> ThreadingHTTPServer:
    if not os.path.isdir(root):
        raise SystemExit("server.py: --root %s is not a directory: build it with lab/upstream/build.py --out" % root)
    handler = type("BoundHandler", (Handler,), {"upstream": Upstream(root)})
    server = ThreadingHTTPServer((bind, port), handler)
    server.daemon_threads = True
    return server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Serve the lab upstream tree (a site mirror of the internet).")
    parser.add_argument("--root", required=True, help="tree built by lab/upstream/build.py --out")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--bind", default="0.0.0.0")
    args = parser.parse_args(argv)
    server = make_server(args.root, args.bind, args.port)
    host, port = server.server_address[:2]
    sys.stdout.write("rkllm-lab-upstream serving %s on http://%s:%d\n" % (os.path.realpath(args.root), host, port))
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
