# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""rkllm.fleet.source_patches against real temporary git repositories, run as Ansible runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from ansible_collections.rkllm.fleet.plugins.modules import source_patches

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..', '..'))
GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME='t', GIT_AUTHOR_EMAIL='t@example.com', GIT_COMMITTER_NAME='t',
               GIT_COMMITTER_EMAIL='t@example.com', GIT_CONFIG_GLOBAL='/dev/null', GIT_CONFIG_NOSYSTEM='1')

PROCESS_PY = ''.join('line %d of the read loop\n' % i for i in range(1, 21))
SERVER_PY = 'import flask\n\napp = flask.Flask(__name__)\n\n\ndef main():\n    app.run()\n'


def git(cwd, *args):
    return subprocess.run(['git'] + list(args), cwd=cwd, env=GIT_ENV, check=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True).stdout.strip()


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)


def read(path):
    with open(path) as f:
        return f.read()


def make_patch(repo, dest, edit, header='Subject: a fix\n\nWhat the fork does wrong and what the fix does.\n\n'):
    """Write the diff that EDIT(repo) makes to the pristine tree into DEST, then restore the tree."""
    edit(repo)
    git(repo, 'add', '-A')
    diff = git(repo, 'diff', '--cached', '-U1', 'HEAD') + '\n'
    git(repo, 'reset', '--quiet', '--hard', 'HEAD')
    git(repo, 'clean', '-fdq')
    write(dest, header + diff)
    return dest


def edit_drain(repo):
    text = read(os.path.join(repo, 'src', 'process.py')).replace('line 10 of', 'line 10 (drained) of')
    write(os.path.join(repo, 'src', 'process.py'), text)


def edit_lock(repo):
    text = read(os.path.join(repo, 'src', 'process.py')).replace('line 3 of', 'line 3 (locked) of')
    write(os.path.join(repo, 'src', 'process.py'), text)
    write(os.path.join(repo, 'src', 'serial_lock.py'), 'LOCK = None\n')


@pytest.fixture
def fork(tmp_path):
    """A work tree at its second commit, and patches for it: (repo, commit, {slug: patch path})."""
    repo = str(tmp_path / 'src')
    os.mkdir(repo)
    git(repo, 'init', '-q')
    write(os.path.join(repo, 'server.py'), SERVER_PY)
    git(repo, 'add', '-A')
    git(repo, 'commit', '-qm', 'first')
    write(os.path.join(repo, 'src', 'process.py'), PROCESS_PY)
    write(os.path.join(repo, '.gitignore'), 'src/__pycache__\n')
    git(repo, 'add', '-A')
    git(repo, 'commit', '-qm', 'second')
    commit = git(repo, 'rev-parse', 'HEAD')
    patches_dir = str(tmp_path / 'patches')
    patches = {
        'drain': make_patch(repo, os.path.join(patches_dir, '0001-drain-token-buffer.patch'), edit_drain),
        'lock': make_patch(repo, os.path.join(patches_dir, '0002-serialize-streams.patch'), edit_lock),
    }
    return repo, commit, patches


def run_module(args, check=False):
    """Run the module file as Ansible does (JSON args file), return (rc, result)."""
    module_args = dict(args)
    if check:
        module_args['_ansible_check_mode'] = True
    with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as f:
        json.dump({'ANSIBLE_MODULE_ARGS': module_args}, f)
    env = dict(GIT_ENV, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, '.cache', 'collections')] + sys.path))
    try:
        proc = subprocess.run([sys.executable, source_patches.__file__, f.name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, check=False)
    finally:
        os.unlink(f.name)
    return proc.returncode, json.loads(proc.stdout.decode())


def patch(repo, commit, patches, check=False, **extra):
    rc, result = run_module(dict(path=repo, commit=commit, patches=patches, **extra), check=check)
    assert rc == 0, result
    return result


def snapshot(repo):
    """Every file under the repo (its .git included) with its content: proves a run changed nothing."""
    files = {}
    for dirpath, _dirs, names in os.walk(repo):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, 'rb') as f:
                files[os.path.relpath(full, repo)] = f.read()
    return files


def tree_of(repo, commit, edits):
    """The tree id git itself gives COMMIT with EDITS applied (in a throwaway clone)."""
    clone = repo + '-clone'
    subprocess.run(['git', 'clone', '-q', repo, clone], env=GIT_ENV, check=True)
    git(clone, 'checkout', '-q', commit)
    for edit in edits:
        edit(clone)
    git(clone, 'add', '-A')
    tree = git(clone, 'write-tree')
    subprocess.run(['rm', '-rf', clone], check=True)
    return tree


def test_patches_are_applied_in_order_recorded_and_a_rerun_changes_nothing(fork):
    repo, commit, patches = fork
    first = patch(repo, commit, [patches['drain'], patches['lock']])
    assert first['changed'] is True
    assert first['applied'] == ['0001-drain-token-buffer.patch', '0002-serialize-streams.patch']
    assert 'line 10 (drained) of' in read(os.path.join(repo, 'src', 'process.py'))
    assert 'line 3 (locked) of' in read(os.path.join(repo, 'src', 'process.py'))
    assert read(os.path.join(repo, 'src', 'serial_lock.py')) == 'LOCK = None\n'
    assert first['tree_id'] == tree_of(repo, commit, [edit_drain, edit_lock])
    record = json.loads(read(os.path.join(repo, '.git', 'rkllm-fleet-patches.json')))
    assert record['patch_set_id'] == first['patch_set_id']
    assert record['tree_id'] == first['tree_id']
    assert record['patches'] == first['patches']

    before = snapshot(repo)
    second = patch(repo, commit, [patches['drain'], patches['lock']])
    assert second['changed'] is False
    assert second['applied'] == []
    assert (second['patch_set_id'], second['tree_id']) == (first['patch_set_id'], first['tree_id'])
    assert snapshot(repo) == before


def test_the_work_tree_stays_at_the_commit_and_git_s_objects_are_not_touched(fork):
    repo, commit, patches = fork
    objects_before = snapshot(os.path.join(repo, '.git', 'objects'))
    patch(repo, commit, [patches['drain']])
    assert git(repo, 'rev-parse', 'HEAD') == commit
    assert snapshot(os.path.join(repo, '.git', 'objects')) == objects_before


def test_patch_set_id_depends_on_commit_names_contents_and_order(fork, tmp_path):
    repo, commit, patches = fork
    ids = set()
    ids.add(patch(repo, commit, [patches['drain'], patches['lock']], check=True)['patch_set_id'])
    ids.add(patch(repo, commit, [patches['lock'], patches['drain']], check=True)['patch_set_id'])
    renamed = str(tmp_path / '0001-other-name.patch')
    write(renamed, read(patches['drain']))
    ids.add(patch(repo, commit, [renamed, patches['lock']], check=True)['patch_set_id'])
    reworded = str(tmp_path / 'reworded' / '0001-drain-token-buffer.patch')
    write(reworded, read(patches['drain']).replace('Subject: a fix', 'Subject: the fix'))
    ids.add(patch(repo, commit, [reworded, patches['lock']], check=True)['patch_set_id'])
    git(repo, 'commit', '-q', '--allow-empty', '-m', 'third')
    ids.add(patch(repo, git(repo, 'rev-parse', 'HEAD'), [patches['drain'], patches['lock']],
                  check=True)['patch_set_id'])
    assert len(ids) == 5
    assert patch(repo, commit, [patches['drain']], check=True)['patch_set_id'] == \
        patch(repo, commit, [patches['drain']], check=True)['patch_set_id']


def test_check_mode_reports_the_change_and_writes_nothing(fork):
    repo, commit, patches = fork
    before = snapshot(repo)
    result = patch(repo, commit, [patches['drain'], patches['lock']], check=True)
    assert result['changed'] is True
    assert result['applied'] == ['0001-drain-token-buffer.patch', '0002-serialize-streams.patch']
    assert result['tree_id'] == tree_of(repo, commit, [edit_drain, edit_lock])
    assert snapshot(repo) == before

    patch(repo, commit, [patches['drain'], patches['lock']])
    again = patch(repo, commit, [patches['drain'], patches['lock']], check=True)
    assert again['changed'] is False


def test_check_mode_on_a_board_without_the_checkout_or_the_patch_files_does_not_fail(tmp_path, fork):
    _repo, commit, patches = fork
    missing = str(tmp_path / 'release' / 'src')
    result = patch(missing, commit, [patches['drain']], check=True)
    assert result['changed'] is True
    assert not os.path.exists(missing)
    result = patch(missing, commit, [str(tmp_path / 'release' / 'patches' / '0001-x.patch')], check=True)
    assert result['changed'] is True
    assert result['patch_set_id'] is None


def test_a_missing_checkout_fails_outside_check_mode(tmp_path, fork):
    _repo, commit, patches = fork
    rc, result = run_module(dict(path=str(tmp_path / 'nowhere'), commit=commit, patches=[patches['drain']]))
    assert rc == 1
    assert 'is not the top of a git work tree' in result['msg']


def test_head_at_another_commit_fails_and_changes_nothing(fork):
    repo, commit, patches = fork
    git(repo, 'checkout', '-q', 'HEAD~1')
    before = snapshot(repo)
    rc, result = run_module(dict(path=repo, commit=commit, patches=[patches['drain']], hint='Check the checkout.'))
    assert rc == 1
    assert result['msg'] == '%s is at commit %s, not %s, the commit the patches are for. Check the checkout.' % (
        repo, git(repo, 'rev-parse', 'HEAD'), commit)
    assert snapshot(repo) == before
    assert patch(repo, commit, [patches['drain']], check=True)['changed'] is True


def test_a_patch_that_does_not_apply_fails_with_git_s_message_and_the_hint_before_touching_the_tree(fork, tmp_path):
    repo, commit, patches = fork
    patch(repo, commit, [patches['drain']])
    before = snapshot(repo)
    foreign = str(tmp_path / '0002-other-fork.patch')
    write(foreign, read(patches['lock']).replace('line 2 of the read loop', 'line 2 of another loop'))
    hint = 'Point rkllama_patch_dir at patches for this commit, or set rkllama_patches_enabled to false.'
    for check in (False, True):
        rc, result = run_module(dict(path=repo, commit=commit, patches=[patches['drain'], foreign], hint=hint),
                                check=check)
        assert rc == 1
        assert result['msg'].startswith('Patch 0002-other-fork.patch does not apply to %s in %s: ' % (commit, repo))
        assert 'patch failed: src/process.py' in result['msg']
        assert result['msg'].endswith('. ' + hint)
        assert snapshot(repo) == before


def test_another_patch_set_resets_the_tree_and_removes_only_files_the_patches_created(fork):
    repo, commit, patches = fork
    patch(repo, commit, [patches['drain'], patches['lock']])
    write(os.path.join(repo, 'models', 'notes.txt'), 'an operator file\n')
    write(os.path.join(repo, 'src', '__pycache__', 'process.cpython-311.pyc'), 'ignored\n')
    result = patch(repo, commit, [patches['drain']])
    assert result['changed'] is True
    assert result['applied'] == ['0001-drain-token-buffer.patch']
    text = read(os.path.join(repo, 'src', 'process.py'))
    assert 'line 10 (drained) of' in text and 'line 3 (locked) of' not in text
    assert not os.path.exists(os.path.join(repo, 'src', 'serial_lock.py'))
    assert read(os.path.join(repo, 'models', 'notes.txt')) == 'an operator file\n'
    assert os.path.exists(os.path.join(repo, 'src', '__pycache__', 'process.cpython-311.pyc'))


def test_no_patches_resets_a_patched_tree_to_the_pristine_commit(fork):
    repo, commit, patches = fork
    patch(repo, commit, [patches['drain'], patches['lock']])
    result = patch(repo, commit, [])
    assert result['changed'] is True
    assert result['patches'] == [] and result['applied'] == []
    assert result['tree_id'] == git(repo, 'rev-parse', commit + '^{tree}')
    assert git(repo, 'status', '--porcelain') == ''
    assert patch(repo, commit, [])['changed'] is False


def test_local_edits_are_replaced_by_the_patched_files(fork):
    repo, commit, patches = fork
    first = patch(repo, commit, [patches['drain']])
    with open(os.path.join(repo, 'server.py'), 'a') as f:
        f.write('# hand edit\n')
    os.unlink(os.path.join(repo, 'src', 'process.py'))
    result = patch(repo, commit, [patches['drain']])
    assert result['changed'] is True
    assert result['tree_id'] == first['tree_id']
    assert read(os.path.join(repo, 'server.py')) == SERVER_PY


def test_a_tree_patched_by_hand_is_recognised_without_a_change(fork):
    repo, commit, patches = fork
    git(repo, 'apply', patches['drain'])
    result = patch(repo, commit, [patches['drain']])
    assert result['changed'] is False
    assert result['tree_id'] == tree_of(repo, commit, [edit_drain])
    assert os.path.exists(os.path.join(repo, '.git', 'rkllm-fleet-patches.json'))


def test_a_patch_the_commit_already_contains_is_skipped(fork):
    repo, commit, patches = fork
    edit_drain(repo)
    git(repo, 'commit', '-qam', 'upstream merged the fix')
    newer = git(repo, 'rev-parse', 'HEAD')
    result = patch(repo, newer, [patches['drain'], patches['lock']])
    assert result['in_commit'] == ['0001-drain-token-buffer.patch']
    assert result['applied'] == ['0002-serialize-streams.patch']
    assert patch(repo, newer, [patches['drain'], patches['lock']])['changed'] is False


def test_an_unrelated_untracked_file_does_not_make_every_run_a_change(fork):
    repo, commit, patches = fork
    write(os.path.join(repo, 'local.cfg'), 'x = 1\n')
    first = patch(repo, commit, [patches['drain']])
    assert first['changed'] is True
    assert read(os.path.join(repo, 'local.cfg')) == 'x = 1\n'
    assert patch(repo, commit, [patches['drain']])['changed'] is False


def test_a_short_commit_id_is_refused(fork):
    repo, commit, patches = fork
    rc, result = run_module(dict(path=repo, commit=commit[:7], patches=[patches['drain']]))
    assert rc == 1
    assert 'full 40-hex commit id' in result['msg']
