"""rkllm.fleet.artifact end to end against an HTTP server in the test, run as Ansible runs it."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading

import pytest

from ansible_collections.rkllm.fleet.plugins.module_utils.artifacts import git_blob_id
from ansible_collections.rkllm.fleet.plugins.modules import artifact

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..', '..'))
LIB = os.path.join(ROOT, 'lab', 'runtime', 'dist', '1.2.3', 'x86_64', 'librkllmrt.so')
LIB_ARM64 = os.path.join(ROOT, 'lab', 'runtime', 'dist', '1.2.3', 'aarch64', 'librkllmrt.so')
ORIGIN = 'https://github.com/airockchip/rknn-llm/raw/release-v1.2.3/rkllm-runtime/Linux/librkllm_api/x86_64/librkllmrt.so'
PATH = '/github.com/airockchip/rknn-llm/raw/release-v1.2.3/rkllm-runtime/Linux/librkllm_api/x86_64/librkllmrt.so'


def read(path):
    with open(path, 'rb') as f:
        return f.read()


class Upstream(http.server.ThreadingHTTPServer):
    """Serves ``files[path]``; ``failures[path]`` answers 503 that many times first; counts GETs."""

    def __init__(self):
        super().__init__(('127.0.0.1', 0), Handler)
        self.files = {}
        self.failures = {}
        self.gets = []
        # What a caching mirror answers after refetching from its upstream (request with X-Rkllm-Refresh).
        self.refreshed = {}
        self.refresh_requests = []

    @property
    def mirror(self):
        return 'http://127.0.0.1:%d' % self.server_address[1]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.gets.append(self.path)
        if self.server.failures.get(self.path, 0) > 0:
            self.server.failures[self.path] -= 1
            self.send_error(503, 'busy')
            return
        data = self.server.files.get(self.path)
        if self.headers.get('X-Rkllm-Refresh') == '1':
            self.server.refresh_requests.append((self.path, self.headers.get('Cache-Control')))
            data = self.server.refreshed.get(self.path, data)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = Upstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_module(args, check=False):
    """Run the module file as Ansible does (JSON args file), return (rc, result)."""
    module_args = dict(args)
    if check:
        module_args['_ansible_check_mode'] = True
    with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as f:
        json.dump({'ANSIBLE_MODULE_ARGS': module_args}, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, '.cache', 'collections')] + sys.path))
    try:
        proc = subprocess.run([sys.executable, artifact.__file__, f.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, check=False)
    finally:
        os.unlink(f.name)
    return proc.returncode, json.loads(proc.stdout.decode())


@pytest.fixture
def dest(tmp_path):
    d = tmp_path / 'runtime' / '1.2.3'
    d.mkdir(parents=True)
    return d / 'librkllmrt.so'


def test_right_file_is_placed_then_a_rerun_downloads_nothing(upstream, dest):
    upstream.files[PATH] = read(LIB)
    args = {'url': ORIGIN, 'mirror': upstream.mirror, 'dest': str(dest), 'git_blob': git_blob_id(read(LIB)),
            'elf_machine': 'x86_64', 'mode': '0644'}
    rc, result = run_module(args)
    assert rc == 0, result
    assert result['changed'] is True and result['downloaded'] is True
    assert result['url'] == upstream.mirror + PATH
    assert result['sha256'] == hashlib.sha256(read(LIB)).hexdigest() and result['size'] == len(read(LIB))
    assert dest.read_bytes() == read(LIB)
    assert os.listdir(str(dest.parent)) == ['librkllmrt.so']  # no temp file left behind

    rc, again = run_module(args)
    assert rc == 0 and again['changed'] is False and again['downloaded'] is False
    assert upstream.gets == [PATH], 'the re-run must not download'


def test_corrupt_download_fails_clearly_and_keeps_the_working_file(upstream, dest):
    good = read(LIB)
    dest.write_bytes(good)
    corrupt = bytearray(good)
    corrupt[100] ^= 0xff
    upstream.files[PATH] = bytes(corrupt)
    before = os.stat(str(dest))
    rc, result = run_module({'url': ORIGIN, 'mirror': upstream.mirror, 'dest': str(dest),
                             'sha256': hashlib.sha256(b'the 1.2.2 build').hexdigest()})
    assert rc == 1 and result['failed']
    assert 'left untouched' in result['msg'] and upstream.mirror + PATH in result['msg']
    assert hashlib.sha256(bytes(corrupt)).hexdigest() in result['msg']
    assert dest.read_bytes() == good and os.stat(str(dest)).st_ino == before.st_ino
    assert os.listdir(str(dest.parent)) == ['librkllmrt.so']


def test_wrong_elf_machine_fails_and_keeps_the_working_file(upstream, dest):
    dest.write_bytes(read(LIB))
    arm64 = read(LIB_ARM64)
    upstream.files[PATH] = arm64
    rc, result = run_module({'url': ORIGIN, 'mirror': upstream.mirror, 'dest': str(dest), 'sha256': hashlib.sha256(arm64).hexdigest(),
                             'elf_machine': 'x86_64'})
    assert rc == 1
    assert 'an ELF file for aarch64' in result['msg'] and 'needs an ELF library for x86_64' in result['msg']
    assert dest.read_bytes() == read(LIB)
    assert os.listdir(str(dest.parent)) == ['librkllmrt.so']


def test_server_errors_are_retried(upstream, dest):
    upstream.files[PATH] = read(LIB)
    upstream.failures[PATH] = 2
    rc, result = run_module({'url': ORIGIN, 'mirror': upstream.mirror, 'dest': str(dest), 'git_blob': git_blob_id(read(LIB)),
                             'retries': 3, 'retry_delay': 0.01})
    assert rc == 0, result
    assert result['attempts'] == 3 and len(upstream.gets) == 3
    assert dest.read_bytes() == read(LIB)


def test_persistent_server_errors_fail_after_the_retries(upstream, dest):
    upstream.files[PATH] = read(LIB)
    upstream.failures[PATH] = 10
    rc, result = run_module({'url': ORIGIN, 'mirror': upstream.mirror, 'dest': str(dest), 'git_blob': git_blob_id(read(LIB)),
                             'retries': 1, 'retry_delay': 0.01})
    assert rc == 1 and 'failed after 2 attempts' in result['msg'] and 'HTTP 503' in result['msg']
    assert len(upstream.gets) == 2 and not dest.exists()


def test_missing_file_on_the_mirror_is_not_retried(upstream, dest):
    rc, result = run_module({'url': ORIGIN, 'mirror': upstream.mirror, 'dest': str(dest), 'git_blob': 'e' * 40})
    assert rc == 1 and 'HTTP 404' in result['msg'] and len(upstream.gets) == 1


def test_check_mode_writes_nothing_and_downloads_nothing(upstream, dest):
    upstream.files[PATH] = read(LIB)
    args = {'url': ORIGIN, 'mirror': upstream.mirror, 'dest': str(dest), 'git_blob': git_blob_id(read(LIB))}
    rc, result = run_module(args, check=True)
    assert rc == 0 and result['changed'] is True
    assert not dest.exists() and upstream.gets == [] and os.listdir(str(dest.parent)) == []

    dest.write_bytes(read(LIB))
    dest.chmod(0o644)
    rc, result = run_module(args, check=True)
    assert rc == 0 and result['changed'] is False


def test_check_mode_in_a_directory_that_does_not_exist_yet_does_not_fail(upstream, tmp_path):
    missing = tmp_path / 'runtime' / '9.9.9' / 'librkllmrt.so'
    (tmp_path / 'runtime').mkdir()
    rc, result = run_module({'url': ORIGIN, 'mirror': upstream.mirror, 'dest': str(missing), 'sha256': '0' * 64}, check=True)
    assert rc == 0 and result['changed'] is True


def test_file_mirror_serves_a_pre_seeded_directory(tmp_path, dest):
    seeded = tmp_path / 'seed' / PATH.lstrip('/')
    seeded.parent.mkdir(parents=True)
    seeded.write_bytes(read(LIB))
    rc, result = run_module({'url': ORIGIN, 'mirror': 'file://' + str(tmp_path / 'seed'), 'dest': str(dest),
                             'git_blob': git_blob_id(read(LIB)), 'elf_machine': 'x86_64'})
    assert rc == 0 and result['changed'] and dest.read_bytes() == read(LIB)


def test_existing_file_with_the_identity_of_another_architecture_is_refused(dest):
    dest.write_bytes(read(LIB_ARM64))
    rc, result = run_module({'url': ORIGIN, 'dest': str(dest), 'git_blob': git_blob_id(read(LIB_ARM64)), 'elf_machine': 'x86_64'})
    assert rc == 1 and 'another architecture' in result['msg']


def test_two_identities_are_refused(dest):
    rc, result = run_module({'url': ORIGIN, 'dest': str(dest), 'git_blob': 'e' * 40, 'sha256': '0' * 64})
    assert rc == 1 and 'mutually exclusive' in result['msg']


def test_corrupt_copy_on_the_mirror_is_refreshed_once_and_then_placed(upstream, dest):
    good = read(LIB)
    corrupt = bytearray(good)
    corrupt[len(good) // 2] ^= 0xff
    upstream.files[PATH] = bytes(corrupt)
    upstream.refreshed[PATH] = good
    rc, result = run_module({'url': ORIGIN, 'mirror': upstream.mirror, 'dest': str(dest), 'git_blob': git_blob_id(good)})
    assert rc == 0, result
    assert result['changed'] is True and result['downloaded'] is True and result['attempts'] == 2
    assert dest.read_bytes() == good
    assert upstream.gets == [PATH, PATH]
    assert upstream.refresh_requests == [(PATH, 'no-cache')], 'only the second request asks the mirror to refetch'
    assert os.listdir(str(dest.parent)) == ['librkllmrt.so']


def test_attempts_count_every_download_before_and_after_the_refresh(upstream, dest):
    good = read(LIB)
    corrupt = bytearray(good)
    corrupt[len(good) // 2] ^= 0xff
    upstream.files[PATH] = bytes(corrupt)
    upstream.failures[PATH] = 1
    upstream.refreshed[PATH] = good
    rc, result = run_module({'url': ORIGIN, 'mirror': upstream.mirror, 'dest': str(dest), 'git_blob': git_blob_id(good)})
    assert rc == 0, result
    assert upstream.gets == [PATH, PATH, PATH], 'a 503, the corrupt copy, the refreshed copy'
    assert result['attempts'] == 3 and dest.read_bytes() == good


def test_mirror_that_stays_corrupt_after_the_refresh_fails_and_keeps_the_working_file(upstream, dest):
    good = read(LIB)
    dest.write_bytes(good)
    corrupt = bytearray(good)
    corrupt[len(good) // 2] ^= 0xff
    upstream.files[PATH] = bytes(corrupt)
    before = os.stat(str(dest))
    rc, result = run_module({'url': ORIGIN, 'mirror': upstream.mirror, 'dest': str(dest),
                             'sha256': hashlib.sha256(b'the 1.2.4 build').hexdigest()})
    assert rc == 1 and result['failed']
    assert 'left untouched' in result['msg'] and hashlib.sha256(bytes(corrupt)).hexdigest() in result['msg']
    assert 'fetch it from its upstream again' in result['msg']
    assert upstream.gets == [PATH, PATH] and len(upstream.refresh_requests) == 1, 'exactly one refresh, no loop'
    assert dest.read_bytes() == good and os.stat(str(dest)).st_ino == before.st_ino
    assert os.listdir(str(dest.parent)) == ['librkllmrt.so']


def test_wrong_bytes_from_the_origin_are_not_refetched(upstream, dest):
    """Without a mirror there is no cache to refresh: one download, then the usual failure."""
    upstream.files[PATH] = b'not the library'
    rc, result = run_module({'url': upstream.mirror + PATH, 'dest': str(dest), 'git_blob': git_blob_id(read(LIB))})
    assert rc == 1 and 'left untouched' in result['msg'] and 'upstream again' not in result['msg']
    assert upstream.gets == [PATH] and upstream.refresh_requests == []
    assert not dest.exists()
