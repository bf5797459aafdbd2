"""Identities, ELF machines, mirror URLs and the download-verify-place steps."""

import hashlib
import os
import shutil
import subprocess

import pytest

from ansible_collections.rkllm.fleet.plugins.module_utils import artifacts as a

ELF_X86_64 = b'\x7fELF\x02\x01\x01' + b'\0' * 9 + b'\x03\x00' + b'\x3e\x00' + b'\0' * 44
ELF_AARCH64 = b'\x7fELF\x02\x01\x01' + b'\0' * 9 + b'\x03\x00' + b'\xb7\x00' + b'\0' * 44
ELF_ARM = b'\x7fELF\x01\x01\x01' + b'\0' * 9 + b'\x03\x00' + b'\x28\x00' + b'\0' * 44


def test_git_blob_id_of_the_empty_blob_is_gits():
    assert a.git_blob_id(b'') == 'e69de29bb2d1d6434b8b29ae775ad8c2e48c5391'


def test_git_blob_id_of_known_bytes():
    # `printf 'hello world\n' | git hash-object --stdin`
    assert a.git_blob_id(b'hello world\n') == '3b18e512dba79e4c8300dd08aeb37f8e728b8dad'


def test_git_blob_id_agrees_with_git(tmp_path):
    git = shutil.which('git')
    if not git:
        pytest.skip('git not installed')
    data = os.urandom(3000) + b'\0\n'
    path = tmp_path / 'f'
    path.write_bytes(data)
    out = subprocess.run(['git', 'hash-object', str(path)], stdout=subprocess.PIPE, check=True).stdout.decode().strip()
    assert a.identities_of_file(str(path))['git_blob'] == out == a.git_blob_id(data)


def test_identities_of_file(tmp_path):
    data = b'x' * (a.CHUNK + 17)  # spans more than one read
    path = tmp_path / 'f'
    path.write_bytes(data)
    ids = a.identities_of_file(str(path))
    assert ids == {'sha256': hashlib.sha256(data).hexdigest(), 'git_blob': a.git_blob_id(data), 'size': len(data)}


def test_normalize_identity_accepts_one_and_rejects_bad_input():
    sha = 'A' * 64
    assert a.normalize_identity(sha256='sha256:' + sha) == ('sha256', 'a' * 64)
    assert a.normalize_identity(git_blob='E69DE29BB2D1D6434B8B29AE775AD8C2E48C5391')[1] == 'e69de29bb2d1d6434b8b29ae775ad8c2e48c5391'
    with pytest.raises(a.ArtifactError, match='exactly one'):
        a.normalize_identity()
    with pytest.raises(a.ArtifactError, match='exactly one'):
        a.normalize_identity(sha256=sha, git_blob='e' * 40)
    with pytest.raises(a.ArtifactError, match='not 64 hex'):
        a.normalize_identity(sha256='abc')
    with pytest.raises(a.ArtifactError, match='not 40 hex'):
        a.normalize_identity(git_blob='z' * 40)


@pytest.mark.parametrize('header,machine', [
    (ELF_X86_64, 'x86_64'),
    (ELF_AARCH64, 'aarch64'),
    (ELF_ARM, 'arm'),
    (b'\x7fELF\x01\x02\x01' + b'\0' * 9 + b'\x00\x03' + b'\x00\x28' + b'\0' * 8, 'arm'),  # big-endian
    (b'\x7fELF\x01\x01\x01' + b'\0' * 9 + b'\x03\x00' + b'\x3e\x00' + b'\0' * 8, 'x86_64-32bit'),  # x32
    (b'\x7fELF\x02\x01\x01' + b'\0' * 9 + b'\x03\x00' + b'\x34\x12' + b'\0' * 8, 'EM_4660'),
    (b'<html>404 Not Found</html>', None),
    (b'\x7fELF', None),
    (b'', None),
    (b'\x7fELF\x07\x01' + b'\0' * 30, None),
])
def test_elf_machine(header, machine):
    assert a.elf_machine(header) == machine


def test_elf_machine_of_a_real_library():
    lib = os.path.join(os.path.dirname(__file__), '..', '..', '..', '..', 'lab', 'runtime', 'dist', '1.2.3', 'aarch64', 'librkllmrt.so')
    assert a.elf_machine_of_file(lib) == 'aarch64'


@pytest.mark.parametrize('url,mirror,expected', [
    ('https://github.com/o/r/raw/v1/x.so', '', 'https://github.com/o/r/raw/v1/x.so'),
    ('https://github.com/o/r/raw/v1/x.so', 'http://gw:8081', 'http://gw:8081/github.com/o/r/raw/v1/x.so'),
    ('https://github.com/o/r/raw/v1/x.so', 'http://gw:8081/mirror/', 'http://gw:8081/mirror/github.com/o/r/raw/v1/x.so'),
    ('https://user:pw@host:8443/p?download=true', 'http://m', 'http://m/host:8443/p?download=true'),
    ('https://huggingface.co/o/r/resolve/main/m.rkllm', 'file:///srv/a', 'file:///srv/a/huggingface.co/o/r/resolve/main/m.rkllm'),
])
def test_mirror_url(url, mirror, expected):
    assert a.mirror_url(url, mirror) == expected


def test_mirror_url_rejects_relative_urls():
    with pytest.raises(a.ArtifactError, match='not an absolute URL'):
        a.mirror_url('github.com/x', 'http://m')


@pytest.mark.parametrize('arch,name,machine', [
    ('aarch64', 'aarch64', 'aarch64'), ('armv7l', 'armhf', 'arm'), ('x86_64', 'x86_64', 'x86_64'), ('arm64', 'aarch64', 'aarch64')])
def test_board_arch(arch, name, machine):
    assert a.board_arch(arch) == {'name': name, 'elf_machine': machine}


def test_board_arch_unsupported():
    assert a.board_arch('riscv64') is None


class FakeResponse:
    def __init__(self, data, length=None):
        self.data = data
        self.headers = {'Content-Length': str(len(data) if length is None else length)}

    def read(self, n):
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


def test_fetch_verified_retries_a_short_read_then_succeeds(tmp_path):
    data = ELF_X86_64 + b'payload'
    answers = [FakeResponse(data[:10], length=len(data)), FakeResponse(data)]
    slept = []
    tmp, ids, attempts = a.fetch_verified(lambda url, timeout: answers.pop(0), 'http://x/y', str(tmp_path / 'dest'),
                                          'sha256', hashlib.sha256(data).hexdigest(), elf='x86_64', sleep=slept.append)
    assert attempts == 2 and len(slept) == 1
    assert open(tmp, 'rb').read() == data and ids['size'] == len(data)


def test_fetch_verified_gives_up_after_retries_and_leaves_no_temp_files(tmp_path):
    def broken(url, timeout):
        raise a.TransientError('connection refused')
    with pytest.raises(a.ArtifactError, match=r'failed after 3 attempts \(last error: connection refused\)'):
        a.fetch_verified(broken, 'http://x/y', str(tmp_path / 'dest'), 'sha256', '0' * 64, retries=2, sleep=lambda s: None)
    assert os.listdir(str(tmp_path)) == []


def test_fetch_verified_mismatch_names_url_both_identities_and_cleans_up(tmp_path):
    data = b'corrupt'
    with pytest.raises(a.ArtifactError) as err:
        a.fetch_verified(lambda u, t: FakeResponse(data), 'http://x/y', str(tmp_path / 'dest'), 'git_blob', 'e' * 40)
    msg = str(err.value)
    assert 'http://x/y' in msg and 'e' * 40 in msg and a.git_blob_id(data) in msg and 'left untouched' in msg
    assert os.listdir(str(tmp_path)) == []


def test_place_replaces_atomically(tmp_path):
    dest = tmp_path / 'lib.so'
    dest.write_bytes(b'old')
    tmp = tmp_path / '.new.part'
    tmp.write_bytes(b'new')
    a.place(str(tmp), str(dest), mode=0o644)
    assert dest.read_bytes() == b'new' and not tmp.exists()
    assert oct(os.stat(str(dest)).st_mode & 0o777) == '0o644'
