# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Version and RKLLM runtime ABI rules, board architectures and artifact URLs, as Jinja2 filters.

Each filter is documented in its own ``<name>.yml`` beside this file (``ansible-doc -t filter rkllm.fleet.<name>``).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

from ansible.errors import AnsibleFilterError

from ansible_collections.rkllm.fleet.plugins.module_utils.artifacts import (
    ArtifactError,
    artifact_relpath as _artifact_relpath,
    board_arch as _board_arch,
    mirror_url as _mirror_url,
)

VERSION_RE = re.compile(r'^(?:release-)?v?(\d+)\.(\d+)\.(\d+)$')

# (lowest, highest, family): the C ABI of librkllmrt.so changed at 1.2.0 and again at 1.3.0.
# Everything up to 1.1.4 shares the old ABI; versions outside the table are unknown (None).
ABI_FAMILIES = (
    ((0, 0, 0), (1, 1, 4), '1.1'),
    ((1, 2, 0), (1, 2, 3), '1.2'),
    ((1, 3, 0), (1, 3, 999), '1.3'),
)


def parse_version(version):
    """``'1.2.3'`` (also ``v1.2.3``, ``release-v1.2.3``) -> ``(1, 2, 3)``; anything else raises."""
    match = VERSION_RE.match(str(version).strip())
    if not match:
        raise AnsibleFilterError('%r is not an RKLLM version of the form X.Y.Z (for example 1.2.3).' % (version,))
    return tuple(int(part) for part in match.groups())


def abi_family(version):
    """C ABI family of an RKLLM runtime version: ``'1.1'``, ``'1.2'``, ``'1.3'``, or None when unknown."""
    parsed = parse_version(version)
    for low, high, family in ABI_FAMILIES:
        if low <= parsed <= high:
            return family
    return None


def version_sort(versions, reverse=False):
    """Sort X.Y.Z strings numerically (1.2.10 after 1.2.9); the strings are returned unchanged."""
    return sorted(versions, key=parse_version, reverse=bool(reverse))


def board_arch(architecture):
    """``ansible_facts['architecture']`` -> ``{'name': RKLLM directory, 'elf_machine': ELF machine}``, None if unsupported."""
    return _board_arch(architecture)


def mirror_url(url, mirror=''):
    """``https://host/path`` -> ``<mirror>/host/path``; an empty mirror keeps the URL."""
    try:
        return _mirror_url(url, mirror)
    except ArtifactError as e:
        raise AnsibleFilterError(str(e))


def artifact_relpath(url):
    """``https://host/path`` -> ``host/path``: where a mirror or a pre-seeded directory keeps the file."""
    try:
        return _artifact_relpath(url)
    except ArtifactError as e:
        raise AnsibleFilterError(str(e))


class FilterModule(object):
    def filters(self):
        return {
            'abi_family': abi_family,
            'version_sort': version_sort,
            'board_arch': board_arch,
            'mirror_url': mirror_url,
            'artifact_relpath': artifact_relpath,
        }
