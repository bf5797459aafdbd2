# Copyright: rkllm.fleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Export a Rockchip NPU's load, frequency and driver as Prometheus metrics.

Writes the text exposition format to a file that the node exporter's textfile
collector serves (default /var/lib/prometheus/node-exporter/rknpu.prom), replacing
it atomically every --interval seconds. It runs as root only because the NPU load
is in debugfs (/sys/kernel/debug/rknpu/load), which is root-only.

Every source is read on its own: a missing or malformed file costs only the
metrics that come from it, and is reported by rknpu_exporter_source_ok{source}
and rknpu_exporter_errors, never by stopping the exporter.

Python 3.8+ standard library only: it runs on the boards' system Python.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import signal
import sys
import tempfile
import threading
import time

DEFAULT_OUTPUT = "/var/lib/prometheus/node-exporter/rknpu.prom"
DEFAULT_MIN_DRIVER_VERSION = "0.9.8"

# RKLLM target platform per SoC compatible (the S variants run the same runtime).
PLATFORMS = {"rk3588": "rk3588", "rk3588s": "rk3588", "rk3576": "rk3576", "rk3576s": "rk3576"}

# Where the vendor rknpu driver tells its version, in order of preference.
VERSION_FILES = ("sys/module/rknpu/version", "sys/kernel/debug/rknpu/version", "proc/rknpu/version")

SOURCES = ("devicetree", "driver", "load", "devfreq")

HELP = {
    "rknpu_driver_info": ("gauge", "NPU kernel driver (vendor rknpu, rocket or none), its version and the board; always 1."),
    "rknpu_driver_version_meets_minimum": ("gauge", "1 if the vendor rknpu driver is at least the minimum version RKLLM needs, else 0."),
    "rknpu_load_ratio": ("gauge", "NPU core load from debugfs, 0 to 1."),
    "rknpu_frequency_hertz": ("gauge", "Current NPU frequency (devfreq cur_freq)."),
    "rknpu_max_frequency_hertz": ("gauge", "Maximum NPU frequency the governor may use (devfreq max_freq)."),
    "rknpu_min_frequency_hertz": ("gauge", "Minimum NPU frequency the governor may use (devfreq min_freq)."),
    "rknpu_available_max_frequency_hertz": ("gauge", "Highest NPU frequency the hardware offers (devfreq available_frequencies)."),
    "rknpu_governor_info": ("gauge", "NPU devfreq governor (rknpu_ondemand by default, userspace when pinned); always 1."),
    "rknpu_exporter_source_ok": ("gauge", "1 if the source was read and parsed in the last pass, else 0."),
    "rknpu_exporter_errors": ("gauge", "Number of sources that failed in the last pass."),
    "rknpu_exporter_last_run_timestamp_seconds": ("gauge", "When the last pass ran, seconds since the epoch."),
    "rknpu_exporter_duration_seconds": ("gauge", "How long the last pass took."),
}


class SourceError(Exception):
    """A file exists but cannot be read or does not parse."""


class Collection:
    """The samples of one pass, plus which sources failed and why."""

    def __init__(self):
        self.samples = []
        self.errors = {}

    def add(self, name, value, **labels):
        self.samples.append((name, labels, value))

    def fail(self, source, message):
        self.errors[source] = message

    def values(self, name):
        """{frozenset(labels.items()): value} of one metric (for tests and callers)."""
        return dict((frozenset(labels.items()), value) for sample_name, labels, value in self.samples if sample_name == name)


def _path(sysroot, relative):
    return os.path.join(sysroot, relative)


def read_text(path):
    """The file's text without trailing NULs and blanks; None if it does not exist."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(65536)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SourceError("cannot read %s: %s" % (path, exc.strerror or exc))
    return data.decode("utf-8", "replace").rstrip("\0 \t\r\n")


def read_int(path):
    text = read_text(path)
    if text is None:
        raise SourceError("%s is missing" % path)
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        raise SourceError("%s does not hold a number: %r" % (path, text[:40]))


def parse_version(text):
    """'v0.9.8', 'RKNPU driver: v0.9.8' or '0.9.8' -> (0, 9, 8); None if there is no version."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not match:
        return None
    return tuple(int(part or 0) for part in match.groups())


def read_devicetree(sysroot):
    """(compatible list, model) of the device tree; raises SourceError if there is none."""
    compatible = model = None
    for base in ("proc/device-tree", "sys/firmware/devicetree/base"):
        compatible = read_text(_path(sysroot, base + "/compatible"))
        if compatible is not None:
            model = read_text(_path(sysroot, base + "/model"))
            break
    if compatible is None:
        raise SourceError("no device tree under %s (proc/device-tree/compatible)" % sysroot)
    return [item for item in compatible.split("\0") if item], (model or "").replace("\0", " ").strip()


def soc_of(compatible):
    """The most specific Rockchip SoC: an rk3588s anywhere (even 'rockchip,rk3588s-orangepi-5') wins over rk3588."""
    socs = []
    for item in compatible:
        match = re.match(r"^rockchip,(rk\d{4}[a-z]?)(?:-|$)", item)
        if match:
            socs.append(match.group(1))
    for soc in socs:
        if soc.endswith("s"):
            return soc
    return socs[0] if socs else ""


def read_driver(sysroot):
    """(driver, version): driver is 'vendor', 'rocket' or ''; version '' when unknown."""
    for relative in VERSION_FILES:
        text = read_text(_path(sysroot, relative))
        if text is None:
            continue
        version = parse_version(text)
        if version is None:
            raise SourceError("%s does not hold a version: %r" % (_path(sysroot, relative), text[:40]))
        return "vendor", ".".join(str(part) for part in version)
    if os.path.isdir(_path(sysroot, "sys/module/rknpu")):
        return "vendor", ""
    if os.path.isdir(_path(sysroot, "sys/module/rocket")):
        return "rocket", read_text(_path(sysroot, "sys/module/rocket/version")) or ""
    return "", ""


def parse_load(text):
    """'NPU load:  Core0:  5%, Core1: 0%,' -> {'0': 0.05, '1': 0.0}; single-core 'NPU load: 5%' -> {'0': 0.05}."""
    cores = re.findall(r"Core\s*(\d+)\s*:\s*(\d+(?:\.\d+)?)\s*%", text)
    if not cores:
        single = re.search(r"load\s*:\s*(\d+(?:\.\d+)?)\s*%", text, re.IGNORECASE)
        if single:
            cores = [("0", single.group(1))]
    if not cores:
        raise SourceError("the NPU load does not parse: %r" % text[:80])
    return dict((core, float(percent) / 100.0) for core, percent in cores)


def npu_devfreq_dir(sysroot):
    """The NPU's devfreq directory (fdab0000.npu on RK3588, 27700000.npu on RK3576), or None."""
    candidates = sorted(glob.glob(_path(sysroot, "sys/class/devfreq/*.npu")))
    return candidates[0] if candidates else None


def collect(sysroot="/", min_driver_version=DEFAULT_MIN_DRIVER_VERSION):
    """One pass over the sysroot: a Collection with every metric that could be read."""
    started = time.time()
    result = Collection()
    ok = dict((source, True) for source in SOURCES)

    compatible, model = [], ""
    try:
        compatible, model = read_devicetree(sysroot)
    except SourceError as exc:
        result.fail("devicetree", str(exc))
    soc = soc_of(compatible)

    driver, version = "", ""
    try:
        driver, version = read_driver(sysroot)
    except SourceError as exc:
        result.fail("driver", str(exc))
    result.add("rknpu_driver_info", 1, driver=driver or "none", version=version, soc=soc, platform=PLATFORMS.get(soc, ""), board=model)
    wanted = parse_version(min_driver_version)
    meets = driver == "vendor" and wanted is not None and parse_version(version) is not None and parse_version(version) >= wanted
    result.add("rknpu_driver_version_meets_minimum", 1 if meets else 0, minimum=min_driver_version)

    # Without the vendor driver there is no load file and no rknpu devfreq to miss.
    expect_npu = driver == "vendor"
    try:
        text = read_text(_path(sysroot, "sys/kernel/debug/rknpu/load"))
        if text is None:
            if expect_npu:
                raise SourceError("%s is missing: is debugfs mounted, and does the exporter run as root?" % _path(sysroot, "sys/kernel/debug/rknpu/load"))
        else:
            for core, ratio in sorted(parse_load(text).items(), key=lambda item: int(item[0])):
                result.add("rknpu_load_ratio", ratio, core=core)
    except SourceError as exc:
        result.fail("load", str(exc))

    devfreq = npu_devfreq_dir(sysroot)
    if devfreq is None:
        if expect_npu:
            result.fail("devfreq", "no NPU devfreq directory (%s)" % _path(sysroot, "sys/class/devfreq/*.npu"))
    else:
        _collect_devfreq(result, devfreq)

    for source in SOURCES:
        ok[source] = source not in result.errors
        result.add("rknpu_exporter_source_ok", 1 if ok[source] else 0, source=source)
    result.add("rknpu_exporter_errors", len(result.errors))
    finished = time.time()
    result.add("rknpu_exporter_last_run_timestamp_seconds", round(finished, 3))
    result.add("rknpu_exporter_duration_seconds", round(finished - started, 6))
    return result


def _collect_devfreq(result, devfreq):
    problems = []
    for name, metric in (("cur_freq", "rknpu_frequency_hertz"), ("max_freq", "rknpu_max_frequency_hertz"), ("min_freq", "rknpu_min_frequency_hertz")):
        try:
            result.add(metric, read_int(os.path.join(devfreq, name)))
        except SourceError as exc:
            problems.append(str(exc))
    try:
        available = read_text(os.path.join(devfreq, "available_frequencies"))
        if available:
            result.add("rknpu_available_max_frequency_hertz", max(int(item) for item in available.split()))
    except (SourceError, ValueError):
        problems.append("%s does not parse" % os.path.join(devfreq, "available_frequencies"))
    try:
        governor = read_text(os.path.join(devfreq, "governor"))
        if not governor:
            raise SourceError("%s is missing or empty" % os.path.join(devfreq, "governor"))
        result.add("rknpu_governor_info", 1, governor=governor.split()[0])
    except SourceError as exc:
        problems.append(str(exc))
    if problems:
        result.fail("devfreq", "; ".join(problems))


def _escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value):
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return "%d" % value


def render(collection):
    """The Prometheus text exposition format of a Collection (HELP and TYPE once per metric)."""
    lines = []
    seen = set()
    order = []
    for name, _labels, _value in collection.samples:
        if name not in seen:
            seen.add(name)
            order.append(name)
    for name in order:
        kind, text = HELP.get(name, ("gauge", name))
        lines.append("# HELP %s %s" % (name, text))
        lines.append("# TYPE %s %s" % (name, kind))
        for sample_name, labels, value in collection.samples:
            if sample_name != name:
                continue
            rendered = ",".join('%s="%s"' % (key, _escape(labels[key])) for key in sorted(labels))
            lines.append("%s%s %s" % (name, "{%s}" % rendered if rendered else "", _number(value)))
    return "\n".join(lines) + "\n"


def write_atomically(path, text):
    """Write text to path by temp file + rename, so the collector never reads half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    # The textfile collector reads only *.prom: the temp name must not end in .prom.
    handle, temp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def run_once(args):
    collection = collect(args.sysroot, args.min_driver_version)
    write_atomically(args.output, render(collection))
    return collection


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Export Rockchip NPU metrics for the node exporter's textfile collector.")
    parser.add_argument("--sysroot", default="/", help="prefix under which /proc and /sys are read (default /)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="the .prom file to write (default %(default)s)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between passes (default 5)")
    parser.add_argument("--min-driver-version", default=DEFAULT_MIN_DRIVER_VERSION, help="minimum rknpu driver version (default %(default)s)")
    parser.add_argument("--once", action="store_true", help="run one pass and exit")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")
    if parse_version(args.min_driver_version) is None:
        parser.error("--min-driver-version must look like 0.9.8")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    reported = None
    while True:
        try:
            errors = run_once(args).errors
        except OSError as exc:
            errors = {"output": "cannot write %s: %s" % (args.output, exc)}
            if args.once:
                sys.stderr.write(errors["output"] + "\n")
                return 1
        # Log a change of the error set, not every pass: the journal stays readable.
        if errors != reported:
            for source in sorted(errors):
                sys.stderr.write("rknpu-exporter: %s: %s\n" % (source, errors[source]))
            if reported and not errors:
                sys.stderr.write("rknpu-exporter: all sources read again\n")
            sys.stderr.flush()
            reported = errors
        if args.once or stop.wait(args.interval):
            return 0


if __name__ == "__main__":
    sys.exit(main())
