#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: artifact
short_description: Download a file, verify its identity, and place it atomically
version_added: 1.0.0
description:
  - Makes O(dest) hold the file at O(url) whose identity is pinned with O(sha256) or O(git_blob).
  - When O(dest) already has that identity nothing is downloaded and the result is not changed.
  - Otherwise the file is downloaded (through O(mirror) when set) into a temporary file in the
    directory of O(dest), retried on connection errors, timeouts, HTTP 5xx and short reads,
    verified, checked against O(elf_machine) when set, and only then renamed onto O(dest).
    A failed, corrupt or wrong-architecture download never replaces O(dest).
  - A transfer that breaks mid-body (a timeout, a reset connection, a truncated or short body) is retried like
    any other transient failure; the retry asks for the missing bytes only (an HTTP C(Range) request guarded by
    C(If-Range)) when the server's C(Accept-Ranges) header said C(bytes), and starts again from the first byte otherwise.
  - O(deadline) bounds the whole download, retries included, so a server that keeps sending a byte now and then
    can't hold the run forever.
  - Before it starts, it removes the partial files (C(.artifact-*.part)) that an interrupted run of this module
    left in the directory of O(dest), that is files of the same user last written before this run began. Removing them
    does not make the result changed (it is reported in RV(removed_partials)).
  - The identity can be the one the origin publishes, so a known file needs no hand-made checksum, for example
    the git blob id of a file in a git repository at a release tag, or the sha256 of a Hugging Face LFS file.
  - O(url) may be a C(file://) URL, and O(mirror) may be a C(file://) directory laid out as C(<host>/<path>);
    this is how air-gapped sites pre-seed artifacts.
author:
  - rkllm.fleet developers (@rkllm)
options:
  url:
    description:
      - Where the file comes from (its origin), C(http://), C(https://) or C(file://).
      - With O(mirror) set, the file is fetched from the mirror instead, see there.
    type: str
    required: true
  dest:
    description:
      - Absolute path of the file on the target host. Its directory must exist.
      - A new file gets mode C(0644) unless O(mode) says otherwise.
    type: path
    required: true
  sha256:
    description:
      - SHA-256 of the file, 64 hex digits (a C(sha256:) prefix is accepted).
      - Exactly one of O(sha256) and O(git_blob) is required.
    type: str
  git_blob:
    description:
      - Git blob id of the file, 40 hex digits, i.e. the SHA-1 of C(blob <size>\0<bytes>), as C(git ls-tree) shows
        for a file in a repository at a tag.
      - Exactly one of O(sha256) and O(git_blob) is required.
    type: str
  elf_machine:
    description:
      - Refuse a file that is not an ELF object for this machine (checked before it is placed).
    type: str
    choices: [aarch64, arm, x86_64]
  mirror:
    description:
      - Base URL of a site mirror. C(scheme://host/path) is fetched as C(<mirror>/host/path).
      - Empty means fetch from the origin.
      - "When an C(http(s)) mirror serves bytes without the pinned identity, the file is downloaded once more with the
        request headers C(Cache-Control: no-cache) and C(X-Rkllm-Refresh: 1), which make a caching mirror (the gateway's)
        fetch it from its upstream again and replace its cached copy. If that copy is wrong too, the task fails."
    type: str
    default: ''
  retries:
    description:
      - How many times a failed transfer is tried again (with a growing delay) before the task fails.
      - An identity or architecture mismatch is not retried.
    type: int
    default: 3
  retry_delay:
    description:
      - Seconds before the first retry; doubled for each further one.
    type: float
    default: 1.0
  timeout:
    description:
      - Socket timeout in seconds for each attempt, i.e. how long a connection may stay silent.
    type: int
    default: 60
  deadline:
    description:
      - Seconds the whole download may take, every attempt and the waits between them included; then the task fails
        and O(dest) is left untouched. It is checked between reads, so it can be overrun by at most O(timeout).
      - C(0) means no deadline (a server that drips bytes then holds the task for as long as it drips).
      - The default, two hours, lets a 4 GB model come through a 1 MB/s link with time to spare.
    type: int
    default: 7200
  validate_certs:
    description:
      - Verify the TLS certificate of HTTPS URLs.
    type: bool
    default: true
  headers:
    description:
      - "Extra HTTP request headers sent with every request for the file, for example
        C(Authorization: Bearer <token>) for a gated Hugging Face repository."
      - They are sent to the host of the URL fetched (the mirror's when O(mirror) is set) only. A redirect to
        another host, or from C(https) to C(http), is followed without them (a Hugging Face download redirects to a
        pre-signed CDN URL that needs none).
      - The option is C(no_log), so its values never appear in the result, the log or error messages.
    type: dict
    default: {}
extends_documentation_fragment: [ansible.builtin.files, ansible.builtin.action_common_attributes, rkllm.fleet.attributes]
attributes:
  check_mode:
    details: In check mode nothing is downloaded; the result is changed when O(dest) is missing or has another identity.
seealso:
  - module: ansible.builtin.get_url
notes:
  - Unlike M(ansible.builtin.get_url), the identity of an existing O(dest) is always verified, nothing is
    downloaded when it matches, and the git blob id of the origin can be pinned.
'''

EXAMPLES = r'''
- name: Install the RKLLM runtime library, verified against the git blob id at the release tag
  rkllm.fleet.artifact:
    url: https://github.com/airockchip/rknn-llm/raw/release-v1.2.3/rkllm-runtime/Linux/librkllm_api/aarch64/librkllmrt.so
    git_blob: 0084abc34ab43359cfa9fd5d4c92ece34127dbd0
    elf_machine: aarch64
    dest: /opt/rkllm/runtime/1.2.3/librkllmrt.so
    mirror: "{{ rkllm_mirror_url | default('') }}"
    owner: root
    group: root
    mode: "0644"

- name: Fetch a model file pinned by the sha256 Hugging Face publishes for it
  rkllm.fleet.artifact:
    url: https://huggingface.co/c01zaut/Qwen2.5-1.5B-Instruct-RK3588-1.1.4/resolve/main/model.rkllm
    sha256: "0000000000000000000000000000000000000000000000000000000000000000"
    dest: /var/lib/rkllama/RKLLAMA/models/Qwen2.5-1.5B-Instruct/model.rkllm

- name: On an air-gapped site, take the file from a directory laid out as <host>/<path>
  rkllm.fleet.artifact:
    url: https://github.com/airockchip/rknn-llm/raw/release-v1.2.3/rkllm-runtime/Linux/librkllm_api/aarch64/librkllmrt.so
    git_blob: 0084abc34ab43359cfa9fd5d4c92ece34127dbd0
    mirror: file:///var/cache/rkllm/artifacts
    dest: /opt/rkllm/runtime/1.2.3/librkllmrt.so
'''

RETURN = r'''
dest:
  description: The path of the file.
  returned: always
  type: str
  sample: /opt/rkllm/runtime/1.2.3/librkllmrt.so
url:
  description: The URL actually used (the mirror's when O(mirror) is set).
  returned: always
  type: str
  sample: http://mirror.example:8081/github.com/airockchip/rknn-llm/raw/release-v1.2.3/rkllm-runtime/Linux/librkllm_api/aarch64/librkllmrt.so
sha256:
  description: SHA-256 of O(dest); null in check mode when the file would be downloaded.
  returned: always
  type: str
  sample: 5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef
git_blob:
  description: Git blob id of O(dest); null in check mode when the file would be downloaded.
  returned: always
  type: str
  sample: 0084abc34ab43359cfa9fd5d4c92ece34127dbd0
size:
  description: Size of O(dest) in bytes; null in check mode when the file would be downloaded.
  returned: always
  type: int
  sample: 7543648
downloaded:
  description: Whether the file was downloaded in this run.
  returned: always
  type: bool
  sample: true
attempts:
  description: Download attempts made (0 when nothing was downloaded), the refresh from a mirror included.
  returned: always
  type: int
  sample: 1
removed_partials:
  description: Partial download files an interrupted earlier run left in the directory of O(dest), removed before this run.
  returned: always
  type: list
  elements: str
  sample: [/var/lib/rkllama/RKLLAMA/models/Qwen2.5-1.5B-Instruct/.artifact-k2j3h4.part]
elf_machine:
  description: Machine named by the ELF header of O(dest), when O(elf_machine) is set and the file is in place.
  returned: when O(elf_machine) is set
  type: str
  sample: aarch64
'''

import os
import socket
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_native
from ansible.module_utils.six.moves.urllib.error import HTTPError, URLError
from ansible.module_utils.six.moves.urllib.parse import unquote, urlsplit
from ansible.module_utils.urls import open_url

from ansible_collections.rkllm.fleet.plugins.module_utils.artifacts import (
    REFRESH_HEADERS,
    ArtifactError,
    IdentityMismatch,
    RangeNotSatisfiable,
    TransientError,
    dest_state,
    elf_machine_of_file,
    fetch_verified,
    mirror_url,
    normalize_identity,
    place,
    refreshable,
    remove_stale_parts,
)


REDIRECT_CODES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10


def make_opener(validate_certs=True, sensitive=()):
    """Return ``opener(url, timeout)`` that maps transport failures to TransientError.

    Headers named in ``sensitive`` (the caller's O(headers), e.g. a token) go to the first URL's host
    only: when a request carries one, redirects are followed here, and such headers are dropped on a
    redirect to another host or from https to http.
    """
    sensitive = set(h.lower() for h in sensitive)

    def opener(url, timeout, headers=None):
        hops = 0
        while True:
            carried = [k for k in (headers or {}) if k.lower() in sensitive]
            try:
                return open_one(url, timeout, headers, 'none' if carried else 'safe')
            except HTTPError as e:
                if not carried or e.code not in REDIRECT_CODES:
                    raise_http(url, e)
                hops += 1
                newurl = e.filename or ''
                old, new = urlsplit(url), urlsplit(newurl)
                if hops > MAX_REDIRECTS or new.scheme not in ('http', 'https'):
                    raise ArtifactError('%s redirected too often or to %s; nothing was changed.'
                                        % (url, new.scheme or 'an unusable URL'))
                if (new.scheme, new.netloc.lower()) != (old.scheme, old.netloc.lower()) and not (
                        old.scheme == 'http' and new.scheme == 'https' and new.netloc.lower() == old.netloc.lower()):
                    headers = dict((k, v) for k, v in headers.items() if k.lower() not in sensitive)
                url = newurl

    def raise_http(url, e):
        if e.code == 416:
            raise RangeNotSatisfiable('HTTP 416 to a resumed download')
        if e.code >= 500 or e.code in (408, 429):
            raise TransientError('HTTP %d %s' % (e.code, to_native(e.reason)))
        raise ArtifactError('%s answered HTTP %d %s; nothing was changed. Check the URL, or that the mirror holds this file.'
                            % (url, e.code, to_native(e.reason)))

    def open_one(url, timeout, headers, follow):
        parts = urlsplit(url)
        if parts.scheme == 'file':
            path = unquote(parts.path)
            try:
                return open(path, 'rb')
            except (IOError, OSError) as e:
                raise ArtifactError('Cannot read %s (%s); pre-seed the artifact directory with this file.' % (path, to_native(e)))
        if parts.scheme not in ('http', 'https'):
            raise ArtifactError('Unsupported URL scheme in %s; use http, https or file.' % url)
        try:
            return open_url(url, timeout=timeout, validate_certs=validate_certs, follow_redirects=follow,
                            http_agent='rkllm.fleet-artifact', headers=headers)
        except HTTPError:
            raise
        except (URLError, socket.timeout, socket.error, IOError) as e:
            raise TransientError(to_native(getattr(e, 'reason', e)))

    return opener


def run(params, check_mode, opener=None, sleep=None, log=None):
    """Do the work; return the result dict (without file attribute changes). Raises ArtifactError."""
    started = time.time()
    kind, value = normalize_identity(params.get('sha256'), params.get('git_blob'))
    dest = params['dest']
    elf = params.get('elf_machine')
    url = mirror_url(params['url'], params.get('mirror') or '')
    result = {'changed': False, 'dest': dest, 'url': url, 'downloaded': False, 'attempts': 0,
              'sha256': None, 'git_blob': None, 'size': None, 'removed_partials': []}

    if not check_mode:
        # A run killed mid-download (Ctrl-C, a lost controller) leaves its partial file behind.
        result['removed_partials'] = remove_stale_parts(os.path.dirname(os.path.abspath(dest)), started)

    ok, ids = dest_state(dest, kind, value, elf)
    if ok:
        result.update(ids)
        if elf:
            result['elf_machine'] = elf
        return result

    result['changed'] = True
    if check_mode:
        return result

    kwargs = {'elf': elf, 'retries': params.get('retries', 3), 'timeout': params.get('timeout', 60),
              'delay': params.get('retry_delay', 1.0), 'deadline': params.get('deadline', 7200), 'log': log}
    if sleep is not None:
        kwargs['sleep'] = sleep
    extra = dict((to_native(k), to_native(v)) for k, v in (params.get('headers') or {}).items())
    opener = opener or make_opener(params.get('validate_certs', True), sensitive=list(extra))
    if extra:
        kwargs['headers'] = extra
    try:
        tmp, ids, attempts = fetch_verified(opener, url, dest, kind, value, **kwargs)
    except IdentityMismatch as e:
        if not (params.get('mirror') and refreshable(url)):
            raise
        # The mirror may hold a corrupt copy (a bad upstream answer it cached): ask it to refetch once.
        if log:
            log('%s; asking the mirror to fetch %s from its upstream again' % (e, url))
        try:
            kwargs['headers'] = dict(extra, **REFRESH_HEADERS)
            tmp, ids, attempts = fetch_verified(opener, url, dest, kind, value, **kwargs)
        except IdentityMismatch as again:
            raise IdentityMismatch('%s (The mirror was asked to fetch it from its upstream again; the new copy is wrong too.)' % again)
        attempts += e.attempts
    place(tmp, dest, mode=0o644)
    result.update(ids)
    result['downloaded'] = True
    result['attempts'] = attempts
    if elf:
        result['elf_machine'] = elf_machine_of_file(dest)
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            url=dict(type='str', required=True),
            dest=dict(type='path', required=True),
            sha256=dict(type='str'),
            git_blob=dict(type='str'),
            elf_machine=dict(type='str', choices=['aarch64', 'arm', 'x86_64']),
            mirror=dict(type='str', default=''),
            retries=dict(type='int', default=3),
            retry_delay=dict(type='float', default=1.0),
            timeout=dict(type='int', default=60),
            deadline=dict(type='int', default=7200),
            validate_certs=dict(type='bool', default=True),
            headers=dict(type='dict', default={}, no_log=True),
        ),
        mutually_exclusive=[('sha256', 'git_blob')],
        required_one_of=[('sha256', 'git_blob')],
        add_file_common_args=True,
        supports_check_mode=True,
    )
    if module.params['retries'] < 0:
        module.fail_json(msg='retries must be 0 or more.')
    if module.params['deadline'] < 0:
        module.fail_json(msg='deadline must be 0 (none) or a number of seconds.')
    if module.params['timeout'] <= 0:
        module.fail_json(msg='timeout must be a number of seconds greater than 0.')
    try:
        used_url = mirror_url(module.params['url'], module.params['mirror'] or '')
    except ArtifactError:
        used_url = module.params['url']
    try:
        result = run(module.params, module.check_mode, log=module.warn if module._verbosity >= 1 else None)
    except ArtifactError as e:
        module.fail_json(msg=str(e), dest=module.params['dest'], url=used_url)
    for path in result['removed_partials']:
        module.warn('Removed %s, a partial download an interrupted earlier run left behind.' % path)

    if os.path.exists(result['dest']):
        file_args = module.load_file_common_arguments(module.params, path=result['dest'])
        result['changed'] = module.set_fs_attributes_if_different(file_args, result['changed'])
    module.exit_json(**result)


if __name__ == '__main__':
    main()
