#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: npu_facts
short_description: Report a Rockchip board's NPU, its kernel driver and whether RKLLM can run on it
version_added: 1.0.0
description:
  - Reads the device tree, the rknpu driver's files, the NPU's device node and its devfreq
    directory, and returns them as the C(rknpu) fact, with a verdict (RV(ansible_facts.rknpu.supported))
    and, when RKLLM can't run, one plain sentence per reason saying what to do (RV(ansible_facts.rknpu.problems)).
  - The SoC comes from the device tree's compatible strings, most specific first; an S variant named
    anywhere (C(rockchip,rk3588s-orangepi-5)) gives C(rk3588s), which is still RKLLM platform C(rk3588).
  - "It tells Rockchip's vendor C(rknpu) driver, which RKLLM needs, from the mainline C(rocket) driver
    (Linux 6.18 and later, C(rockchip,*-rknn-core) nodes, C(/dev/accel/accel0)), which RKLLM can't use."
  - "The vendor driver's version is read from the first of these that gives one:
    C(/sys/module/rknpu/version), C(/sys/kernel/debug/rknpu/version) (debugfs, root only),
    C(/proc/rknpu/version), then the kernel log line C([drm] Initialized rknpu 0.9.8 ...).
    With O(sysroot=/) the kernel log is the ring buffer (C(dmesg), which needs root where
    C(kernel.dmesg_restrict) is set, and may have wrapped on a long-running board), then
    C(/var/log/kern.log); with any other O(sysroot) only C(<sysroot>/var/log/kern.log) is read."
  - Versions are compared as numbers, so C(0.9.10) is newer than C(0.9.8).
  - It never fails on the host's account and never changes anything. Any host gets an answer (a laptop, a
    Raspberry Pi, a container); missing, unreadable or malformed files become problems when they decide
    whether RKLLM can run, and warnings when they don't.
  - "Run it with C(become: true) on boards whose driver version is only readable through debugfs or dmesg."
author:
  - rkllm.fleet developers (@rkllm)
options:
  sysroot:
    description:
      - Directory under which C(/proc), C(/sys), C(/dev) and C(/var/log/kern.log) are read, for a
        simulated board (the lab) or a copy of a board's files.
      - Paths in the returned facts are as seen on the board, that is relative to O(sysroot).
    type: path
    default: /
  min_driver_version:
    description:
      - The oldest vendor rknpu driver the RKLLM runtime works with. RKLLM runtime 1.2.3 needs C(0.9.8);
        below C(0.9.7) models fail to allocate NPU memory.
      - A board with an older driver is reported with RV(ansible_facts.rknpu.supported=false) and a problem.
      - Numbers separated by dots; anything else fails the task, as it is a mistake in the play, not on the host.
    type: str
    default: 0.9.8
extends_documentation_fragment: [ansible.builtin.action_common_attributes, ansible.builtin.action_common_attributes.facts, rkllm.fleet.attributes]
attributes:
  check_mode:
    details: It only reads, so check mode runs it exactly as a normal run.
  facts:
    support: full
  platform:
    details: Meant for Linux boards; on any other host it reports that there is no Rockchip NPU.
notes:
  - The sentences in RV(ansible_facts.rknpu.problems) are meant to be shown to people as they are, for
    example by M(ansible.builtin.fail) in a role that requires RKLLM.
seealso:
  - name: RKLLM (airockchip/rknn-llm)
    description: Rockchip's LLM runtime, its supported platforms and driver requirements.
    link: https://github.com/airockchip/rknn-llm
"""

EXAMPLES = r"""
- name: Read the NPU facts
  rkllm.fleet.npu_facts:
  become: true

- name: Stop where RKLLM can't run, saying why
  ansible.builtin.fail:
    msg: "{{ ansible_facts['rknpu']['problems'] | join(' ') }}"
  when: not ansible_facts['rknpu']['supported']

- name: Read a simulated board's hardware (the lab)
  rkllm.fleet.npu_facts:
    sysroot: /lab/sysroot

- name: Require a newer driver than RKLLM runtime 1.2.3 needs
  rkllm.fleet.npu_facts:
    min_driver_version: "0.9.10"

- name: Show the board's RKLLM platform
  ansible.builtin.debug:
    msg: "{{ ansible_facts['rknpu']['board'] }} is {{ ansible_facts['rknpu']['soc'] }}, RKLLM platform {{ ansible_facts['rknpu']['platform'] }}"
"""

RETURN = r"""
ansible_facts:
  description: Facts added to the host.
  returned: always
  type: dict
  contains:
    rknpu:
      description: What the board's kernel says about its NPU, and whether RKLLM can run on it.
      returned: always
      type: dict
      contains:
        present:
          description:
            - Whether the board has a Rockchip NPU the kernel knows of, that is an enabled NPU node in the
              device tree or a loaded NPU driver.
          returned: always
          type: bool
          sample: true
        soc:
          description:
            - The most specific Rockchip SoC the compatible strings name, with an S variant named anywhere
              taking precedence; null when the device tree names no Rockchip SoC.
          returned: always
          type: str
          sample: rk3588s
        platform:
          description:
            - The RKLLM target platform, C(rk3588) (also for C(rk3588s)) or C(rk3576) (also for C(rk3576s));
              null when RKLLM has none for this SoC. Models must be converted for this platform.
          returned: always
          type: str
          sample: rk3588
        board:
          description: The device tree's model string; null without one.
          returned: always
          type: str
          sample: Orange Pi 5
        compatible:
          description: The device tree's compatible strings, most specific first; empty without a device tree.
          returned: always
          type: list
          elements: str
          sample: ["rockchip,rk3588s-orangepi-5", "rockchip,rk3588"]
        npu_cores:
          description: Number of NPU cores of the SoC (3 for rk3588, 2 for rk3576); null for SoCs without an NPU.
          returned: always
          type: int
          sample: 3
        driver:
          description:
            - The kernel driver of the NPU, C(vendor) (Rockchip's rknpu) or C(rocket) (mainline); null when none is loaded.
          returned: always
          type: str
          sample: vendor
        driver_version:
          description: The vendor rknpu driver's version; null for rocket, without a driver, or when no source gives it.
          returned: always
          type: str
          sample: 0.9.8
        device:
          description:
            - The NPU's device node as seen on the board, checked to be a character device (a DRM render node
              whose sysfs of_node is C(npu), C(/dev/rknpu), or the rocket driver's accel node); null when not found.
            - Users other than root need the C(render) group (and C(video) on some images) to open it.
          returned: always
          type: str
          sample: /dev/dri/renderD129
        devfreq:
          description: The NPU's devfreq directory and state; null without one (or without the vendor driver).
          returned: always
          type: dict
          contains:
            path:
              description: The devfreq directory as seen on the board.
              type: str
              returned: success
              sample: /sys/class/devfreq/fdab0000.npu
            governor:
              description: The current governor; null when unreadable.
              type: str
              returned: success
              sample: rknpu_ondemand
            cur_freq:
              description: The current NPU frequency in Hz; null when unreadable.
              type: int
              returned: success
              sample: 1000000000
            max_freq:
              description: The highest allowed NPU frequency in Hz; null when unreadable.
              type: int
              returned: success
              sample: 1000000000
        supported:
          description:
            - Whether RKLLM can run here, that is an RKLLM platform, the vendor driver at O(min_driver_version)
              or newer and a usable device node, with no problems.
          returned: always
          type: bool
          sample: true
        problems:
          description: One plain sentence per reason RKLLM can't run here, each saying what to do; empty when supported.
          returned: always
          type: list
          elements: str
          sample:
            - The NPU driver is 0.9.6 but the RKLLM runtime needs 0.9.8 or newer; the driver is built into the kernel,
              so flash a newer board image or vendor kernel.
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.rkllm.fleet.plugins.module_utils.rknpu import gather, is_version

C_LOCALE = {"LANGUAGE": "C", "LC_ALL": "C"}


def run_module(module):
    """Gather the facts for the module's parameters; return the module result."""
    sysroot = module.params["sysroot"]
    min_version = module.params["min_driver_version"]
    if not is_version(min_version):
        module.fail_json(msg="min_driver_version must be a version made of numbers and dots, such as 0.9.8, not %r." % min_version)

    def run_dmesg():
        dmesg = module.get_bin_path("dmesg")
        if dmesg is None:
            return 127, "", "dmesg is not installed"
        return module.run_command([dmesg], environ_update=C_LOCALE)

    facts, notes = gather(sysroot=sysroot, min_driver_version=min_version, run_dmesg=run_dmesg)
    for note in notes:
        module.warn(note)
    return {"changed": False, "ansible_facts": {"rknpu": facts}}


def main():
    module = AnsibleModule(
        argument_spec={
            "sysroot": {"type": "path", "default": "/"},
            "min_driver_version": {"type": "str", "default": "0.9.8"},
        },
        supports_check_mode=True,
    )
    module.exit_json(**run_module(module))


if __name__ == "__main__":
    main()
