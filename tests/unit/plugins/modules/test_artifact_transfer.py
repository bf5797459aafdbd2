"""rkllm.fleet.artifact against servers that break mid-transfer, run as Ansible runs it.

Each server misbehaves the way real links and mirrors do: the connection is reset or the body
ends short halfway through a file, a chunked body is cut, the server stalls, or it drips one
byte at a time. Some honour Range requests, some ignore them.
"""

import hashlib
import os
import socket
import struct
import threading
import time
import http.server

import pytest

from ansible_collections.rkllm.fleet.plugins.module_utils.artifacts import git_blob_id

from test_artifact import ORIGIN, run_module  # same directory: pytest puts it on sys.path

DATA = os.urandom(3 * 1024 * 1024 + 123)  # more than one read
HALF = len(DATA) // 2


class Server(http.server.ThreadingHTTPServer):
    """Serves DATA at PATH. ``plan`` lists what each GET does, in order; then it serves normally.

    Plan steps: 'reset' (half the body, then a TCP reset), 'short' (half the body, then a clean
    close), 'chunked-cut' (a chunked body cut inside a chunk), 'stall' (half the body, then
    silence), 'drip' (one byte every 0.2 s), 'ok'.
    """

    daemon_threads = True

    def __init__(self, ranges):
        super().__init__(('127.0.0.1', 0), Handler)
        self.ranges = ranges
        self.plan = []
        self.requests = []  # (Range header, If-Range header)
        self.body_bytes = 0
        self.stop = threading.Event()

    @property
    def mirror(self):
        return 'http://127.0.0.1:%d' % self.server_address[1]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.headers.get('Range'), self.headers.get('If-Range')))
        step = srv.plan.pop(0) if srv.plan else 'ok'
        start = 0
        rng = self.headers.get('Range')
        if srv.ranges and rng and rng.startswith('bytes=') and rng.endswith('-'):
            start = int(rng[len('bytes='):-1])
            if self.headers.get('If-Range') not in (None, '"v1"'):
                start = 0
        body = DATA[start:]
        if step == 'chunked-cut':
            self.send_response(200)
            self.send_header('Transfer-Encoding', 'chunked')
            self.end_headers()
            self.wfile.write(b'%x\r\n' % len(DATA) + DATA[:HALF])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_response(206 if start else 200)
        if srv.ranges:
            self.send_header('Accept-Ranges', 'bytes')
            self.send_header('ETag', '"v1"')
        if start:
            self.send_header('Content-Range', 'bytes %d-%d/%d' % (start, len(DATA) - 1, len(DATA)))
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if step == 'drip':
            for i in range(len(body)):
                if srv.stop.wait(0.2):
                    break
                try:
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                except OSError:
                    break
            self.close_connection = True
            return
        if step in ('reset', 'short', 'stall'):
            cut = max(0, HALF - start)
            self.wfile.write(body[:cut])
            self.wfile.flush()
            srv.body_bytes += cut
            if step == 'stall':
                srv.stop.wait(30)
            elif step == 'reset':
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
            self.close_connection = True
            return
        self.wfile.write(body)
        srv.body_bytes += len(body)

    def log_message(self, *args):
        pass


def serve(ranges):
    server = Server(ranges)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture
def with_ranges():
    server = serve(True)
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def without_ranges():
    server = serve(False)
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def dest(tmp_path):
    d = tmp_path / 'models' / 'Qwen'
    d.mkdir(parents=True)
    return d / 'model.rkllm'


def args(server, dest, **extra):
    a = {'url': ORIGIN, 'mirror': server.mirror, 'dest': str(dest), 'sha256': hashlib.sha256(DATA).hexdigest(),
         'retry_delay': 0.01, 'timeout': 5}
    a.update(extra)
    return a


def placed_alone(dest):
    return dest.read_bytes() == DATA and os.listdir(str(dest.parent)) == [dest.name]


def test_a_reset_mid_body_resumes_with_a_range_request(with_ranges, dest):
    with_ranges.plan = ['reset']
    rc, result = run_module(args(with_ranges, dest))
    assert rc == 0, result
    assert result['attempts'] == 2 and placed_alone(dest)
    first, second = with_ranges.requests
    assert first == (None, None)
    resumed_at = int(second[0][len('bytes='):-1])
    assert 0 < resumed_at <= HALF and second[1] == '"v1"', 'the retry asks only for the missing bytes, guarded by If-Range'
    # The reset may discard bytes the client had not read yet, so it resumes where its own file ends;
    # the server then sends only the rest, never the whole body again.
    assert with_ranges.body_bytes == HALF + len(DATA) - resumed_at, 'the retry downloaded only the missing bytes'


def test_a_short_body_from_a_server_without_ranges_starts_again(without_ranges, dest):
    without_ranges.plan = ['short']
    rc, result = run_module(args(without_ranges, dest))
    assert rc == 0, result
    assert result['attempts'] == 2 and placed_alone(dest)
    assert [r for r, _headers in without_ranges.requests] == [None, None], 'no Range to a server that did not offer ranges'


def test_a_reset_from_a_server_that_ignores_ranges_starts_again(without_ranges, dest):
    without_ranges.plan = ['reset', 'reset']
    rc, result = run_module(args(without_ranges, dest))
    assert rc == 0, result
    assert result['attempts'] == 3 and placed_alone(dest)


def test_a_cut_chunked_body_is_retried(with_ranges, dest):
    with_ranges.plan = ['chunked-cut']
    rc, result = run_module(args(with_ranges, dest))
    assert rc == 0, result
    assert result['attempts'] == 2 and placed_alone(dest)


def test_a_server_that_stalls_mid_body_times_out_and_resumes(with_ranges, dest):
    with_ranges.plan = ['stall']
    began = time.time()
    rc, result = run_module(args(with_ranges, dest, timeout=1))
    assert rc == 0, result
    assert result['attempts'] == 2 and placed_alone(dest)
    assert time.time() - began < 10


def test_failures_mid_body_on_every_attempt_end_in_one_clear_message(without_ranges, dest):
    dest.write_bytes(b'the working model')
    without_ranges.plan = ['reset'] * 10
    rc, result = run_module(args(without_ranges, dest, retries=2))
    assert rc == 1 and result['failed']
    msg = result['msg']
    # A reset is seen as an error or, when it lands between reads, as a body that ended early.
    broke = 'the transfer broke after' in msg or 'the transfer ended after' in msg
    assert 'failed after 3 attempts' in msg and broke and 'left untouched' in msg, msg
    assert 'Traceback' not in msg and 'module_stderr' not in result
    assert dest.read_bytes() == b'the working model'
    assert os.listdir(str(dest.parent)) == [dest.name], 'no partial file left'


def test_a_dripping_server_is_cut_off_at_the_deadline(with_ranges, dest):
    with_ranges.plan = ['drip'] * 10
    began = time.time()
    rc, result = run_module(args(with_ranges, dest, deadline=2, timeout=1, retries=5))
    took = time.time() - began
    assert rc == 1, result
    assert 'did not finish within its deadline of 2 s' in result['msg'] and 'left untouched' in result['msg'], result['msg']
    assert took < 2 + 1 + 3, 'the deadline holds (overrun at most by the socket timeout, plus start-up)'
    assert not dest.exists() and os.listdir(str(dest.parent)) == []


def test_stale_partials_of_a_killed_run_are_removed_before_the_download(with_ranges, dest):
    old = dest.parent / '.artifact-k1ll3d.part'
    old.write_bytes(b'x' * 4096)
    past = time.time() - 3600
    os.utime(str(old), (past, past))
    someone_elses = dest.parent / '.download.part'
    someone_elses.write_bytes(b'y')
    os.utime(str(someone_elses), (past, past))
    current = dest.parent / '.artifact-running.part'  # written since this run began (a concurrent writer)
    current.write_bytes(b'z')
    future = time.time() + 600
    os.utime(str(current), (future, future))

    rc, result = run_module(args(with_ranges, dest))
    assert rc == 0, result
    assert result['removed_partials'] == [str(old)]
    assert not old.exists() and someone_elses.exists() and current.exists()
    assert 'interrupted earlier run' in str(result.get('warnings')), result
    assert dest.read_bytes() == DATA


def test_stale_partials_are_removed_even_when_dest_is_already_right(with_ranges, dest):
    dest.write_bytes(DATA)
    old = dest.parent / '.artifact-k1ll3d.part'
    old.write_bytes(b'x')
    past = time.time() - 3600
    os.utime(str(old), (past, past))
    rc, result = run_module(args(with_ranges, dest))
    assert rc == 0 and result['changed'] is False and result['downloaded'] is False, result
    assert not old.exists() and with_ranges.requests == []


def test_check_mode_removes_nothing(with_ranges, dest):
    old = dest.parent / '.artifact-k1ll3d.part'
    old.write_bytes(b'x')
    past = time.time() - 3600
    os.utime(str(old), (past, past))
    rc, result = run_module(args(with_ranges, dest), check=True)
    assert rc == 0 and result['changed'] is True
    assert old.exists() and with_ranges.requests == []


def test_a_bad_deadline_is_refused(with_ranges, dest):
    rc, result = run_module(args(with_ranges, dest, deadline=-1))
    assert rc == 1 and 'deadline' in result['msg']


def test_git_blob_identity_survives_a_resumed_download(with_ranges, dest):
    with_ranges.plan = ['reset']
    a = args(with_ranges, dest)
    del a['sha256']
    a['git_blob'] = git_blob_id(DATA)
    rc, result = run_module(a)
    assert rc == 0 and result['git_blob'] == git_blob_id(DATA) and placed_alone(dest)
