#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: converged
short_description: Record a host's converged state after a full run, and check in one call that nothing drifted since
version_added: 1.0.0
description:
  - >-
    A full C(site.yml) run ends, on each board that came through it, by recording a stamp with O(state=present).
    It holds the digest of the run's inputs (O(inputs), computed on the controller) and what the roles left on the
    host. That is every file, directory and link under O(paths) (type, mode, owner, group, and the sha256 of each
    file up to O(hash_limit) bytes; size, modification time, change time and inode of bigger files and of files in
    directories named in a path's C(stat_only)), the state of O(units) (active, enabled), O(users) and O(groups),
    which O(packages) are installed, the O(urls) that must answer, the O(absent) paths that must not exist, and the
    runtime libraries O(mapped_libraries) says a service's running process must have loaded.
  - >-
    The next run calls it with O(state=check) before anything else. It changes nothing. It reads the stamp, compares
    O(inputs) with the recorded digest, walks the recorded paths again (re-hashing every hashed file), asks systemd
    for the units' states in one call, and checks users, groups, packages, absent paths, URLs and mapped libraries.
    RV(converged) is true only when everything matches; RV(reasons) lists the differences found otherwise.
  - >-
    O(state=absent) removes the stamp. A run that is about to change the host does this first, so a run that fails
    or stops part way leaves no stamp and the next run is a full one.
  - The stamp must be a regular file owned by root with mode 0600; any other stamp counts as no stamp.
author:
  - rkllm.fleet developers (@rkllm)
options:
  path:
    description:
      - The stamp file.
    type: path
    default: /var/lib/rkllm/converged.json
  state:
    description:
      - V(check) compares the host with the stamp, V(present) records the stamp, V(absent) removes it.
    type: str
    choices: [check, present, absent]
    default: check
  inputs:
    description:
      - The digest of the inputs of the run (role variables, facts and the collection's own content), computed on the
        controller. Required with O(state=check) and O(state=present).
    type: str
  paths:
    description:
      - What the roles manage, with O(state=present). Each item is a path or a dict with C(path), C(recurse)
        (walk a directory's content; default true), C(exclude) (file name patterns to leave out, at any depth) and
        C(stat_only) (names of directories whose files are compared by size, times and inode, not content).
      - A path that does not exist is recorded as absent, so its appearance later is a difference too.
    type: list
    elements: raw
    default: []
  units:
    description: systemd units whose active and enabled states are recorded (O(state=present)).
    type: list
    elements: str
    default: []
  users:
    description: Users whose uid, primary group, home, shell and group memberships are recorded (O(state=present)).
    type: list
    elements: str
    default: []
  groups:
    description: Groups whose gid is recorded (O(state=present)).
    type: list
    elements: str
    default: []
  packages:
    description: Debian packages recorded as installed or not (O(state=present)), read from the dpkg status file.
    type: list
    elements: str
    default: []
  urls:
    description: URLs that must answer with a 2xx status for the host to count as converged (O(state=present)).
    type: list
    elements: str
    default: []
  url_values:
    description:
      - With O(state=present), each item is a dict with C(url), C(key) and C(value). The URL must answer 2xx with a
        JSON object whose C(key) equals C(value) (as a string), such as the model rkllama holds (C(model_name) in
        the answer of C(/current_model)). A client can make a board load another model without changing a file;
        this sees it.
    type: list
    elements: dict
    default: []
  absent:
    description: Paths that must not exist for the host to count as converged, such as a pending-restart marker.
    type: list
    elements: path
    default: []
  mapped_libraries:
    description:
      - With O(state=present), each item is a dict with C(unit), C(library) (a file name such as C(librkllmrt.so))
        and C(path) (the library the service must run). The check fails when the unit's main process has mapped a
        file of that name other than the real path of C(path) as it was when recorded, or a deleted one.
    type: list
    elements: dict
    default: []
  hash_limit:
    description: Files up to this size (bytes) are compared by sha256; bigger ones by size, times and inode.
    type: int
    default: 8388608
  url_timeout:
    description: Seconds to wait for each of the recorded URLs.
    type: int
    default: 5
extends_documentation_fragment: [ansible.builtin.action_common_attributes, rkllm.fleet.attributes]
attributes:
  check_mode:
    details:
      - V(check) never changes anything; V(present) and V(absent) report whether they would change the stamp.
notes:
  - Files compared by size and times only (models, venvs) are not re-read, so a change that keeps size, modification
    time, change time and inode is not seen; any ordinary write or C(touch) changes the change time.
'''

EXAMPLES = r'''
- name: Check whether the board is as the last full run left it
  rkllm.fleet.converged:
    inputs: "{{ rkllm_inputs_digest }}"
  register: converged

- name: Remove the stamp before changing anything
  rkllm.fleet.converged:
    state: absent
  when: not converged.converged

- name: Record what the full run left on the board
  rkllm.fleet.converged:
    state: present
    inputs: "{{ rkllm_inputs_digest }}"
    paths:
      - /etc/systemd/system/rkllama.service
      - path: /opt/rkllm/rkllama
        exclude: [__pycache__, .git]
        stat_only: [venv]
    units: [rkllama.service]
    urls: [http://127.0.0.1:8080/]
'''

RETURN = r'''
converged:
  description: With O(state=check), whether the host matches its stamp in every recorded respect; false otherwise.
  returned: always
  type: bool
  sample: true
reasons:
  description: The differences found (at most a few of each kind), or why there is no usable stamp.
  returned: always
  type: list
  elements: str
  sample: ["changed: /etc/systemd/system/rkllama.service (content)", "unit exo-rkllm.service: inactive, recorded active"]
files:
  description: How many files, directories and links were verified (O(state=check)) or recorded (O(state=present)).
  returned: always
  type: int
  sample: 412
units:
  description: How many units were verified or recorded.
  returned: always
  type: int
  sample: 6
stamp:
  description: The stamp file's path (O(path)).
  returned: always
  type: str
  sample: /var/lib/rkllm/converged.json
msg:
  description: One line for the run's output.
  returned: always
  type: str
  sample: converged, verified 412 files, 6 units
'''

import datetime
import fnmatch
import grp
import hashlib
import json
import os
import pwd
import stat
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url

STAMP_VERSION = 1
MAX_REASONS = 8
DPKG_STATUS = '/var/lib/dpkg/status'


def normalise_paths(paths):
    """The path items as dicts with every key set, in the order given."""
    out = []
    for item in paths:
        if not isinstance(item, dict):
            item = {'path': item}
        if not item.get('path') or not os.path.isabs(item['path']):
            raise ValueError('every paths item needs an absolute path, got %r' % (item,))
        out.append({'path': os.path.normpath(item['path']),
                    'recurse': bool(item.get('recurse', True)),
                    'exclude': sorted(item.get('exclude') or []),
                    'stat_only': sorted(item.get('stat_only') or [])})
    return out


def sha256_file(path):
    """The file's sha256; a link (or FIFO) put in its place since it was looked at is not followed (or waited on)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_NONBLOCK', 0))
    with os.fdopen(fd, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def describe(path, st, hashed):
    """The recorded form of one path from its lstat result."""
    owner = {'m': '%04o' % stat.S_IMODE(st.st_mode), 'u': st.st_uid, 'g': st.st_gid}
    if stat.S_ISLNK(st.st_mode):
        entry = {'t': 'l', 'to': os.readlink(path), 'u': st.st_uid, 'g': st.st_gid}
    elif stat.S_ISDIR(st.st_mode):
        entry = dict(owner, t='d')
    elif stat.S_ISREG(st.st_mode):
        entry = dict(owner, t='f', s=st.st_size)
        if hashed:
            entry['h'] = sha256_file(path)
        else:
            entry.update(mt=st.st_mtime_ns, ct=st.st_ctime_ns, i=st.st_ino)
    else:
        entry = dict(owner, t='o')
    return entry


def scan(roots, hash_limit):
    """Every path under the roots, {path: entry}, links never followed."""
    files = {}
    for root in roots:
        walk_one(root, hash_limit, files)
    return files


def walk_one(root, hash_limit, files):
    exclude = root['exclude']
    stat_only = set(root['stat_only'])

    def excluded(name):
        return any(fnmatch.fnmatchcase(name, p) for p in exclude)

    def visit(path, in_stat_only):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            files[path] = {'t': '-'}
            return
        hashed = not in_stat_only and (not stat.S_ISREG(st.st_mode) or st.st_size <= hash_limit)
        files[path] = describe(path, st, hashed)
        if stat.S_ISDIR(st.st_mode) and root['recurse']:
            for name in sorted(os.listdir(path)):
                if not excluded(name):
                    visit(os.path.join(path, name), in_stat_only or name in stat_only)

    visit(root['path'], False)


def compare_files(recorded, current):
    """Differences between two scans, as sentences (most telling first)."""
    missing, added, changed = [], [], []
    for path in sorted(set(recorded) | set(current)):
        old, new = recorded.get(path), current.get(path)
        if old == new:
            continue
        if new is None or new.get('t') == '-':
            missing.append('removed: %s' % path)
        elif old is None or old.get('t') == '-':
            added.append('new: %s' % path)
        else:
            what = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            names = {'h': 'content', 's': 'size', 'm': 'mode', 'u': 'owner', 'g': 'group', 't': 'type', 'to': 'target',
                     'mt': 'modification time', 'ct': 'change time', 'i': 'inode'}
            changed.append('changed: %s (%s)' % (path, ', '.join(sorted(set(names.get(k, k) for k in what)))))
    return missing + changed + added


def unit_states(module, units):
    """{unit: {'active': ActiveState, 'enabled': UnitFileState, 'pid': MainPID}} in one systemctl call."""
    if not units:
        return {}
    systemctl = module.get_bin_path('systemctl', required=True)
    rc, out, err = module.run_command([systemctl, 'show', '--property=Id,ActiveState,UnitFileState,MainPID', '--']
                                      + list(units))
    if rc != 0:
        raise OSError('systemctl show failed: %s' % (err or out).strip())
    states = {}
    for unit, block in zip(units, out.strip().split('\n\n')):
        props = dict(line.split('=', 1) for line in block.splitlines() if '=' in line)
        states[unit] = {'active': props.get('ActiveState', ''), 'enabled': props.get('UnitFileState', ''),
                        'pid': props.get('MainPID', '0')}
    return states


def user_state(name):
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    member_of = sorted(g.gr_name for g in grp.getgrall() if name in g.gr_mem)
    return {'uid': pw.pw_uid, 'gid': pw.pw_gid, 'home': pw.pw_dir, 'shell': pw.pw_shell, 'groups': member_of}


def group_state(name):
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def installed_packages(names, status_file=DPKG_STATUS):
    """The names among `names` that dpkg lists as installed."""
    wanted = set(names)
    found = set()
    if not wanted:
        return []
    try:
        with open(status_file, encoding='utf-8', errors='replace') as f:
            text = f.read()
    except FileNotFoundError:
        return []
    for block in text.split('\n\n'):
        package = status = None
        for line in block.splitlines():
            if line.startswith('Package: '):
                package = line[9:].strip()
            elif line.startswith('Status: '):
                status = line[8:].strip()
        if package in wanted and status and status.endswith(' installed') and not status.endswith('not-installed'):
            found.add(package)
    return sorted(found)


def url_answers(url, timeout):
    try:
        response = open_url(url, timeout=timeout, follow_redirects='none', validate_certs=False)
        return 200 <= response.getcode() < 300
    except Exception:  # pylint: disable=broad-except  # any failure to answer is "does not answer"
        return False


def url_value(url, key, timeout):
    """The string value of `key` in the JSON object `url` answers with, or None."""
    try:
        response = open_url(url, timeout=timeout, follow_redirects='none', validate_certs=False)
        data = json.loads(response.read().decode('utf-8'))
    except Exception:  # pylint: disable=broad-except  # no answer, an error status or no JSON: no value
        return None
    if not isinstance(data, dict) or data.get(key) is None:
        return None
    return str(data[key])


def mapped_paths(pid, library):
    """The files named `library` that process `pid` has mapped, each with ' (deleted)' if so."""
    found = set()
    try:
        with open('/proc/%s/maps' % pid, encoding='utf-8', errors='replace') as f:
            for line in f:
                parts = line.rstrip('\n').split(None, 5)
                if len(parts) == 6 and os.path.basename(parts[5].replace(' (deleted)', '')) == library:
                    found.add(parts[5])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return sorted(found)


def read_stamp(path):
    """The stamp as a dict, or a reason why there is no usable one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, 'no stamp at %s (no full run has completed since it was removed)' % path
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o600:
        return None, 'the stamp %s is not a regular file of root with mode 0600: ignored' % path
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (ValueError, OSError) as e:
        return None, 'the stamp %s is unreadable (%s)' % (path, e)
    if not isinstance(data, dict) or data.get('version') != STAMP_VERSION:
        return None, 'the stamp %s was written by another version of this module' % path
    return data, None


def check(module, params):
    """Compare the host with its stamp: (converged, reasons, files verified, units verified)."""
    data, problem = read_stamp(params['path'])
    if problem:
        return False, [problem], 0, 0
    reasons = []
    if data.get('inputs') != params['inputs']:
        reasons.append('the inputs changed (variables, facts or the collection) since the last full run')
    for path in data.get('absent', []):
        if os.path.lexists(path):
            reasons.append('%s exists (an earlier run left work pending)' % path)
    states = unit_states(module, list(data.get('units', {})))
    for unit, recorded in sorted(data.get('units', {}).items()):
        now = states.get(unit, {})
        for key in ('active', 'enabled'):
            if now.get(key) != recorded.get(key):
                reasons.append('unit %s: %s %s, recorded %s' % (unit, key, now.get(key) or 'unknown', recorded.get(key)))
    for name, recorded in sorted(data.get('users', {}).items()):
        if user_state(name) != recorded:
            reasons.append('user %s differs from the recorded one' % name)
    for name, recorded in sorted(data.get('groups', {}).items()):
        if group_state(name) != recorded:
            reasons.append('group %s differs from the recorded one' % name)
    packages = data.get('packages', {})
    now_installed = set(installed_packages(packages.get('names', [])))
    if sorted(now_installed) != sorted(packages.get('installed', [])):
        reasons.append('installed packages differ: %s' % ', '.join(
            sorted(now_installed.symmetric_difference(packages.get('installed', [])))))
    for item in data.get('mapped_libraries', []):
        pid = states.get(item['unit'], {}).get('pid') or unit_states(module, [item['unit']])[item['unit']]['pid']
        stale = [p for p in mapped_paths(pid, item['library']) if p != item['path']]
        if stale:
            reasons.append('%s runs %s, not %s: it has not restarted since the library changed'
                           % (item['unit'], ', '.join(stale), item['path']))
    if not reasons:
        # The cheap checks passed: now the files (the bulk of the work), then the URLs.
        roots = normalise_paths(data.get('roots', []))
        current = scan(roots, data.get('hash_limit', params['hash_limit']))
        reasons.extend(compare_files(data.get('files', {}), current))
    if not reasons:
        for url in data.get('urls', []):
            if not url_answers(url, params['url_timeout']):
                reasons.append('%s does not answer' % url)
    if not reasons:
        for item in data.get('url_values', []):
            now = url_value(item['url'], item['key'], params['url_timeout'])
            if now != item['value']:
                reasons.append('%s reports %s %s, not %s' % (item['url'], item['key'], now or 'nothing', item['value']))
    files = len(data.get('files', {}))
    units = len(data.get('units', {}))
    if len(reasons) > MAX_REASONS:
        reasons = reasons[:MAX_REASONS] + ['and %d more differences' % (len(reasons) - MAX_REASONS)]
    return not reasons, reasons, files, units


def record(module, params):
    """The stamp's content for the host as it is now."""
    roots = normalise_paths(params['paths'])
    units = unit_states(module, params['units'])
    mapped = []
    for item in params['mapped_libraries']:
        for key in ('unit', 'library', 'path'):
            if not item.get(key):
                raise ValueError('every mapped_libraries item needs unit, library and path, got %r' % (item,))
        mapped.append({'unit': item['unit'], 'library': item['library'], 'path': os.path.realpath(item['path'])})
    values = []
    for item in params['url_values']:
        for key in ('url', 'key', 'value'):
            if item.get(key) in (None, ''):
                raise ValueError('every url_values item needs url, key and value, got %r' % (item,))
        values.append({'url': str(item['url']), 'key': str(item['key']), 'value': str(item['value'])})
    return {
        'version': STAMP_VERSION,
        'inputs': params['inputs'],
        'hash_limit': params['hash_limit'],
        'roots': roots,
        'files': scan(roots, params['hash_limit']),
        'units': dict((u, {'active': s['active'], 'enabled': s['enabled']}) for u, s in units.items()),
        'users': dict((u, user_state(u)) for u in sorted(set(params['users']))),
        'groups': dict((g, group_state(g)) for g in sorted(set(params['groups']))),
        'packages': {'names': sorted(set(params['packages'])),
                     'installed': installed_packages(params['packages'])},
        'urls': list(params['urls']),
        'absent': sorted(set(params['absent'])),
        'mapped_libraries': mapped,
        'url_values': values,
    }


def write_stamp(path, data):
    """Write atomically, root's and 0600; the time written is kept out of the comparison."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o755)
    fd, tmp = tempfile.mkstemp(prefix='.converged-', dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, 'w') as f:
            json.dump(data, f, sort_keys=True, separators=(',', ':'))
            f.write('\n')
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run(module, params):
    result = dict(changed=False, converged=False, reasons=[], files=0, units=0, stamp=params['path'])
    state = params['state']
    if state in ('check', 'present') and not params['inputs']:
        raise ValueError('inputs is required with state=%s' % state)
    if state == 'absent':
        exists = os.path.lexists(params['path'])
        if exists and not module.check_mode:
            os.unlink(params['path'])
        result.update(changed=exists, msg='stamp removed' if exists else 'no stamp')
        return result
    if state == 'check':
        converged, reasons, files, units = check(module, params)
        result.update(converged=converged, reasons=reasons, files=files, units=units,
                      msg=('converged, verified %d files, %d units' % (files, units)) if converged
                      else 'not converged: %s' % '; '.join(reasons))
        return result
    data = record(module, params)
    old, _problem = read_stamp(params['path'])
    if old is not None:
        old = dict(old)
        old.pop('written', None)
    result.update(changed=old != data, files=len(data['files']), units=len(data['units']))
    if result['changed'] and not module.check_mode:
        data['written'] = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')
        write_stamp(params['path'], data)
    result['msg'] = 'recorded %d files, %d units' % (result['files'], result['units'])
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type='path', default='/var/lib/rkllm/converged.json'),
            state=dict(type='str', choices=['check', 'present', 'absent'], default='check'),
            inputs=dict(type='str'),
            paths=dict(type='list', elements='raw', default=[]),
            units=dict(type='list', elements='str', default=[]),
            users=dict(type='list', elements='str', default=[]),
            groups=dict(type='list', elements='str', default=[]),
            packages=dict(type='list', elements='str', default=[]),
            urls=dict(type='list', elements='str', default=[]),
            absent=dict(type='list', elements='path', default=[]),
            mapped_libraries=dict(type='list', elements='dict', default=[]),
            url_values=dict(type='list', elements='dict', default=[]),
            hash_limit=dict(type='int', default=8388608),
            url_timeout=dict(type='int', default=5),
        ),
        supports_check_mode=True,
    )
    try:
        result = run(module, module.params)
    except ValueError as e:
        module.fail_json(msg=str(e))
    except (IOError, OSError) as e:
        module.fail_json(msg='%s: %s' % (module.params['path'], e))
    module.exit_json(**result)


if __name__ == '__main__':
    main()
