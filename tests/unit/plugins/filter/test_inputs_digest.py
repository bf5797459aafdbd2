# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""rkllm.fleet.inputs_digest: any change of a board's inputs or of the collection's content gives
another digest (so the converged fast path runs the roles), the same inputs the same digest."""

from __future__ import annotations

import os

from ansible_collections.rkllm.fleet.plugins.filter import converged

INPUTS = {'rkllama': {'rkllama_port': 8080, 'rkllama_models': [{'name': 'Qwen', 'files': {'rk3588': {'sha256': 'a'}}}]},
          '_facts': {'rknpu': {'platform': 'rk3588'}}}


def test_same_inputs_same_digest_whatever_the_key_order():
    reordered = {'_facts': INPUTS['_facts'], 'rkllama': dict(reversed(list(INPUTS['rkllama'].items())))}
    assert converged.inputs_digest(INPUTS) == converged.inputs_digest(reordered)
    assert len(converged.inputs_digest(INPUTS)) == 64


def test_a_changed_value_changes_the_digest():
    changed = {'rkllama': dict(INPUTS['rkllama'], rkllama_port=8081), '_facts': INPUTS['_facts']}
    assert converged.inputs_digest(changed) != converged.inputs_digest(INPUTS)


def test_the_collection_content_is_part_of_the_digest(tmp_path):
    root = tmp_path / 'fleet'
    (root / 'roles' / 'exo' / 'templates').mkdir(parents=True)
    unit = root / 'roles' / 'exo' / 'templates' / 'exo-rkllm.service.j2'
    unit.write_text('[Service]\n')
    (root / 'galaxy.yml').write_text('version: 1.0.0\n')
    (root / 'playbooks').mkdir()
    os.symlink(str(root), str(root / 'playbooks' / 'collections'))  # as the checkout's link: not followed
    (root / 'roles' / 'exo' / '__pycache__').mkdir()
    before = converged.tree_digest(str(root))
    converged._TREE_CACHE.clear()
    (root / 'roles' / 'exo' / '__pycache__' / 'x.pyc').write_text('cache')
    assert converged.tree_digest(str(root)) == before
    converged._TREE_CACHE.clear()
    unit.write_text('[Service]\nUser=root\n')
    assert converged.tree_digest(str(root)) != before
    converged._TREE_CACHE.clear()


def test_this_collection_is_found():
    root = converged.collection_root()
    assert os.path.isfile(os.path.join(root, 'plugins', 'filter', 'converged.py'))
    assert os.path.isdir(os.path.join(root, 'roles', 'rkllama', 'tasks'))
