# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Every file, link or directory a board role writes lies under a path the converged fast path
records (each role's _<role>_managed.paths in vars/main.yml), so a hand edit or a removal there is
seen before the next run skips the board. A task added with a destination elsewhere fails here
until the role's list covers it."""

from __future__ import annotations

import os
import re

import pytest
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..'))
ROLES = ('npu', 'runtime', 'rkllama', 'exo')
# Modules that write on the board, and the option naming what they write.
WRITERS = {
    'ansible.builtin.copy': 'dest', 'ansible.builtin.template': 'dest', 'ansible.builtin.file': 'path',
    'ansible.builtin.git': 'dest', 'ansible.builtin.unarchive': 'dest', 'ansible.builtin.lineinfile': 'path',
    'ansible.builtin.blockinfile': 'path', 'rkllm.fleet.artifact': 'dest', 'ansible.builtin.pip': 'virtualenv',
}
# Destinations computed by earlier tasks (not from the role's variables): where they lie.
COMPUTED = {
    ('rkllama', 'Create the Hugging Face cache directories, root\'s and read-only for the service'):
        '/var/lib/rkllama/.cache/huggingface/hub',
    ('rkllama', 'Download the tokenizer files into the Hugging Face cache'): '/var/lib/rkllama/.cache/huggingface/hub',
    ('rkllama', 'Download the model files'): '/var/lib/rkllama/RKLLAMA/models',
    ('rkllama', 'Point each tokenizer cache\'s main ref at its revision'): '/var/lib/rkllama/.cache/huggingface/hub',
    ('rkllama', 'Remove patches of an earlier set'): '/opt/rkllm/rkllama/x/patches',
    ('runtime', 'Remove runtime versions beyond runtime_keep_versions'): '/opt/rkllm/runtime/x',
    ('exo', 'Remove the build\'s by-products from the checkout'): '/opt/rkllm/exo/x/src',
    ('exo', 'Remove old releases'): '/opt/rkllm/exo/x',
    ('rkllama', 'Remove old releases'): '/opt/rkllm/rkllama/x',
    ('rkllama', 'Place the patches'): '/opt/rkllm/rkllama/x/patches',
    ('exo', 'Copy exo\'s patches'): '/opt/rkllm/exo/x/patches',
    ('runtime', 'Create the pre-seeded artifacts\' directories on the host'): '/var/cache/rkllm/artifacts/x',
}
SIMPLE = re.compile(r'\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}')


def load(path):
    with open(path) as f:
        return yaml.safe_load(f) or {}


def role_vars():
    values = {}
    for role in ROLES:
        for part in ('defaults', 'vars'):
            values.update(load(os.path.join(ROOT, 'roles', role, part, 'main.yml')))
    return values


def expand(text, values):
    for _round in range(10):
        new = SIMPLE.sub(lambda m: str(values[m.group(1)]) if isinstance(values.get(m.group(1)), str)
                         else m.group(0), text)
        if new == text:
            break
        text = new
    return text


def concrete_prefix(text):
    return text.split('{{', 1)[0]


def managed_roots(values):
    roots = []
    for role in ROLES:
        managed = values['_%s_managed' % role]
        paths = managed['paths']
        if isinstance(paths, str):  # an expression: its literal parts and variables
            paths = re.findall(r'[A-Za-z_][A-Za-z0-9_]*', paths)
            paths = [values[p] for p in paths if isinstance(values.get(p), str) and values[p].startswith(('/', '{{'))]
        for item in paths:
            path = item['path'] if isinstance(item, dict) else item
            roots.append(expand(path, values).rstrip('/'))
    return roots


def tasks_of(node):
    for task in node if isinstance(node, list) else []:
        if not isinstance(task, dict):
            continue
        for key in ('block', 'rescue', 'always'):
            yield from tasks_of(task.get(key))
        yield task


def writes():
    """(role, task name, destination expressions) for every writing task of the board roles."""
    for role in ROLES:
        task_dir = os.path.join(ROOT, 'roles', role, 'tasks')
        for name in sorted(os.listdir(task_dir)):
            for task in tasks_of(load(os.path.join(task_dir, name))):
                for module, option in WRITERS.items():
                    if module in task and isinstance(task[module], dict) and option in task[module]:
                        dest = str(task[module][option])
                        loop = task.get('loop')
                        if re.fullmatch(r'\{\{\s*item(\.path)?\s*\}\}', dest) and isinstance(loop, list):
                            dests = [str(i['path'] if isinstance(i, dict) else i) for i in loop]
                        else:
                            dests = [dest]
                        yield role, task.get('name', ''), dests


def test_every_path_a_board_role_writes_is_recorded():
    values = role_vars()
    roots = managed_roots(values)
    uncovered = []
    found = list(writes())
    assert len(found) > 40 and {entry[0] for entry in found} == set(ROLES)
    for role, name, dests in found:
        for dest in dests:
            prefix = concrete_prefix(expand(dest, values))
            if not prefix.startswith('/'):
                prefix = COMPUTED.get((role, name), '')
            if not prefix or not any(prefix == r or prefix.startswith(r + '/') for r in roots):
                uncovered.append('%s: %s -> %s' % (role, name, dest))
    assert not uncovered, 'not recorded by the fast path (add to _<role>_managed.paths): %s' % uncovered


@pytest.mark.parametrize('missing', ['/etc/systemd/system/rkllama.service', '/etc/exo-rkllm'])
def test_a_path_left_out_of_the_lists_is_found(missing):
    """The check above can fail: with one recorded path taken out, the tasks writing there are named."""
    values = role_vars()
    roots = [r for r in managed_roots(values) if r != missing]
    found = []
    for role, name, dests in writes():
        for dest in dests:
            prefix = concrete_prefix(expand(dest, values))
            if prefix.startswith('/') and not any(prefix == r or prefix.startswith(r + '/') for r in roots):
                found.append(prefix)
    assert any(f == missing or f.startswith(missing + '/') for f in found), found
