#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: source_patches
short_description: Apply a set of patches to a git checkout of a pinned commit, idempotently
version_added: 1.0.0
description:
  - Makes the git work tree O(path), which must be checked out at O(commit), hold exactly O(commit) plus
    O(patches), applied in the given order.
  - Before the work tree is touched, every patch is applied to O(commit) in a scratch index, which gives the tree
    the patched work tree must have. A patch that does not apply there fails the task with git's message and the
    work tree is left as it was. A patch whose change O(commit) already contains (it applies in reverse) is skipped
    and reported in RV(in_commit).
  - When the work tree already is that tree, nothing changes. Otherwise (another patch set, local edits, a partly
    patched tree) the tracked files are reset to O(commit) with C(git reset --hard), files that earlier patch sets
    or these patches create are removed, and the patches are applied. Other untracked files are never removed.
  - The applied set is recorded in C(<git dir>/rkllm-fleet-patches.json) (C(.git/rkllm-fleet-patches.json) in a
    plain checkout), with its RV(patch_set_id) and the RV(tree_id) of the patched work tree.
  - Scratch objects are written to a temporary object directory, so the repository's object store is not touched
    by the comparison, and check mode writes nothing at all.
author:
  - rkllm.fleet developers (@rkllm)
options:
  path:
    description:
      - The git work tree to patch.
    type: path
    required: true
  commit:
    description:
      - The commit the work tree must be at (its C(HEAD)), 40 hex digits. The task fails when C(HEAD) is another commit.
    type: str
    required: true
  patches:
    description:
      - Paths on the target of the patch files (C(git diff) format; text before the first C(diff --git) is ignored),
        applied in this order. Their file names are their names in the results.
      - An empty list means the pristine O(commit), so a work tree patched earlier is reset to it.
    type: list
    elements: path
    default: []
  hint:
    description:
      - Appended to every failure message, for example what the user can do about a patch that does not apply.
    type: str
    default: ''
extends_documentation_fragment: [ansible.builtin.action_common_attributes, rkllm.fleet.attributes]
attributes:
  check_mode:
    details:
      - Reports whether the work tree would change and which patches would be applied, and writes nothing.
      - A missing checkout, a checkout at another commit or missing patch files (an earlier task that would create
        them ran in check mode too) are reported as changes, not failures. A patch that does not apply fails as it
        would in a real run.
requirements:
  - git on the target
notes:
  - Meant for a checkout made by M(ansible.builtin.git) with O(ansible.builtin.git#module:update=false) once it exists;
    with C(update=true) and C(force=true) that module resets the patched tree on every run.
seealso:
  - module: ansible.posix.patch
'''

EXAMPLES = r'''
- name: Apply the collection's patches to the pinned rkllama commit
  rkllm.fleet.source_patches:
    path: /opt/rkllm/rkllama/1d8d210ae34cf960b688183bdfe256e0b8043cab/src
    commit: 1d8d210ae34cf960b688183bdfe256e0b8043cab
    patches:
      - /opt/rkllm/rkllama/1d8d210ae34cf960b688183bdfe256e0b8043cab/patches/0001-drain-token-buffer.patch
      - /opt/rkllm/rkllama/1d8d210ae34cf960b688183bdfe256e0b8043cab/patches/0002-serialize-streams.patch
    hint: Point rkllama_patch_dir at patches for this commit, or set rkllama_patches_enabled to false.
  register: patched

- name: Run the pristine commit (a tree patched earlier is reset)
  rkllm.fleet.source_patches:
    path: /opt/rkllm/rkllama/1d8d210ae34cf960b688183bdfe256e0b8043cab/src
    commit: 1d8d210ae34cf960b688183bdfe256e0b8043cab
    patches: []
'''

RETURN = r'''
patches:
  description: Names (file names) of O(patches), in the order given.
  returned: always
  type: list
  elements: str
  sample: [0001-drain-token-buffer.patch, 0002-serialize-streams.patch]
applied:
  description: Names of the patches applied to the work tree in this run (empty when nothing changed).
  returned: always
  type: list
  elements: str
  sample: [0001-drain-token-buffer.patch, 0002-serialize-streams.patch]
in_commit:
  description: Names of patches skipped because O(commit) already contains their change (they apply in reverse).
  returned: always
  type: list
  elements: str
  sample: []
patch_set_id:
  description:
    - SHA-256 over O(commit) and each patch's name and content, in order; the same set of patches for the same commit
      always has the same id.
    - Null in check mode when a patch file is not on the target yet.
  returned: always
  type: str
  sample: 3b2f4c1d0e9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c
tree_id:
  description:
    - Git tree id of the patched work tree (its files as C(git add -A) sees them, written to a temporary index, then
      C(git write-tree)). Equal to the tree of O(commit) when O(patches) is empty and there are no local edits.
    - In check mode, the tree the work tree would have; null when that can't be known (no checkout yet).
  returned: always
  type: str
  sample: 4b825dc642cb6eb9a060e54bf8d69288fbee4904
commit:
  description: The commit the work tree is at.
  returned: always
  type: str
  sample: 1d8d210ae34cf960b688183bdfe256e0b8043cab
record:
  description: Path of the file that records the applied set.
  returned: always
  type: str
  sample: /opt/rkllm/rkllama/1d8d210ae34cf960b688183bdfe256e0b8043cab/src/.git/rkllm-fleet-patches.json
'''

import hashlib
import json
import os
import re
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule

RECORD_NAME = 'rkllm-fleet-patches.json'
COMMIT_RE = re.compile(r'^[0-9a-f]{40}$')
CREATE_RE = re.compile(r'^ create mode \d+ (.+)$')


class PatchError(Exception):
    """A failure to report as the task's message (the hint is added by the caller)."""


def patch_set_id(commit, patches):
    """sha256 over the commit and each (name, content) in order; lengths keep the fields apart."""
    digest = hashlib.sha256()
    digest.update(('rkllm-fleet-patches\0%s\0' % commit).encode())
    for name, content in patches:
        digest.update(('%s\0%d\0' % (name, len(content))).encode())
        digest.update(content)
    return digest.hexdigest()


def git_message(rc, out, err):
    text = (err or '').strip() or (out or '').strip() or 'git exited with %d' % rc
    return ' '.join(text.split())


class Repo:
    """Runs git in one work tree; scratch work goes to a temporary index and object directory."""

    def __init__(self, run_command, path):
        self._run_command = run_command
        self.path = path
        self.scratch = None

    def git(self, args, env=None, check=True, data=None):
        environ = {'LANGUAGE': 'C', 'LC_ALL': 'C', 'GIT_TERMINAL_PROMPT': '0'}
        environ.update(env or {})
        rc, out, err = self._run_command(['git'] + args, cwd=self.path, environ_update=environ, data=data,
                                         binary_data=True)
        if check and rc != 0:
            raise PatchError('git %s failed in %s: %s' % (' '.join(args), self.path, git_message(rc, out, err)))
        return rc, out, err

    def is_work_tree(self):
        if not os.path.isdir(self.path):
            return False
        rc, out, _err = self.git(['rev-parse', '--is-inside-work-tree'], check=False)
        if rc != 0 or out.strip() != 'true':
            return False
        rc, top, _err = self.git(['rev-parse', '--show-toplevel'], check=False)
        return rc == 0 and os.path.realpath(top.strip()) == os.path.realpath(self.path)

    def git_dir(self):
        return self.git(['rev-parse', '--absolute-git-dir'])[1].strip()

    def head(self):
        rc, out, _err = self.git(['rev-parse', '--verify', '--quiet', 'HEAD^{commit}'], check=False)
        return out.strip() if rc == 0 else None

    def open_scratch(self):
        self.scratch = tempfile.mkdtemp(prefix='rkllm-source-patches-')
        objects = self.git(['rev-parse', '--git-path', 'objects'])[1].strip()
        self.objects = os.path.abspath(os.path.join(self.path, objects))
        os.mkdir(os.path.join(self.scratch, 'objects'))

    def close_scratch(self):
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def scratch_env(self, index):
        return {
            'GIT_INDEX_FILE': os.path.join(self.scratch, index),
            'GIT_OBJECT_DIRECTORY': os.path.join(self.scratch, 'objects'),
            'GIT_ALTERNATE_OBJECT_DIRECTORIES': self.objects,
        }

    def commit_tree(self, commit):
        return self.git(['rev-parse', '%s^{tree}' % commit])[1].strip()

    def expected(self, commit, patches):
        """Apply (name, file) patches to COMMIT in a scratch index: (tree id, in_commit names, created paths)."""
        env = self.scratch_env('expected.index')
        self.git(['read-tree', commit], env=env)
        in_commit, created = [], []
        for name, patch_file in patches:
            rc, out, err = self.git(['apply', '--cached', '--whitespace=nowarn', patch_file], env=env, check=False)
            if rc != 0:
                rrc = self.git(['apply', '--cached', '--reverse', '--check', patch_file], env=env, check=False)[0]
                if rrc == 0:
                    in_commit.append(name)
                    continue
                raise PatchError('Patch %s does not apply to %s in %s: %s.'
                                 % (name, commit, self.path, git_message(rc, out, err).rstrip('.')))
            created.extend(self.created_by(patch_file))
        return self.git(['write-tree'], env=env)[1].strip(), in_commit, created

    def created_by(self, patch_file):
        out = self.git(['apply', '--summary', patch_file])[1]
        return [m.group(1) for m in (CREATE_RE.match(line) for line in out.splitlines()) if m]

    def work_tree_id(self):
        """The tree id of the work tree as `git add -A` sees it, without touching the real index or objects."""
        env = self.scratch_env('work.index')
        real_index = self.git(['rev-parse', '--git-path', 'index'])[1].strip()
        real_index = os.path.join(self.path, real_index)
        if os.path.exists(real_index):
            # A copy keeps git's stat cache, so unchanged files are not hashed again.
            shutil.copyfile(real_index, env['GIT_INDEX_FILE'])
        self.git(['add', '-A'], env=env)
        return self.git(['write-tree'], env=env)[1].strip()

    def is_tracked(self, commit, relpath):
        return self.git(['cat-file', '-e', '%s:%s' % (commit, relpath)], check=False)[0] == 0


def read_record(record_path):
    try:
        with open(record_path) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else {}
    except (IOError, OSError, ValueError):
        return {}


def write_record(record_path, record):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(record_path), prefix='.rkllm-fleet-patches.')
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write('\n')
        os.chmod(tmp, 0o644)
        os.replace(tmp, record_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_created(repo, commit, paths):
    """Remove files patches created (untracked at COMMIT), and their directories left empty."""
    for relpath in sorted(set(paths)):
        if os.path.isabs(relpath) or '..' in relpath.split('/') or repo.is_tracked(commit, relpath):
            continue
        full = os.path.join(repo.path, relpath)
        if os.path.islink(full) or os.path.isfile(full):
            os.unlink(full)
            parent = os.path.dirname(full)
            while parent != repo.path and os.path.isdir(parent) and not os.listdir(parent):
                os.rmdir(parent)
                parent = os.path.dirname(parent)


def run(params, check_mode, run_command):
    path = os.path.abspath(params['path'])
    commit = params['commit'].strip().lower()
    patch_files = [os.path.abspath(p) for p in params['patches'] or []]
    names = [os.path.basename(p) for p in patch_files]
    result = dict(changed=False, patches=names, applied=[], in_commit=[], patch_set_id=None, tree_id=None,
                  commit=commit, record=os.path.join(path, '.git', RECORD_NAME))
    if not COMMIT_RE.match(commit):
        raise PatchError('commit must be a full 40-hex commit id, got %r.' % params['commit'])

    contents, missing = [], []
    for name, patch_file in zip(names, patch_files):
        try:
            with open(patch_file, 'rb') as f:
                contents.append((name, f.read()))
        except (IOError, OSError) as e:
            missing.append('%s (%s)' % (patch_file, e.strerror or e))
    if missing:
        if check_mode:
            result.update(changed=True, applied=names)
            return result
        raise PatchError('Patch file(s) not readable: %s.' % ', '.join(missing))
    result['patch_set_id'] = patch_set_id(commit, contents)

    repo = Repo(run_command, path)
    if not repo.is_work_tree():
        if check_mode:
            result.update(changed=True, applied=names)
            return result
        raise PatchError('%s is not the top of a git work tree: check out %s there first.' % (path, commit))
    record_path = os.path.join(repo.git_dir(), RECORD_NAME)
    result['record'] = record_path
    head = repo.head()
    if head != commit:
        if check_mode:
            # The checkout task before this one would move HEAD in a real run.
            result.update(changed=True, applied=names)
            return result
        raise PatchError('%s is at commit %s, not %s, the commit the patches are for.' % (path, head, commit))

    repo.open_scratch()
    try:
        expected_tree, in_commit, created = repo.expected(commit, list(zip(names, patch_files)))
        result['in_commit'] = in_commit
        current_tree = repo.work_tree_id()
        record = read_record(record_path)
        up_to_date = current_tree == expected_tree or (
            record.get('patch_set_id') == result['patch_set_id'] and record.get('tree_id') == current_tree)
        to_apply = [(n, p) for n, p in zip(names, patch_files) if n not in in_commit]
        if up_to_date:
            result['tree_id'] = current_tree
        elif check_mode:
            result.update(changed=True, applied=[n for n, _p in to_apply], tree_id=expected_tree)
            return result
        else:
            repo.git(['reset', '--quiet', '--hard', commit])
            remove_created(repo, commit, list(record.get('created') or []) + created)
            for name, patch_file in to_apply:
                rc, out, err = repo.git(['apply', '--whitespace=nowarn', patch_file], check=False)
                if rc != 0:
                    raise PatchError('Patch %s does not apply to %s in %s: %s.'
                                     % (name, commit, path, git_message(rc, out, err).rstrip('.')))
                result['applied'].append(name)
            result['changed'] = True
            result['tree_id'] = repo.work_tree_id()
        new_record = dict(commit=commit, patch_set_id=result['patch_set_id'], patches=names,
                          in_commit=in_commit, created=sorted(set(created)), tree_id=result['tree_id'])
        if not check_mode and record != new_record:
            write_record(record_path, new_record)
        if result['changed'] and result['tree_id'] != expected_tree:
            result['warnings'] = ['%s holds files that are neither in %s nor from the patches (tree %s, expected %s); '
                                  'they were left in place.' % (path, commit, result['tree_id'], expected_tree)]
        return result
    finally:
        repo.close_scratch()


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type='path', required=True),
            commit=dict(type='str', required=True),
            patches=dict(type='list', elements='path', default=[]),
            hint=dict(type='str', default=''),
        ),
        supports_check_mode=True,
    )
    hint = module.params['hint'].strip()

    def run_command(args, cwd, environ_update, data=None, binary_data=False):
        return module.run_command(args, cwd=cwd, environ_update=environ_update, data=data, binary_data=binary_data)

    try:
        result = run(module.params, module.check_mode, run_command)
    except PatchError as e:
        module.fail_json(msg=('%s %s' % (e, hint)).strip(), path=module.params['path'], commit=module.params['commit'])
    except (IOError, OSError) as e:
        module.fail_json(msg=('%s: %s. %s' % (module.params['path'], e, hint)).strip())
    warnings = result.pop('warnings', [])
    for warning in warnings:
        module.warn(warning)
    module.exit_json(**result)


if __name__ == '__main__':
    main()
