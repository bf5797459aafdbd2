# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the gateway serves, read from its nginx.conf, and the model pools a drain would leave empty (upgrade.yml).

Each filter is documented in its own ``<name>.yml`` beside this file (``ansible-doc -t filter rkllm.fleet.<name>``).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

from ansible.errors import AnsibleFilterError
from ansible.module_utils.six import string_types

# The gateway_nginx role writes one `upstream <name> { ... }` per pool (rkllm_pool_<model slug>; before the
# model-aware gateway, one rkllm_boards for all boards), its first comment naming the model
# (`# <catalog name> (<exo id>). ...`), and one line per board: `server <address> ...[ down]; # board <name>`.
# drain.yml and undrain.yml edit these lines; nothing in them holds braces.
_UPSTREAM = re.compile(r'(?ms)^[ \t]*upstream[ \t]+(\S+)[ \t]*\{(.*?)^[ \t]*\}')
_MODEL = re.compile(r'(?m)^[ \t]*#[ \t]*(\S+)[ \t]+\(')
_SERVER = re.compile(r'(?m)^[ \t]*server[ \t][^;#\n]*?([ \t]down)?;[ \t]*#[ \t]*board[ \t]+(\S+)[ \t]*$')


def gateway_pools(conf):
    """``{board: {'pool', 'upstream', 'drained'}}`` for every board the gateway configuration names."""
    if not isinstance(conf, string_types):
        raise AnsibleFilterError('gateway_pools expects the text of the gateway\'s nginx.conf, got %s.' % type(conf).__name__)
    boards = {}
    for upstream, body in _UPSTREAM.findall(conf):
        model = _MODEL.search(body)
        pool = model.group(1) if model and upstream.startswith('rkllm_pool_') else upstream
        for down, name in _SERVER.findall(body):
            boards[name] = {'pool': pool, 'upstream': upstream, 'drained': bool(down)}
    return boards


def pool_outages(gateway, drain, unavailable=None):
    """The pools that have a board in service now and none once ``drain`` is drained.

    ``gateway``: the result of gateway_pools. ``drain``: the boards about to be drained. ``unavailable``:
    boards that can't serve whatever the gateway says (failed or unreachable in this run).
    Returns a list, by pool name, of ``{'pool', 'ready', 'drained'}``: the boards serving the pool now, and
    those of them the drain takes out (all of them).
    """
    if not isinstance(gateway, dict):
        raise AnsibleFilterError('pool_outages expects the result of rkllm.fleet.gateway_pools, got %s.' % type(gateway).__name__)
    drain = set(drain or [])
    unavailable = set(unavailable or [])
    ready = {}
    for name, board in gateway.items():
        if not board.get('drained') and name not in unavailable:
            ready.setdefault(board['pool'], []).append(name)
    outages = []
    for pool in sorted(ready):
        now = sorted(ready[pool])
        if now and not [b for b in now if b not in drain]:
            outages.append({'pool': pool, 'ready': now, 'drained': now})
    return outages


class FilterModule(object):
    def filters(self):
        return {
            'gateway_pools': gateway_pools,
            'pool_outages': pool_outages,
        }
