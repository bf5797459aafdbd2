# SPDX-License-Identifier: GPL-3.0-or-later
"""Unit tests of roles/npu/files/rknpu_exporter.py, the NPU metrics exporter.

Each test builds a board's /proc and /sys under a temporary sysroot (with the lab's
boards.py where a real board's shape is wanted), runs one collection pass the way the
service does, parses the exposition text the node exporter would serve and checks the values.
"""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
EXPORTER = os.path.join(ROOT, "roles", "npu", "files", "rknpu_exporter.py")
BOARDS = os.path.join(ROOT, "lab", "boards.py")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


exporter = _load("rknpu_exporter", EXPORTER)


# A strict reader of the text exposition format: what the node exporter's textfile collector
# rejects (a sample before its TYPE, a duplicate series, a bad value) fails the test.
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse(text):
    """{name: {frozenset(labels): float}}; asserts the text is well-formed."""
    assert text.endswith("\n")
    metrics, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            name, kind = line.split(" ", 3)[2:]
            assert name not in types, "TYPE twice for %s" % name
            assert kind in ("gauge", "counter", "untyped")
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, "not a sample line: %r" % line
        name, labels_text, value = match.groups()
        assert name in types, "%s has no TYPE line before it" % name
        labels = {}
        if labels_text:
            consumed = 0
            for label in _LABEL.finditer(labels_text):
                assert label.start() == consumed, "bad labels: %r" % labels_text
                labels[label.group(1)] = label.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                consumed = label.end()
            assert consumed == len(labels_text), "bad labels: %r" % labels_text
        key = frozenset(labels.items())
        series = metrics.setdefault(name, {})
        assert key not in series, "duplicate series %s%s" % (name, labels)
        series[key] = float(value)
    return metrics


def one(metrics, name, **labels):
    """The value of the only series of name (or of the series with these labels)."""
    series = metrics[name]
    if labels:
        return series[frozenset(labels.items())]
    assert len(series) == 1, series
    return next(iter(series.values()))


def labels_of(metrics, name):
    (key,) = metrics[name].keys()
    return dict(key)


def build(kind, root):
    subprocess.run([sys.executable, BOARDS, kind, str(root)], check=True, stdout=subprocess.DEVNULL)
    return str(root)


def scrape(sysroot, tmp_path, minimum="0.9.8"):
    """One pass as the service runs it (--once), then the file the node exporter would read."""
    output = tmp_path / "textfile" / "rknpu.prom"
    output.parent.mkdir(exist_ok=True)
    assert exporter.main(["--sysroot", str(sysroot), "--output", str(output), "--once", "--min-driver-version", minimum]) == 0
    return parse(output.read_text())


def write(root, relative, text):
    path = os.path.join(str(root), relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


needs_boards = pytest.mark.skipif(not os.path.exists(BOARDS), reason="lab/boards.py is not there")


@needs_boards
@pytest.mark.parametrize("kind, soc, platform, cores, max_hz", [
    ("orangepi5-vendor", "rk3588s", "rk3588", 3, 1000000000),
    ("rock5b", "rk3588", "rk3588", 3, 1000000000),
    ("rock4d", "rk3576", "rk3576", 2, None),
])
def test_good_board_exports_load_frequency_and_driver(tmp_path, kind, soc, platform, cores, max_hz):
    sysroot = build(kind, tmp_path / "sysroot")
    write(sysroot, "sys/kernel/debug/rknpu/load", "NPU load:  Core0: 42%, Core1:  7%," + (" Core2: 100%," if cores == 3 else "") + "\n")
    metrics = scrape(sysroot, tmp_path)

    info = labels_of(metrics, "rknpu_driver_info")
    assert info["driver"] == "vendor"
    assert info["version"] == "0.9.8"
    assert (info["soc"], info["platform"]) == (soc, platform)
    assert info["board"]
    assert one(metrics, "rknpu_driver_version_meets_minimum", minimum="0.9.8") == 1

    assert one(metrics, "rknpu_load_ratio", core="0") == pytest.approx(0.42)
    assert one(metrics, "rknpu_load_ratio", core="1") == pytest.approx(0.07)
    assert len(metrics["rknpu_load_ratio"]) == cores
    if cores == 3:
        assert one(metrics, "rknpu_load_ratio", core="2") == 1

    assert one(metrics, "rknpu_max_frequency_hertz") > one(metrics, "rknpu_min_frequency_hertz") > 0
    if max_hz:
        assert one(metrics, "rknpu_max_frequency_hertz") == max_hz
    assert 0 < one(metrics, "rknpu_frequency_hertz") <= one(metrics, "rknpu_available_max_frequency_hertz")
    assert labels_of(metrics, "rknpu_governor_info") == {"governor": "rknpu_ondemand"}
    assert one(metrics, "rknpu_exporter_errors") == 0


@needs_boards
def test_pinned_governor_and_frequency_show(tmp_path):
    sysroot = build("rock5b", tmp_path / "sysroot")
    devfreq = "sys/devices/platform/fdab0000.npu/devfreq/fdab0000.npu/"
    write(sysroot, devfreq + "governor", "userspace\n")
    write(sysroot, devfreq + "cur_freq", "800000000\n")
    metrics = scrape(sysroot, tmp_path)
    assert labels_of(metrics, "rknpu_governor_info") == {"governor": "userspace"}
    assert one(metrics, "rknpu_frequency_hertz") == 800000000


@needs_boards
@pytest.mark.parametrize("minimum, meets", [("0.9.6", 1), ("0.9.7", 0), ("0.9.8", 0), ("1.0", 0)])
def test_old_driver_is_below_the_minimum(tmp_path, minimum, meets):
    sysroot = build("rk3588-old-driver", tmp_path / "sysroot")
    metrics = scrape(sysroot, tmp_path, minimum)
    assert labels_of(metrics, "rknpu_driver_info")["version"] == "0.9.6"
    assert one(metrics, "rknpu_driver_version_meets_minimum", minimum=minimum) == meets


@needs_boards
@pytest.mark.parametrize("kind, driver", [("rock5b-rocket", "rocket"), ("raspberrypi4", "none")])
def test_board_without_the_vendor_driver_is_reported_without_errors(tmp_path, kind, driver):
    sysroot = build(kind, tmp_path / "sysroot")
    metrics = scrape(sysroot, tmp_path)
    assert labels_of(metrics, "rknpu_driver_info")["driver"] == driver
    assert one(metrics, "rknpu_driver_version_meets_minimum", minimum="0.9.8") == 0
    # No vendor driver: no load file and no rknpu devfreq to miss, so nothing is an error.
    assert "rknpu_load_ratio" not in metrics
    assert one(metrics, "rknpu_exporter_errors") == 0


def _minimal_board(root, load="NPU load:  Core0:  0%, Core1:  0%, Core2:  0%,\n"):
    write(root, "proc/device-tree/compatible", "radxa,rock-5b\0rockchip,rk3588\0")
    write(root, "proc/device-tree/model", "Radxa ROCK 5B\0")
    write(root, "sys/module/rknpu/version", "0.9.8\n")
    if load is not None:
        write(root, "sys/kernel/debug/rknpu/load", load)
    base = "sys/class/devfreq/fdab0000.npu/"
    for name, value in (("cur_freq", "1000000000"), ("max_freq", "1000000000"), ("min_freq", "300000000"),
                        ("governor", "rknpu_ondemand"), ("available_frequencies", "300000000 600000000 1000000000")):
        write(root, base + name, value + "\n")
    return str(root)


def test_malformed_load_costs_only_the_load(tmp_path):
    sysroot = _minimal_board(tmp_path / "sysroot", load="garbage \xff\n")
    metrics = scrape(sysroot, tmp_path)
    assert "rknpu_load_ratio" not in metrics
    assert one(metrics, "rknpu_exporter_source_ok", source="load") == 0
    assert one(metrics, "rknpu_exporter_errors") == 1
    # Everything else is still there.
    assert one(metrics, "rknpu_frequency_hertz") == 1000000000
    assert one(metrics, "rknpu_driver_version_meets_minimum", minimum="0.9.8") == 1


def test_missing_debugfs_is_an_error_with_the_vendor_driver(tmp_path):
    sysroot = _minimal_board(tmp_path / "sysroot", load=None)
    collection = exporter.collect(sysroot)
    assert "debugfs" in collection.errors["load"]
    metrics = parse(exporter.render(collection))
    assert one(metrics, "rknpu_exporter_source_ok", source="load") == 0
    assert one(metrics, "rknpu_max_frequency_hertz") == 1000000000


def test_malformed_devfreq_and_version_keep_the_rest(tmp_path):
    sysroot = _minimal_board(tmp_path / "sysroot")
    write(sysroot, "sys/class/devfreq/fdab0000.npu/cur_freq", "fast\n")
    write(sysroot, "sys/module/rknpu/version", "unknown\n")
    metrics = scrape(sysroot, tmp_path)
    assert "rknpu_frequency_hertz" not in metrics
    assert one(metrics, "rknpu_max_frequency_hertz") == 1000000000
    assert one(metrics, "rknpu_exporter_source_ok", source="devfreq") == 0
    assert one(metrics, "rknpu_exporter_source_ok", source="driver") == 0
    assert one(metrics, "rknpu_exporter_errors") == 2
    assert one(metrics, "rknpu_driver_version_meets_minimum", minimum="0.9.8") == 0
    assert len(metrics["rknpu_load_ratio"]) == 3


def test_debugfs_version_is_used_without_sys_module(tmp_path):
    sysroot = _minimal_board(tmp_path / "sysroot")
    os.unlink(os.path.join(sysroot, "sys/module/rknpu/version"))
    write(sysroot, "sys/kernel/debug/rknpu/version", "RKNPU driver: v0.9.7\n")
    metrics = scrape(sysroot, tmp_path)
    assert labels_of(metrics, "rknpu_driver_info")["version"] == "0.9.7"
    assert one(metrics, "rknpu_driver_version_meets_minimum", minimum="0.9.8") == 0


def test_empty_sysroot_still_writes_metrics_and_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    metrics = scrape(empty, tmp_path)
    assert one(metrics, "rknpu_exporter_source_ok", source="devicetree") == 0
    assert one(metrics, "rknpu_exporter_errors") == 1
    assert labels_of(metrics, "rknpu_driver_info")["driver"] == "none"


def test_unreadable_load_is_an_error_not_a_crash(tmp_path):
    sysroot = _minimal_board(tmp_path / "sysroot")
    load = os.path.join(sysroot, "sys/kernel/debug/rknpu/load")
    # A directory in its place: open() fails even for root (as an EACCES would for a user).
    os.unlink(load)
    os.mkdir(load)
    metrics = scrape(sysroot, tmp_path)
    assert one(metrics, "rknpu_exporter_source_ok", source="load") == 0
    assert one(metrics, "rknpu_exporter_errors") == 1


def test_labels_are_escaped(tmp_path):
    sysroot = _minimal_board(tmp_path / "sysroot")
    write(sysroot, "proc/device-tree/model", 'Board "X"\\7\0')
    metrics = scrape(sysroot, tmp_path)
    assert labels_of(metrics, "rknpu_driver_info")["board"] == 'Board "X"\\7'


def test_output_replaced_atomically_and_world_readable(tmp_path):
    sysroot = _minimal_board(tmp_path / "sysroot")
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    output = textfile / "rknpu.prom"
    output.write_text("old\n")
    old_inode = os.stat(str(output)).st_ino
    assert exporter.main(["--sysroot", sysroot, "--output", str(output), "--once"]) == 0
    assert os.stat(str(output)).st_ino != old_inode  # renamed over, not rewritten in place
    assert stat.S_IMODE(os.stat(str(output)).st_mode) == 0o644
    assert os.listdir(str(textfile)) == ["rknpu.prom"]  # no temp file left behind
    parse(output.read_text())


def test_unwritable_output_fails_the_once_run(tmp_path, capsys):
    sysroot = _minimal_board(tmp_path / "sysroot")
    assert exporter.main(["--sysroot", sysroot, "--output", str(tmp_path / "missing" / "rknpu.prom"), "--once"]) == 1
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("NPU load:  Core0:  0%, Core1:  0%, Core2:  0%,", {"0": 0.0, "1": 0.0, "2": 0.0}),
    ("NPU load:  Core0: 13%, Core1: 99%,", {"0": 0.13, "1": 0.99}),
    ("NPU load: 20%", {"0": 0.2}),
])
def test_load_formats(text, expected):
    assert exporter.parse_load(text) == pytest.approx(expected)


def test_service_loop_refreshes_and_stops_on_sigterm(tmp_path):
    sysroot = _minimal_board(tmp_path / "sysroot")
    output = tmp_path / "rknpu.prom"
    process = subprocess.Popen([sys.executable, EXPORTER, "--sysroot", sysroot, "--output", str(output), "--interval", "0.2"],
                               stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 10
        while not output.exists() and time.time() < deadline:
            time.sleep(0.05)
        write(sysroot, "sys/kernel/debug/rknpu/load", "NPU load:  Core0: 55%, Core1:  0%, Core2:  0%,\n")
        value = None
        while time.time() < deadline:
            value = one(parse(output.read_text()), "rknpu_load_ratio", core="0")
            if value == pytest.approx(0.55):
                break
            time.sleep(0.05)
        assert value == pytest.approx(0.55)
    finally:
        process.terminate()
        assert process.wait(timeout=5) == 0
