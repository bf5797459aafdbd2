# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleet's model spread (``rkllm_model_pools``) resolved into each board's assigned model, as a Jinja2 filter.

Documented in ``model_spread.yml`` beside this file (``ansible-doc -t filter rkllm.fleet.model_spread``).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError


def _can_run(board):
    """Catalog names this board can serve: the catalog has a file for its platform and the board gets the model."""
    platform = board.get('platform')
    wanted = board.get('board_models')
    names = []
    for model in board.get('catalog') or []:
        name = model.get('name')
        files = model.get('files') or {}
        if not platform or platform not in files:
            continue
        if wanted is not None and name not in wanted:
            continue
        names.append(name)
    return names


def _check_pools(pools, catalog_names):
    if not isinstance(pools, dict):
        raise AnsibleFilterError('rkllm_model_pools must be a dict of catalog name -> number of boards, for example '
                                 '{"Qwen2.5-1.5B-Instruct": 2, "DeepSeek-R1-1.5B": 1}; got %r.' % (pools,))
    counts = {}
    for name, count in pools.items():
        if not isinstance(name, str) or name not in catalog_names:
            raise AnsibleFilterError('rkllm_model_pools names %r, which is not in the model catalog (rkllama_models: %s): '
                                     'use a catalog name.' % (name, ', '.join(sorted(catalog_names)) or 'empty'))
        if isinstance(count, bool) or not isinstance(count, int):
            try:
                count = int(str(count), 10)
            except ValueError:
                count = -1
        if count < 0:
            raise AnsibleFilterError('rkllm_model_pools.%s must be a whole number of boards (0 or more); got %r.'
                                     % (name, pools[name]))
        counts[name] = count
    return counts


def model_spread(boards, pools):
    """``{board: catalog name}`` for the boards the spread assigns; raises AnsibleFilterError when it can't fit.

    ``boards``: the inventory's boards in inventory order, each ``{'name', 'platform', 'catalog', 'board_models'}``
    (``platform`` None when the board has no RKLLM platform; ``board_models`` None for the whole catalog).
    The result is the same for the same inventory and platforms, whichever boards a run is limited to.
    """
    if not pools:
        return {}
    boards = list(boards or [])
    catalog_names = set()
    for board in boards:
        for model in board.get('catalog') or []:
            catalog_names.add(model.get('name'))
    counts = _check_pools(pools, catalog_names)
    can_run = dict((b['name'], _can_run(b)) for b in boards)
    order = [b['name'] for b in boards]

    total = sum(counts.values())
    if total > len(order):
        raise AnsibleFilterError('rkllm_model_pools asks for %d boards in all (%s) but the inventory has %d (%s): lower '
                                 'the counts or add boards.'
                                 % (total, ', '.join('%s: %d' % kv for kv in sorted(counts.items())), len(order),
                                    ', '.join(order) or 'none'))
    for name in sorted(counts):
        able = [b for b in order if name in can_run[b]]
        if counts[name] > len(able):
            unable = ['%s (%s)' % (b['name'], b.get('platform') or 'no RKLLM platform') for b in boards
                      if name not in can_run[b['name']]]
            raise AnsibleFilterError(
                'rkllm_model_pools asks for %d boards serving %s, but only %d can run it (%s); the catalog has no %s file '
                'for the platform of, or the board does not get the model (rkllama_board_models): %s. Lower the count, '
                'or add a file for those platforms to the catalog entry.'
                % (counts[name], name, len(able), ', '.join(able) or 'none', name, ', '.join(unable) or 'none'))

    # One slot per board a pool needs; the most constrained model first, so it gets boards before a model
    # any board runs takes them. Boards are matched in inventory order (Kuhn's augmenting paths), so the
    # first boards of the inventory are the ones the spread sets, and a board moves only when it must.
    slots = []
    for name in sorted(counts, key=lambda n: (len([b for b in order if n in can_run[b]]), n)):
        slots.extend([name] * counts[name])
    slot_of = {}
    board_in = {}

    def place(board, seen):
        fits = [i for i, name in enumerate(slots) if name in can_run[board] and i not in seen]
        # A free slot first; only when none is left, move a board placed before (augmenting path).
        for index in [i for i in fits if i not in board_in] + [i for i in fits if i in board_in]:
            if index in seen:
                continue
            seen.add(index)
            if index not in board_in or place(board_in[index], seen):
                board_in[index] = board
                slot_of[board] = index
                return True
        return False

    for board in order:
        if len(slot_of) == len(slots):
            break
        place(board, set())
    if len(slot_of) < len(slots):
        missing = {}
        for index, name in enumerate(slots):
            if index not in board_in:
                missing[name] = missing.get(name, 0) + 1
        raise AnsibleFilterError(
            'rkllm_model_pools can not be spread over the boards: %s left without a board. Boards and the models each '
            'can run: %s.' % (', '.join('%d for %s' % (n, m) for m, n in sorted(missing.items())),
                              '; '.join('%s: %s' % (b, ', '.join(can_run[b]) or 'none') for b in order)))
    return dict((board, slots[index]) for board, index in slot_of.items())


class FilterModule(object):
    def filters(self):
        return {'model_spread': model_spread}
