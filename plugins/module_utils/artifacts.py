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
import socket
import stat
import struct
import tempfile
import time

try:
    import http.client as http_client
except ImportError:  # pragma: no cover - Python 2 is not supported, kept for sanity's compile test
    import httplib as http_client  # type: ignore

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


PART_PREFIX = '.artifact-'
PART_SUFFIX = '.part'


class RangeNotSatisfiable(TransientError):
    """The server refused the Range of a resumed download (HTTP 416): start again from byte 0."""


class DeadlineExceeded(ArtifactError):
    """The whole download (every attempt) took longer than its deadline."""


def remove_stale_parts(dirpath, older_than, log=None):
    """Remove partial downloads (``.artifact-*.part``) this user left in ``dirpath`` before ``older_than``.

    A run that is killed (Ctrl-C, a lost connection to the controller) can't clean up after
    itself; the next run does. Files written since ``older_than`` (this run's start) or owned by
    another user are left alone. Returns the paths removed.
    """
    removed = []
    try:
        names = os.listdir(dirpath)
    except OSError:
        return removed
    uid = os.geteuid() if hasattr(os, 'geteuid') else None
    for name in names:
        if not (name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)):
            continue
        path = os.path.join(dirpath, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_mtime >= older_than or (uid is not None and st.st_uid != uid):
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
        if log:
            log('removed %s (%d bytes), a partial download an interrupted run left behind' % (path, st.st_size))
    return removed


def _status(resp):
    status = getattr(resp, 'status', None)
    if status is None and hasattr(resp, 'getcode'):
        status = resp.getcode()
    return status or 200


def _header(resp, name):
    headers = getattr(resp, 'headers', None)
    if headers is None:
        return None
    return headers.get(name)


def _content_range(value):
    """``bytes START-END/TOTAL`` -> ``(start, total or None)``; None when unparseable."""
    m = re.match(r'^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$', value or '')
    if not m:
        return None
    return int(m.group(1)), (None if m.group(3) == '*' else int(m.group(3)))


class Transfer:
    """One download into a partial file that survives between attempts.

    Each attempt asks for the bytes still missing (``Range``) when the partial file holds some
    and the server said it serves ranges; a server that answers the whole file instead (200)
    starts the file again. ``deadline`` (a ``clock()`` time, or None) bounds every read.
    """

    def __init__(self, opener, url, dirpath, timeout, headers=None, deadline=None, clock=time.time):
        self.opener = opener
        self.url = url
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.deadline = deadline
        self.clock = clock
        self.size = None          # whole file size, once an answer told it
        self.validator = None     # ETag or Last-Modified of the first answer, for If-Range
        self.ranges = False       # the server announced Accept-Ranges: bytes
        self.resumed = 0          # attempts that continued a partial file
        fd, self.path = tempfile.mkstemp(prefix=PART_PREFIX, suffix=PART_SUFFIX, dir=dirpath)
        os.close(fd)

    @property
    def have(self):
        return os.path.getsize(self.path)

    def remaining(self):
        return None if self.deadline is None else self.deadline - self.clock()

    def _check_deadline(self):
        left = self.remaining()
        if left is not None and left <= 0:
            raise DeadlineExceeded('deadline')

    def attempt(self):
        """Fetch what is missing; return when the file is complete. Raises TransientError."""
        self._check_deadline()
        offset = self.have
        headers = dict(self.headers)
        if offset and self.ranges:
            headers['Range'] = 'bytes=%d-' % offset
            if self.validator:
                headers['If-Range'] = self.validator
        else:
            offset = 0
        timeout = self.timeout
        left = self.remaining()
        if left is not None:
            timeout = max(1, min(timeout, left))
        try:
            resp = self.opener(self.url, timeout, headers=headers) if headers else self.opener(self.url, timeout)
        except RangeNotSatisfiable:
            self.ranges = False
            self._truncate()
            raise
        try:
            self._receive(resp, offset, 'Range' in headers)
        finally:
            close = getattr(resp, 'close', None)
            if close:
                try:
                    close()
                except Exception:  # pylint: disable=broad-except
                    pass

    def _truncate(self):
        with open(self.path, 'wb'):
            pass

    def _receive(self, resp, offset, asked_range):
        status = _status(resp)
        length = _header(resp, 'Content-Length')
        try:
            length = int(length) if length not in (None, '') else None
        except ValueError:
            length = None
        if asked_range and status == 206:
            parsed = _content_range(_header(resp, 'Content-Range'))
            if parsed is None or parsed[0] != offset:
                # Not the bytes asked for: keep nothing of this answer, start over next time.
                self.ranges = False
                self._truncate()
                raise TransientError('the server answered a range other than bytes=%d- (%s)' % (offset, _header(resp, 'Content-Range')))
            self.resumed += 1
            if parsed[1] is not None:
                self.size = parsed[1]
            elif length is not None:
                self.size = offset + length
            mode = 'ab'
        else:
            # A whole answer (the first, a server without ranges, or a changed file after If-Range).
            offset = 0
            mode = 'wb'
            self.size = length
            self.ranges = (_header(resp, 'Accept-Ranges') or '').strip().lower() == 'bytes'
            self.validator = _header(resp, 'ETag') or _header(resp, 'Last-Modified')
        read = getattr(resp, 'read1', None) or resp.read
        got = offset
        with open(self.path, mode) as out:
            while True:
                self._check_deadline()
                try:
                    chunk = read(CHUNK)
                except (IOError, OSError, socket.timeout, http_client.HTTPException, ValueError) as e:
                    # Timeouts, resets and truncated chunked bodies land here mid-transfer.
                    out.flush()
                    raise TransientError('the transfer broke after %d%s bytes (%s)'
                                         % (got, '' if self.size is None else ' of %d' % self.size, _reason(e)))
                if not chunk:
                    break
                got += len(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if self.size is not None and got != self.size:
            raise TransientError('the transfer ended after %d of %d bytes' % (got, self.size))

    def discard(self):
        _unlink(self.path)


def _reason(e):
    text = str(e) or e.__class__.__name__
    if isinstance(e, socket.timeout) or 'timed out' in text:
        return 'no data for the socket timeout: %s' % text
    return '%s: %s' % (e.__class__.__name__, text) if str(e) else e.__class__.__name__


def download_to(opener, url, dirpath, timeout, prefix=PART_PREFIX, headers=None):
    """Stream ``url`` into a new temporary file in ``dirpath`` in one attempt; return its path.

    ``opener(url, timeout)`` returns a response object with ``read(n)`` and, optionally,
    ``headers``; with ``headers`` set it is called as ``opener(url, timeout, headers=headers)``.
    The temporary file is removed when anything goes wrong.
    """
    transfer = Transfer(opener, url, dirpath, timeout, headers=headers)
    try:
        transfer.attempt()
    except BaseException:
        transfer.discard()
        raise
    return transfer.path


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def fetch_verified(opener, url, dest, kind, value, elf=None, retries=3, timeout=60, delay=1.0, sleep=time.sleep, log=None,
                   headers=None, deadline=None, clock=time.time):
    """Download ``url`` next to ``dest``, verify identity and ELF machine; return ``(tmp_path, ids, attempts)``.

    Transient failures (connection errors, timeouts, 5xx, a transfer that breaks or ends short)
    are retried ``retries`` times with a growing delay; a retry continues the partial file with
    a Range request when the server serves ranges, else starts again. ``deadline`` (seconds, 0 or
    None for none) bounds the whole download, retries and waits included. A wrong identity or
    machine is not retried here (the origin serves those bytes) and raises ArtifactError
    (IdentityMismatch for a wrong identity). ``headers`` are sent with every request. The caller
    moves ``tmp_path`` onto ``dest`` (``place``); ``dest`` itself is never touched here.
    """
    dirpath = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(dirpath):
        raise ArtifactError('The directory of %s does not exist; create it before placing the artifact there.' % dest)
    started = clock()
    end = started + deadline if deadline else None
    transfer = Transfer(opener, url, dirpath, timeout, headers=headers, deadline=end, clock=clock)
    tmp = transfer.path
    attempts = 0
    last = None
    try:
        while True:
            attempts += 1
            try:
                transfer.attempt()
                break
            except TransientError as e:
                last = str(e)
            except DeadlineExceeded:
                last = last or 'none'
                raise ArtifactError('Downloading %s did not finish within its deadline of %s s (%d attempts, %d%s bytes received, '
                                    'last error: %s); %s was left untouched. The source is too slow or stalls: check the '
                                    'network and the mirror (rkllm_mirror_url), or allow more time.'
                                    % (url, _seconds(deadline), attempts, transfer.have,
                                       '' if transfer.size is None else ' of %d' % transfer.size, last, dest))
            if attempts > retries:
                raise ArtifactError('Downloading %s failed after %d attempts (last error: %s) in %s s, %d%s bytes received%s; '
                                    '%s was left untouched. Check that the URL (or the mirror rkllm_mirror_url) is reachable '
                                    'from this host.'
                                    % (url, attempts, last, _seconds(clock() - started), transfer.have,
                                       '' if transfer.size is None else ' of %d' % transfer.size,
                                       ' (%d attempts resumed the partial file)' % transfer.resumed if transfer.resumed else '', dest))
            if log:
                log('attempt %d for %s failed (%s), %s' % (attempts, url, last,
                                                           'resuming at byte %d' % transfer.have if transfer.ranges and transfer.have
                                                           else 'retrying from the start'))
            wait = delay * (2 ** (attempts - 1))
            left = transfer.remaining()
            if left is not None:
                wait = max(0, min(wait, left))
            sleep(wait)
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


def _seconds(value):
    return ('%.1f' % value).rstrip('0').rstrip('.')


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
