"""rkllm.fleet.artifact's headers option (issue 15: a token for gated Hugging Face models).

The header reaches the server the file is fetched from, never a host a redirect leads to (Hugging
Face redirects downloads to a pre-signed CDN URL), and its value never appears in the result, on
success or failure. Run as Ansible runs the module.
"""

import hashlib
import http.server
import json
import threading

import pytest

from test_artifact import run_module  # same directory: pytest puts it on sys.path

DATA = b'gated model bytes\n' * 1000
TOKEN = 'hf_s3cretTokenValue0123456789'


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host, redirect_to=None):
        super().__init__((host, 0), Handler)
        self.host = host
        self.redirect_to = redirect_to
        self.seen = []  # Authorization header of each GET, or None

    @property
    def base(self):
        return 'http://%s:%d' % (self.host, self.server_address[1])


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        auth = self.headers.get('Authorization')
        self.server.seen.append(auth)
        if self.server.redirect_to is not None:
            # The gated origin: the token or 401, as Hugging Face answers a gated repository.
            if auth != 'Bearer ' + TOKEN:
                self.send_response(401)
                self.send_header('Content-Length', '0')
                self.end_headers()
                return
            self.send_response(302)
            self.send_header('Location', self.server.redirect_to() + '/cdn/model.rkllm')
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        self.send_response(200)
        self.send_header('Content-Length', str(len(DATA)))
        self.end_headers()
        self.wfile.write(DATA)


@pytest.fixture
def servers():
    # Two hosts: 127.0.0.1 is the origin, localhost the CDN it redirects to (another host name).
    cdn = Server('localhost')
    origin = Server('127.0.0.1', redirect_to=lambda: cdn.base)
    for s in (cdn, origin):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield origin, cdn
    for s in (cdn, origin):
        s.shutdown()
        s.server_close()


def args_for(origin, tmp_path, **extra):
    return dict({'url': origin.base + '/org/gated/resolve/main/model.rkllm', 'dest': str(tmp_path / 'model.rkllm'),
                 'sha256': hashlib.sha256(DATA).hexdigest(), 'retries': 0}, **extra)


def test_the_header_reaches_the_origin_and_not_the_redirect_target(servers, tmp_path):
    origin, cdn = servers
    rc, result = run_module(args_for(origin, tmp_path, headers={'Authorization': 'Bearer ' + TOKEN}))
    assert rc == 0, result
    assert (tmp_path / 'model.rkllm').read_bytes() == DATA
    assert origin.seen == ['Bearer ' + TOKEN]
    assert cdn.seen == [None], 'the token was sent to the host the origin redirected to'
    assert TOKEN not in json.dumps(result)


def test_without_the_header_a_gated_file_is_refused(servers, tmp_path):
    origin, cdn = servers
    rc, result = run_module(args_for(origin, tmp_path))
    assert rc != 0 and 'HTTP 401' in result['msg']
    assert cdn.seen == []


def test_the_token_never_appears_in_a_failure(servers, tmp_path):
    origin, cdn = servers
    rc, result = run_module(args_for(origin, tmp_path, sha256='0' * 64,
                                     headers={'Authorization': 'Bearer ' + TOKEN}))
    assert rc != 0
    assert TOKEN not in json.dumps(result)
    assert origin.seen[0] == 'Bearer ' + TOKEN
