# Copyright: rkllm.fleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Pin a Rockchip board's NPU, CPU and DDR to their maximum frequency, and undo it.

What Rockchip's fix_freq_rk3588.sh / fix_freq_rk3576.sh do for benchmarks (the
userspace governor at the highest available frequency), made idempotent and
reversible:

    python3 rknpu_freq.py pin      record each domain's governor (once), then pin it to its maximum
    python3 rknpu_freq.py restore  put the recorded governors back (rknpu_ondemand, schedutil, ...)
    python3 rknpu_freq.py status   print every domain's governor and frequency

Every command prints one JSON object: {"changed": bool, "domains": [...]};
--dry-run reports what would change without writing. Exit status 1 with a message
on stderr when a sysfs write fails (e.g. a kernel without the userspace governor).
Python 3.8+ standard library only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile

DEFAULT_STATE = "/var/lib/rknpu/frequency-state.json"
USERSPACE = "userspace"


class PinError(Exception):
    """A sysfs file could not be read or written."""


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise PinError("cannot read %s: %s" % (path, exc.strerror or exc))


def _write(path, value):
    try:
        # One write() call: sysfs attributes take the whole value at once.
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("%s\n" % value)
    except OSError as exc:
        raise PinError("cannot write %r to %s: %s" % (value, path, exc.strerror or exc))


def _numbers(text):
    return [int(item) for item in text.split() if item.isdigit()]


class Domain:
    """One frequency domain: a devfreq device (NPU, DDR) or a cpufreq policy."""

    def __init__(self, sysroot, kind, name, path):
        self.sysroot = sysroot
        self.kind = kind  # npu, ddr, cpu
        self.name = name
        self.path = path
        devfreq = kind != "cpu"
        self.governor_file = os.path.join(path, "governor" if devfreq else "scaling_governor")
        self.setspeed_file = os.path.join(path, "userspace/set_freq" if devfreq else "scaling_setspeed")
        self.available_file = os.path.join(path, "available_frequencies" if devfreq else "scaling_available_frequencies")
        self.max_file = os.path.join(path, "max_freq" if devfreq else "cpuinfo_max_freq")
        self.cur_file = os.path.join(path, "cur_freq" if devfreq else "scaling_cur_freq")

    @property
    def key(self):
        """The governor file relative to the sysroot: the state file's key."""
        return os.path.relpath(self.governor_file, self.sysroot)

    def governor(self):
        return _read(self.governor_file)

    def maximum(self):
        available = _numbers(_read(self.available_file)) if os.path.exists(self.available_file) else []
        if available:
            return max(available)
        numbers = _numbers(_read(self.max_file))
        if not numbers:
            raise PinError("%s holds no frequency" % self.max_file)
        return numbers[0]

    def current(self):
        try:
            numbers = _numbers(_read(self.cur_file))
        except PinError:
            return None
        return numbers[0] if numbers else None

    def setspeed(self):
        # The userspace governor's file exists (devfreq) or reads a number (cpufreq) only while it is active.
        if not os.path.exists(self.setspeed_file):
            return None
        numbers = _numbers(_read(self.setspeed_file))
        return numbers[0] if numbers else None

    def describe(self):
        return {"domain": self.kind, "name": self.name, "governor": self.governor(), "cur_freq": self.current(), "max_freq": self.maximum()}


def domains(sysroot, kinds):
    """The frequency domains of the board under sysroot, NPU first."""
    found = []
    if "npu" in kinds:
        for path in sorted(glob.glob(os.path.join(sysroot, "sys/class/devfreq/*.npu"))):
            found.append(Domain(sysroot, "npu", os.path.basename(path), path))
    if "ddr" in kinds:
        path = os.path.join(sysroot, "sys/class/devfreq/dmc")
        if os.path.isdir(path):
            found.append(Domain(sysroot, "ddr", "dmc", path))
    if "cpu" in kinds:
        for path in sorted(glob.glob(os.path.join(sysroot, "sys/devices/system/cpu/cpufreq/policy*"))):
            found.append(Domain(sysroot, "cpu", os.path.basename(path), path))
    return found


def load_state(path):
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise PinError("cannot read the recorded governors in %s (%s); delete it to start afresh" % (path, exc))
    governors = state.get("governors") if isinstance(state, dict) else None
    return dict(governors) if isinstance(governors, dict) else {}


def save_state(path, governors):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".frequency-state.", dir=directory)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump({"governors": governors}, stream, indent=1, sort_keys=True)
        stream.write("\n")
    os.replace(temp, path)


def pin(sysroot, kinds, state_path, dry_run=False):
    """Pin every domain to its maximum; record governors first. Returns (changed, domains)."""
    recorded = load_state(state_path)
    originals = dict(recorded)
    changed = False
    report = []
    found = domains(sysroot, kinds)
    for domain in found:
        governor = domain.governor()
        # Record the governor the board had before the first pin (after a reboot the
        # state file still holds it: the kernel's boot governor is the same one).
        if domain.key not in originals and governor != USERSPACE:
            originals[domain.key] = governor
        maximum = domain.maximum()
        report_entry = {"domain": domain.kind, "name": domain.name, "governor": USERSPACE, "frequency": maximum}
        if governor != USERSPACE:
            changed = True
            if dry_run:
                report.append(report_entry)
                continue
            _write(domain.governor_file, USERSPACE)
        if domain.setspeed() != maximum:
            changed = True
            if not dry_run:
                _write(domain.setspeed_file, maximum)
        report.append(report_entry)
    if originals != recorded:
        changed = True
        if not dry_run:
            save_state(state_path, originals)
    return changed, report


def restore(sysroot, state_path, dry_run=False):
    """Put back the recorded governors of domains still pinned; forget the record."""
    recorded = load_state(state_path)
    changed = False
    report = []
    for key, governor in sorted(recorded.items()):
        path = os.path.join(sysroot, key)
        if not os.path.exists(path):
            continue
        # A governor someone changed since is theirs: only a pinned domain is restored.
        if _read(path) == USERSPACE:
            changed = True
            if not dry_run:
                _write(path, governor)
            report.append({"governor_file": key, "governor": governor})
    if os.path.exists(state_path):
        changed = True
        if not dry_run:
            os.unlink(state_path)
    return changed, report


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Pin a Rockchip board's NPU, CPU and DDR to their maximum frequency, or undo it.")
    parser.add_argument("command", choices=("pin", "restore", "status"))
    parser.add_argument("--sysroot", default="/", help="prefix under which /sys is written (default /)")
    parser.add_argument("--state", default=DEFAULT_STATE, help="where the original governors are kept (default %(default)s)")
    parser.add_argument("--domains", default="npu,cpu,ddr", help="comma-separated subset of npu,cpu,ddr (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    args = parser.parse_args(argv)
    args.domains = set(item.strip() for item in args.domains.split(",") if item.strip())
    unknown = args.domains - {"npu", "cpu", "ddr"}
    if unknown:
        parser.error("unknown domains: %s (choose from npu, cpu, ddr)" % ", ".join(sorted(unknown)))
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "pin":
            changed, report = pin(args.sysroot, args.domains, args.state, args.dry_run)
        elif args.command == "restore":
            changed, report = restore(args.sysroot, args.state, args.dry_run)
        else:
            changed, report = False, [domain.describe() for domain in domains(args.sysroot, args.domains)]
    except PinError as exc:
        sys.stderr.write("rknpu-freq %s: %s\n" % (args.command, exc))
        return 1
    print(json.dumps({"changed": changed, "domains": report}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
