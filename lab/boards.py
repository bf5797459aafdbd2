"""Simulated Rockchip board hardware for the rkllm.fleet lab.

The one table of real-board facts (BOARDS, built on SOCS) that the lab boards and the unit
tests' fixture trees are generated from. Sources: the project's REFERENCE.md, "The boards and
their NPU", and the boards' own device trees and sysfs.

    python3 boards.py KIND ROOT [--link-dev]   write KIND's hardware files under ROOT
    python3 boards.py --list                    list the kinds

Under ROOT it writes what a real board shows under / : the device tree
(sys/firmware/devicetree/base, with proc/device-tree a relative link to it), the NPU's
platform device with its DRM render node (or accel node for rocket), its devfreq directory,
the vendor rknpu driver's version files (sys/module, debugfs, optionally procfs), the NPU load
file, a kernel log (var/log/kern.log, syslog format) holding the driver's init line, the CPU
cpufreq policies and the DDR devfreq (dmc), so a frequency-pinning role has real-shaped files
to write (governor, userspace/set_freq, scaling_setspeed).

Device nodes: with --link-dev, ROOT/dev is a link to /dev (the lab maps a real character
device at /dev/dri/renderD129); without it, ROOT/dev/dri/renderD129 (or dev/accel/accel0)
is a link to /dev/null, a real character device any user can stat.

A run is idempotent: files already holding the right bytes are left untouched, and files a
previous run wrote for another kind are removed (kept in ROOT/.rkllm-lab-board.json). A
rebuild is a reboot: writable settings (governors, set_freq) go back to their boot values.
Python 3 standard library only: it runs on the controller and inside the lab boards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

MANIFEST = ".rkllm-lab-board.json"
DT_BASE = "sys/firmware/devicetree/base"
MHZ = 1000000

# What each SoC brings. npu_cores lists the NPU cores' node addresses (the first one names
# the vendor driver's single node, its platform device and devfreq dir). CPU policies are
# (first cpu, cpus, available kHz). Frequencies are the vendor kernel's OPP tables.
SOCS = {
    "rk3588": {
        "npu_cores": ("fdab0000", "fdac0000", "fdad0000"),
        "npu_mhz": (300, 400, 500, 600, 700, 800, 900, 1000),
        "cpu_policies": (
            (0, (0, 1, 2, 3), (408000, 600000, 816000, 1008000, 1200000, 1416000, 1608000, 1800000)),
            (4, (4, 5), (408000, 600000, 816000, 1008000, 1200000, 1416000, 1608000, 1800000, 2016000, 2208000, 2400000)),
            (6, (6, 7), (408000, 600000, 816000, 1008000, 1200000, 1416000, 1608000, 1800000, 2016000, 2208000, 2400000)),
        ),
        "dmc_mhz": (528, 1068, 1560, 2112),
    },
    "rk3576": {
        "npu_cores": ("27700000", "27800000"),
        "npu_mhz": (300, 400, 500, 600, 700, 800, 900, 950),
        "cpu_policies": (
            (0, (0, 1, 2, 3), (408000, 600000, 816000, 1008000, 1200000, 1416000, 1608000, 1800000, 2016000)),
            (4, (4, 5, 6, 7), (408000, 600000, 816000, 1008000, 1200000, 1416000, 1608000, 1800000, 2016000, 2208000)),
        ),
        "dmc_mhz": (528, 1068, 1560, 2112),
    },
}

# The kinds. "soc" is the chip the board carries (what npu_facts must identify from the
# compatible strings), "platform" its RKLLM target; "driver" is vendor, rocket or None.
BOARDS = {
    "orangepi5-vendor": {
        "description": "Orange Pi 5 (RK3588S) on the Orange Pi vendor kernel, rknpu 0.9.8",
        "host": "orangepi5",
        "compatible": ("rockchip,rk3588s-orangepi-5", "rockchip,rk3588"),
        "model": "Orange Pi 5",
        "soc": "rk3588s", "family": "rk3588", "platform": "rk3588",
        "driver": "vendor", "driver_version": "0.9.8", "driver_date": "20240828",
        "proc_version": True,
    },
    "orangepi5-mainline": {
        "description": "Orange Pi 5 (RK3588S) with the mainline device tree strings, rknpu 0.9.8",
        "host": "orangepi5",
        "compatible": ("xunlong,orangepi-5", "rockchip,rk3588s"),
        "model": "Xunlong Orange Pi 5",
        "soc": "rk3588s", "family": "rk3588", "platform": "rk3588",
        "driver": "vendor", "driver_version": "0.9.8", "driver_date": "20240828",
        "proc_version": False,
    },
    "rock5b": {
        "description": "Radxa ROCK 5B (RK3588) on the Radxa vendor kernel, rknpu 0.9.8",
        "host": "rock5b",
        "compatible": ("radxa,rock-5b", "rockchip,rk3588"),
        "model": "Radxa ROCK 5B",
        "soc": "rk3588", "family": "rk3588", "platform": "rk3588",
        "driver": "vendor", "driver_version": "0.9.8", "driver_date": "20240828",
        "proc_version": False,
    },
    "rock4d": {
        "description": "Radxa ROCK 4D (RK3576, 2 NPU cores) on the Radxa vendor kernel, rknpu 0.9.8",
        "host": "rock4d",
        "compatible": ("radxa,rock-4d", "rockchip,rk3576"),
        "model": "Radxa ROCK 4D",
        "soc": "rk3576", "family": "rk3576", "platform": "rk3576",
        "driver": "vendor", "driver_version": "0.9.8", "driver_date": "20240828",
        "proc_version": False,
    },
    "rk3588-old-driver": {
        "description": "Radxa ROCK 5B (RK3588) on an old vendor image, rknpu 0.9.6 (too old for RKLLM 1.2.3)",
        "host": "rock5b",
        "compatible": ("radxa,rock-5b", "rockchip,rk3588"),
        "model": "Radxa ROCK 5B",
        "soc": "rk3588", "family": "rk3588", "platform": "rk3588",
        "driver": "vendor", "driver_version": "0.9.6", "driver_date": "20240322",
        "proc_version": False,
    },
    "rock5b-rocket": {
        "description": "Radxa ROCK 5B (RK3588) on mainline 6.18: the open rocket driver, no rknpu",
        "host": "rock5b",
        "compatible": ("radxa,rock-5b", "rockchip,rk3588"),
        "model": "Radxa ROCK 5B",
        "soc": "rk3588", "family": "rk3588", "platform": "rk3588",
        "driver": "rocket", "driver_version": None, "driver_date": None,
        "proc_version": False,
    },
    "raspberrypi4": {
        "description": "Raspberry Pi 4 Model B (BCM2711): an ARM board without a Rockchip NPU",
        "host": "raspberrypi",
        "compatible": ("raspberrypi,4-model-b", "brcm,bcm2711"),
        "model": "Raspberry Pi 4 Model B Rev 1.4",
        "soc": None, "family": None, "platform": None,
        "driver": None, "driver_version": None, "driver_date": None,
        "proc_version": False,
    },
}

# The vendor driver registers the NPU as DRM card1 (card0 is the display), so its render
# node is renderD129; rocket registers an accel device.
VENDOR_CARD_MINOR = 1
DRM_MAJOR = 226
ACCEL_MAJOR = 261
CPU_GOVERNORS = "conservative ondemand userspace powersave performance schedutil"
NPU_GOVERNORS = "rknpu_ondemand dmc_ondemand userspace powersave performance simple_ondemand"
DMC_GOVERNORS = "dmc_ondemand userspace powersave performance simple_ondemand"


def npu_cores(kind):
    """Number of NPU cores of KIND's SoC (None without a Rockchip NPU)."""
    family = BOARDS[kind]["family"]
    return len(SOCS[family]["npu_cores"]) if family else None


def npu_address(kind):
    """Unit address of the NPU node the vendor driver binds, e.g. fdab0000."""
    family = BOARDS[kind]["family"]
    return SOCS[family]["npu_cores"][0] if family else None


def device_node(kind):
    """The device node path (as seen on the board) the NPU is used through, or None."""
    driver = BOARDS[kind]["driver"]
    if driver == "vendor":
        return "/dev/dri/renderD%d" % (128 + VENDOR_CARD_MINOR)
    if driver == "rocket":
        return "/dev/accel/accel0"
    return None


def devfreq_dir(kind):
    """The NPU's devfreq directory (as seen on the board), or None."""
    if BOARDS[kind]["driver"] != "vendor":
        return None
    return "/sys/class/devfreq/%s.npu" % npu_address(kind)


def _dt_strings(*strings):
    return b"".join(s.encode("ascii") + b"\0" for s in strings)


def _lines(*lines):
    return "".join(line + "\n" for line in lines).encode("ascii")


def _kernel_log(kind):
    board = BOARDS[kind]
    stamp = "2026-11-25T08:00:0%d.%06d+00:00 " + board["host"] + " kernel: [%12.6f] %s"
    lines = ["Booting Linux on physical CPU 0x0000000000 [0x412fd050]",
             "Machine model: " + board["model"]]
    addr = npu_address(kind)
    if board["driver"] == "vendor":
        lines += [
            "RKNPU %s.npu: RKNPU: rknpu iommu is enabled, using iommu mode" % addr,
            "RKNPU %s.npu: can't request region for resource [mem 0x%s-0x%08x]" % (addr, addr, int(addr, 16) + 0xffff),
            "[drm] Initialized rknpu %s %s for %s.npu on minor %d" % (
                board["driver_version"], board["driver_date"], addr, VENDOR_CARD_MINOR),
            "RKNPU %s.npu: leakage=10" % addr,
        ]
    elif board["driver"] == "rocket":
        lines += ["[drm] Initialized rocket 0.0.0 for rknn on minor 0"]
    lines.append("Freeing unused kernel memory: 8192K")
    return _lines(*[stamp % (i % 10, 1000 * i, 0.5 * i, text) for i, text in enumerate(lines)])


def _cpufreq(soc, files, links):
    for first, cpus, khz in soc["cpu_policies"]:
        base = "sys/devices/system/cpu/cpufreq/policy%d/" % first
        cpu_list = " ".join(str(c) for c in cpus)
        values = {
            "affected_cpus": cpu_list,
            "related_cpus": cpu_list,
            "cpuinfo_min_freq": khz[0], "cpuinfo_max_freq": khz[-1], "cpuinfo_cur_freq": khz[-1],
            "scaling_min_freq": khz[0], "scaling_max_freq": khz[-1], "scaling_cur_freq": khz[-1],
            "scaling_available_frequencies": " ".join(str(f) for f in khz),
            "scaling_available_governors": CPU_GOVERNORS,
            "scaling_governor": "schedutil",
            "scaling_driver": "cpufreq-dt",
            "scaling_setspeed": "<unsupported>",
        }
        for name, value in values.items():
            files[base + name] = _lines(str(value))
        for cpu in cpus:
            links["sys/devices/system/cpu/cpu%d/cpufreq" % cpu] = "../cpufreq/policy%d" % first


def _devfreq(base, mhz, governor, governors, files):
    hz = [m * MHZ for m in mhz]
    values = {
        "governor": governor,
        "available_governors": governors,
        "available_frequencies": " ".join(str(f) for f in hz),
        "cur_freq": hz[-1], "target_freq": hz[-1], "min_freq": hz[0], "max_freq": hz[-1],
        "polling_interval": 50,
        "userspace/set_freq": "unchanged",
    }
    for name, value in values.items():
        files[base + name] = _lines(str(value))


def tree(kind):
    """Return (files, links) for KIND: {relative path: bytes} and {relative path: link target}."""
    if kind not in BOARDS:
        raise KeyError("unknown board kind %r; kinds: %s" % (kind, ", ".join(BOARDS)))
    board = BOARDS[kind]
    files = {
        DT_BASE + "/compatible": _dt_strings(*board["compatible"]),
        DT_BASE + "/model": _dt_strings(board["model"]),
        DT_BASE + "/name": b"\0",
        "var/log/kern.log": _kernel_log(kind),
    }
    links = {"proc/device-tree": "../" + DT_BASE}
    if board["family"] is None:
        files[DT_BASE + "/soc/name"] = _dt_strings("soc")
        return files, links

    soc = SOCS[board["family"]]
    family = board["family"]
    _cpufreq(soc, files, links)
    _devfreq("sys/devices/platform/dmc/devfreq/dmc/", soc["dmc_mhz"], "dmc_ondemand", DMC_GOVERNORS, files)
    links["sys/class/devfreq/dmc"] = "../../devices/platform/dmc/devfreq/dmc"
    addr = soc["npu_cores"][0]
    platdev = "sys/devices/platform/%s.npu/" % addr

    if board["driver"] == "rocket":
        # Mainline: one rknn-core node per NPU core, all driven by rocket through one accel device.
        for core in soc["npu_cores"]:
            node = "%s/npu@%s/" % (DT_BASE, core)
            files[node + "compatible"] = _dt_strings("rockchip,%s-rknn-core" % family)
            files[node + "name"] = _dt_strings("npu")
            files[node + "status"] = _dt_strings("okay")
        files["sys/module/rocket/initstate"] = _lines("live")
        files["sys/module/rocket/refcnt"] = _lines("0")
        accel = "sys/devices/platform/rknn/accel/accel0/"
        files["sys/devices/platform/rknn/uevent"] = _lines("DRIVER=rocket", "MODALIAS=platform:rknn")
        files[accel + "dev"] = _lines("%d:0" % ACCEL_MAJOR)
        files[accel + "uevent"] = _lines("MAJOR=%d" % ACCEL_MAJOR, "MINOR=0", "DEVNAME=accel/accel0")
        links[accel + "device"] = "../../../rknn"
        links["sys/class/accel/accel0"] = "../../devices/platform/rknn/accel/accel0"
        return files, links

    # Vendor kernel: one rknpu node covering every core, a DRM card + render node, devfreq.
    node = "%s/npu@%s/" % (DT_BASE, addr)
    compatible = "rockchip,%s-rknpu" % family
    files[node + "compatible"] = _dt_strings(compatible)
    files[node + "name"] = _dt_strings("npu")
    files[node + "status"] = _dt_strings("okay")
    files[platdev + "uevent"] = _lines("DRIVER=RKNPU", "OF_NAME=npu", "OF_FULLNAME=/npu@" + addr,
                                       "OF_COMPATIBLE_0=" + compatible, "OF_COMPATIBLE_N=1",
                                       "MODALIAS=of:NnpuT(null)C" + compatible)
    links[platdev + "of_node"] = "../../../firmware/devicetree/base/npu@" + addr
    render = 128 + VENDOR_CARD_MINOR
    for name, minor in (("card%d" % VENDOR_CARD_MINOR, VENDOR_CARD_MINOR), ("renderD%d" % render, render)):
        files[platdev + "drm/%s/dev" % name] = _lines("%d:%d" % (DRM_MAJOR, minor))
        files[platdev + "drm/%s/uevent" % name] = _lines("MAJOR=%d" % DRM_MAJOR, "MINOR=%d" % minor, "DEVNAME=dri/" + name)
        links[platdev + "drm/%s/device" % name] = "../../../%s.npu" % addr
        links["sys/class/drm/" + name] = "../../devices/platform/%s.npu/drm/%s" % (addr, name)
    _devfreq(platdev + "devfreq/%s.npu/" % addr, soc["npu_mhz"], "rknpu_ondemand", NPU_GOVERNORS, files)
    links["sys/class/devfreq/%s.npu" % addr] = "../../devices/platform/%s.npu/devfreq/%s.npu" % (addr, addr)

    version = board["driver_version"]
    files["sys/module/rknpu/version"] = _lines(version)
    files["sys/kernel/debug/rknpu/version"] = _lines("RKNPU driver: v" + version)
    cores = len(soc["npu_cores"])
    files["sys/kernel/debug/rknpu/load"] = _lines("NPU load: " + "".join(" Core%d:  0%%," % i for i in range(cores)))
    if board["proc_version"]:
        files["proc/rknpu/version"] = _lines("RKNPU driver: v" + version)
    return files, links


def _dev_entries(kind, link_dev):
    """Device-node entries: ROOT/dev -> /dev, or per-node links to /dev/null."""
    if link_dev:
        return {"dev": "/dev"}
    node = device_node(kind)
    return {node.lstrip("/"): "/dev/null"} if node else {}


def _atomic_write(path, data):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".boards-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _remove(root, rel):
    path = os.path.join(root, rel)
    # Never reach through a link (ROOT/dev -> /dev) into the host's own files.
    if os.path.realpath(os.path.dirname(path)) != os.path.join(os.path.realpath(root), os.path.dirname(rel)).rstrip("/"):
        return
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    parent = os.path.dirname(rel)
    while parent:
        try:
            os.rmdir(os.path.join(root, parent))
        except OSError:
            break
        parent = os.path.dirname(parent)


def build(kind, root, link_dev=False):
    """Write KIND's hardware under ROOT; return counts {"written", "unchanged", "removed"}."""
    files, links = tree(kind)
    links.update(_dev_entries(kind, link_dev))
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    manifest_path = os.path.join(root, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            previous = json.load(handle).get("paths", [])
    except (OSError, ValueError):
        previous = []
    counts = {"written": 0, "unchanged": 0, "removed": 0}
    wanted = set(files) | set(links)
    # Entries of a previous build that this kind does not have, or whose type changed.
    for rel in sorted(previous, reverse=True):
        path = os.path.join(root, rel)
        stale = rel not in wanted or (rel in files and os.path.islink(path)) or (rel in links and not os.path.islink(path))
        if stale and os.path.lexists(path):
            _remove(root, rel)
            counts["removed"] += 1

    for rel, data in sorted(files.items()):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, "rb") as handle:
                if handle.read() == data:
                    counts["unchanged"] += 1
                    continue
        except OSError:
            pass
        _atomic_write(path, data)
        counts["written"] += 1

    for rel, target in sorted(links.items()):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.islink(path) and os.readlink(path) == target:
            counts["unchanged"] += 1
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                os.rmdir(path)
            except OSError:
                raise SystemExit("boards.py: %s is a directory that holds files boards.py did not write; "
                                 "remove it or choose another ROOT" % path)
        elif os.path.lexists(path):
            os.unlink(path)
        os.symlink(target, path)
        counts["written"] += 1

    record = json.dumps({"kind": kind, "link_dev": link_dev, "paths": sorted(wanted)}, indent=1, sort_keys=True) + "\n"
    try:
        with open(manifest_path, "rb") as handle:
            current = handle.read()
    except OSError:
        current = b""
    if current != record.encode("utf-8"):
        _atomic_write(manifest_path, record.encode("utf-8"))
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a simulated Rockchip board's hardware files under ROOT.")
    parser.add_argument("kind", nargs="?", help="board kind (see --list)")
    parser.add_argument("root", nargs="?", help="directory to write under (the board's sysroot)")
    parser.add_argument("--link-dev", action="store_true", help="make ROOT/dev a link to /dev instead of per-node stand-ins")
    parser.add_argument("--list", action="store_true", help="list the board kinds and exit")
    args = parser.parse_args(argv)
    if args.list:
        for kind, board in BOARDS.items():
            print("%-20s %s" % (kind, board["description"]))
        return 0
    if not args.kind or not args.root:
        parser.error("KIND and ROOT are required (or --list)")
    if args.kind not in BOARDS:
        parser.error("unknown kind %r; choose one of: %s" % (args.kind, ", ".join(BOARDS)))
    counts = build(args.kind, args.root, link_dev=args.link_dev)
    print("%s -> %s: %d written, %d unchanged, %d removed" % (
        args.kind, os.path.abspath(args.root), counts["written"], counts["unchanged"], counts["removed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
