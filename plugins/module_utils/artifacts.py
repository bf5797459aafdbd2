# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Verified artifacts: identities, ELF machine, mirror URLs, download-verify-place.

Plain functions without AnsibleModule, so the module, the filter plugins and the unit tests
share them. Runs on the boards: Python 3.8+ only, standard library only.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import os
import re
import struct
import tempfile
import time

try:
    from urllib.parse import urlsplit
except ImportError:  # pragma: no cover - Python 2 is not supported, kept for sanity's compile test
    from urlparse import urlsplit  # type: ignore

CHUNK = 1024 * 1024

SHA256_RE = re.compile(r'^[0-9a-f]{64}$')
GIT_BLOB_RE = re.compile(r'^[0-9a-f]{40}$')

# e_machine values from the ELF specification (elf.h EM_*), named as the module's option.
ELF_MACHINES = {
    3: 'i386',
    8: 'mips',
    20: 'ppc',
    21: 'ppc64',
    40: 'arm',
    62: 'x86_64',
    183: 'aarch64',
    243: 'riscv',
}
ELF_CLASS = {'i386': 1, 'arm': 1, 'x86_64': 2, 'aarch64': 2}

# ansible_facts['architecture'] -> (RKLLM release directory name, ELF machine)
ARCHITECTURES = {
    'aarch64': ('aarch64', 'aarch64'),
    'arm64': ('aarch64', 'aarch64'),
    'armv7l': ('armhf', 'arm'),
    'armv7': ('armhf', 'arm'),
    'armv8l': ('armhf', 'arm'),
    'armhf': ('armhf', 'arm'),
    'x86_64': ('x86_64', 'x86_64'),
    'amd64': ('x86_64', 'x86_64'),
}


class ArtifactError(Exception):
    """A failure the user can act on; the message is the whole explanation."""


def git_blob_id(data):
    """Git blob id of bytes: SHA-1 of ``blob <size>\\0<bytes>``."""
    h = hashlib.sha1()
    h.update(b'blob %d\0' % len(data))
    h.update(data)
    return h.hexdigest()


def identities_of_file(path):
    """Return ``{'sha256', 'git_blob', 'size'}`` of a file, reading it once after a stat."""
    size = os.stat(path).st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1()
    blob.update(b'blob %d\0' % size)
    read = 0
    with open(path, 'rb') as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            read += len(chunk)
            sha256.update(chunk)
            blob.update(chunk)
    if read != size:
        raise ArtifactError('%s changed size while it was being verified (%d bytes, then %d); is something else writing it?'
                            % (path, size, read))
    return {'sha256': sha256.hexdigest(), 'git_blob': blob.hexdigest(), 'size': size}


def normalize_identity(sha256=None, git_blob=None):
    """Validate the pinned identity; return ``(kind, lowercase hex)``."""
    given = [(k, v) for k, v in (('sha256', sha256), ('git_blob', git_blob)) if v]
    if len(given) != 1:
        raise ArtifactError('Give exactly one identity for an artifact: sha256 (64 hex digits) or git_blob (40 hex digits).')
    kind, value = given[0]
    value = value.strip().lower()
    if kind == 'sha256' and value.startswith('sha256:'):
        value = value[len('sha256:'):]
    pattern = SHA256_RE if kind == 'sha256' else GIT_BLOB_RE
    if not pattern.match(value):
        raise ArtifactError('The %s identity %r is not %s hex digits.' % (kind, given[0][1], 64 if kind == 'sha256' else 40))
    return kind, value


def elf_machine(header):
    """Name of the machine an ELF header is built for, or None when the bytes are not ELF.

    Unknown machine numbers come back as ``'EM_<number>'``.
    """
    if len(header) < 20 or header[:4] != b'\x7fELF':
        return None
    ei_class = header[4:5]
    ei_data = header[5:6]
    if ei_class not in (b'\x01', b'\x02') or ei_data not in (b'\x01', b'\x02'):
        return None
    fmt = '<H' if ei_data == b'\x01' else '>H'
    number = struct.unpack(fmt, header[18:20])[0]
    name = ELF_MACHINES.get(number, 'EM_%d' % number)
    expected_class = ELF_CLASS.get(name)
    if expected_class is not None and expected_class != ord(ei_class):
        # e.g. x32 or ILP32 objects: not loadable by the board's usual userland
        return '%s-%dbit' % (name, 32 if ei_class == b'\x01' else 64)
    return name


def elf_machine_of_file(path):
    with open(path, 'rb') as f:
        return elf_machine(f.read(64))


def board_arch(architecture):
    """Map ``ansible_facts['architecture']`` to ``{'name', 'elf_machine'}``, or None if unsupported."""
    entry = ARCHITECTURES.get(str(architecture).strip().lower())
    if entry is None:
        return None
    return {'name': entry[0], 'elf_machine': entry[1]}


def artifact_relpath(url):
    """``scheme://host[:port]/path?query`` -> ``host[:port]/path?query``: the layout of a mirror."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ArtifactError('%r is not an absolute URL (scheme://host/path).' % (url,))
    host = parts.netloc.rsplit('@', 1)[-1]
    rel = host + (parts.path or '/')
    if parts.query:
        rel += '?' + parts.query
    return rel


def mirror_url(url, mirror):
    """Rewrite ``https://host/path`` to ``<mirror>/host/path``; an empty mirror keeps the URL."""
    if not mirror:
        return url
    return mirror.rstrip('/') + '/' + artifact_relpath(url)


def describe(kind, value):
    return '%s %s' % ('sha256' if kind == 'sha256' else 'git blob', value)


def matches(ids, kind, value):
    return ids.get(kind) == value


class TransientError(Exception):
    """A download failure worth another try (connection, timeout, 5xx, short read)."""


class IdentityMismatch(ArtifactError):
    """The downloaded bytes do not have the pinned identity (corrupt copy or wrong pin).

    ``attempts`` is how many downloads it took to get those bytes."""

    attempts = 1


# Sent on the one re-download after a mirror served bytes with the wrong identity: a caching
# mirror (the gateway's, proxy_cache_bypass $http_x_rkllm_refresh) fetches the file from its
# upstream again and replaces its cached copy, so a corrupt answer does not stay cached.
REFRESH_HEADERS = {'Cache-Control': 'no-cache', 'X-Rkllm-Refresh': '1'}


def refreshable(url):
    """Whether a mirror URL can be asked to refetch a file (http(s); a file:// tree cannot)."""
    return urlsplit(url).scheme in ('http', 'https')


def download_to(opener, url, dirpath, timeout, prefix='.artifact-', headers=None):
    """Stream ``url`` into a new temporary file in ``dirpath``; return its path.

    ``opener(url, timeout)`` returns a response object with ``read(n)`` and, optionally,
    ``headers``; with ``headers`` set it is called as ``opener(url, timeout, headers=headers)``.
    The temporary file is removed when anything goes wrong.
    """
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix='.part', dir=dirpath)
    try:
        with os.fdopen(fd, 'wb') as out:
            resp = opener(url, timeout, headers=headers) if headers else opener(url, timeout)
            expected = None
            headers = getattr(resp, 'headers', None)
            if headers is not None and headers.get('Content-Length'):
                try:
                    expected = int(headers.get('Content-Length'))
                except ValueError:
                    expected = None
            got = 0
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                got += len(chunk)
                out.write(chunk)
            close = getattr(resp, 'close', None)
            if close:
                close()
            if expected is not None and got != expected:
                raise TransientError('the transfer ended after %d of %d bytes' % (got, expected))
            out.flush()
            os.fsync(out.fileno())
        return tmp
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def fetch_verified(opener, url, dest, kind, value, elf=None, retries=3, timeout=60, delay=1.0, sleep=time.sleep, log=None,
                   headers=None):
    """Download ``url`` next to ``dest``, verify identity and ELF machine; return ``(tmp_path, ids, attempts)``.

    Transient failures are retried ``retries`` times with a growing delay. A wrong identity or
    machine is not retried here (the origin serves those bytes) and raises ArtifactError
    (IdentityMismatch for a wrong identity). ``headers`` are sent with every request. The caller
    moves ``tmp_path`` onto ``dest`` (``place``); ``dest`` itself is never touched here.
    """
    dirpath = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(dirpath):
        raise ArtifactError('The directory of %s does not exist; create it before placing the artifact there.' % dest)
    attempts = 0
    last = None
    while True:
        attempts += 1
        try:
            tmp = download_to(opener, url, dirpath, timeout, headers=headers)
            break
        except TransientError as e:
            last = str(e)
        if attempts > retries:
            raise ArtifactError('Downloading %s failed after %d attempts (last error: %s); %s was left untouched. '
                                'Check that the URL (or the mirror rkllm_mirror_url) is reachable from this host.'
                                % (url, attempts, last, dest))
        if log:
            log('attempt %d for %s failed (%s), retrying' % (attempts, url, last))
        sleep(delay * (2 ** (attempts - 1)))
    try:
        ids = identities_of_file(tmp)
        if not matches(ids, kind, value):
            mismatch = IdentityMismatch('The file downloaded from %s has %s, but %s was expected; %s was left untouched. '
                                        'The download is corrupt or the pinned identity is wrong: check the mirror copy, or pin the '
                                        'identity the origin publishes.'
                                        % (url, describe(kind, ids[kind]), describe(kind, value), dest))
            mismatch.attempts = attempts
            raise mismatch
        if elf:
            found = elf_machine_of_file(tmp)
            if found != elf:
                raise ArtifactError('The file downloaded from %s is %s, but this host needs an ELF library for %s; '
                                    '%s was left untouched. Pin the artifact built for this architecture.'
                                    % (url, 'not an ELF file' if found is None else 'an ELF file for ' + found, elf, dest))
    except BaseException:
        _unlink(tmp)
        raise
    return tmp, ids, attempts


def place(tmp, dest, mode=None):
    """Atomically move a verified temporary file onto dest (same directory, so rename is atomic)."""
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        _unlink(tmp)
        raise
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(dest)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def dest_state(dest, kind, value, elf=None):
    """Describe an existing dest: ``(matches, ids or None)``."""
    if not os.path.lexists(dest):
        return False, None
    if not os.path.isfile(dest):
        raise ArtifactError('%s exists but is not a regular file; remove it or choose another dest.' % dest)
    ids = identities_of_file(dest)
    if not matches(ids, kind, value):
        return False, ids
    if elf:
        found = elf_machine_of_file(dest)
        if found != elf:
            raise ArtifactError('%s has the pinned %s, but it is %s and this host needs %s: the pinned identity belongs to a '
                                'file for another architecture. Pin the artifact built for %s.'
                                % (dest, describe(kind, value), 'not an ELF file' if found is None else 'an ELF file for ' + found,
                                   elf, elf))
    return True, ids
