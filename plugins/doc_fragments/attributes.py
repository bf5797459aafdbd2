# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    """The attribute support every rkllm.fleet module shares: full check mode, no diff, POSIX hosts.

    Used after ansible.builtin.action_common_attributes, which describes the attributes. A module
    still gives its own check_mode details, and platform details where it has some: ansible-core
    merges a module's keys of an attribute over these (a module without check mode would say
    support: none there).
    """

    DOCUMENTATION = r"""
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
"""
