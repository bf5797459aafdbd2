# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The inputs digest of the converged fast path (playbooks/tasks/converged.yml).

A board whose inputs digest and managed state equal what its last full run recorded is skipped
(rkllm.fleet.converged). The digest covers the values given (every role variable as resolved for
the board, the facts the roles use) and this collection's own content, so a changed template,
task or default in the collection counts as a changed input too.
Each filter is documented in its own ``<name>.yml`` beside this file.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os

# What a run of the collection's playbooks and roles reads from the collection itself.
CONTENT = ('galaxy.yml', 'meta', 'plugins', 'roles', 'playbooks')
SKIP_DIRS = ('__pycache__',)

_TREE_CACHE = {}


def collection_root():
    """The root of the collection this file belongs to (plugins/filter/ is two levels down)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tree_digest(root=None):
    """sha256 over the relative path and content of every file of the collection's content.

    Links are not followed (playbooks/collections links back to the collection's own root).
    """
    root = root or collection_root()
    if root in _TREE_CACHE:
        return _TREE_CACHE[root]
    digest = hashlib.sha256()
    for top in CONTENT:
        start = os.path.join(root, top)
        if os.path.isfile(start):
            entries = [start]
        else:
            entries = []
            for dirpath, dirnames, filenames in os.walk(start):
                dirnames[:] = sorted(d for d in dirnames
                                     if d not in SKIP_DIRS and not os.path.islink(os.path.join(dirpath, d)))
                entries.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.endswith('.pyc'))
        for path in entries:
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                data = b'link:' + os.readlink(path).encode('utf-8', 'surrogateescape')
            else:
                with open(path, 'rb') as f:
                    data = f.read()
            digest.update(rel.encode('utf-8', 'surrogateescape') + b'\0')
            digest.update(hashlib.sha256(data).digest())
    _TREE_CACHE[root] = digest.hexdigest()
    return _TREE_CACHE[root]


def inputs_digest(value):
    """sha256 over the canonical JSON of the value and the collection's content digest."""
    text = json.dumps(value, sort_keys=True, separators=(',', ':'), default=str)
    return hashlib.sha256(('%s\n%s' % (tree_digest(), text)).encode('utf-8')).hexdigest()


class FilterModule(object):
    def filters(self):
        return {'inputs_digest': inputs_digest}
