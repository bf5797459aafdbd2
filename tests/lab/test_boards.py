"""lab/boards.py: every kind builds as the lab builds it, is idempotent, and reads back through npu_facts."""

import importlib.util
import os
import subprocess
import sys

import pytest

from ansible_collections.rkllm.fleet.plugins.module_utils.rknpu import compare_versions, gather

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BOARDS_PY = os.path.join(REPO, "lab", "boards.py")
DT = "sys/firmware/devicetree/base"

_spec = importlib.util.spec_from_file_location("rkllm_lab_boards", BOARDS_PY)
boards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(boards)


def cli(*args):
    proc = subprocess.run([sys.executable, BOARDS_PY] + list(args), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def snapshot(root):
    """Every entry under ROOT: link targets, or file bytes and mtimes (to see rewrites)."""
    state = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                state[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as handle:
                    state[rel] = ("file", handle.read(), os.stat(path).st_mtime_ns)
    return state


def read(root, rel):
    with open(os.path.join(root, rel), "rb") as handle:
        return handle.read()


def test_list_names_every_kind_the_lab_uses():
    listed = [line.split()[0] for line in cli("--list").splitlines()]
    assert listed == list(boards.BOARDS)
    assert {"orangepi5-vendor", "rock5b", "rock4d", "rk3588-old-driver", "rock5b-rocket", "raspberrypi4"} <= set(listed)


def test_unknown_kind_is_refused_with_the_choices(tmp_path):
    proc = subprocess.run([sys.executable, BOARDS_PY, "rock5c", str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "rock5b" in proc.stderr and not os.listdir(str(tmp_path))


@pytest.mark.parametrize("kind", list(boards.BOARDS))
def test_kind_builds_idempotently_and_round_trips(kind, tmp_path):
    root = str(tmp_path / kind)
    assert " 0 unchanged" in cli(kind, root)
    first = snapshot(root)
    assert "0 written" in cli(kind, root)
    assert snapshot(root) == first

    board = boards.BOARDS[kind]
    facts, notes = gather(root)
    good = board["driver"] == "vendor" and compare_versions(board["driver_version"], "0.9.8") >= 0
    assert notes == []
    assert facts["board"] == board["model"]
    assert facts["compatible"] == list(board["compatible"])
    assert (facts["soc"], facts["platform"]) == (board["soc"], board["platform"])
    assert facts["npu_cores"] == boards.npu_cores(kind)
    assert (facts["driver"], facts["driver_version"]) == (board["driver"], board["driver_version"])
    assert facts["present"] is (board["driver"] is not None)
    assert facts["device"] == boards.device_node(kind)
    assert (facts["devfreq"] or {}).get("path") == boards.devfreq_dir(kind)
    assert facts["supported"] is good
    assert len(facts["problems"]) == (0 if good else 1)


@pytest.mark.parametrize("kind, compatible", [
    ("orangepi5-vendor", b"rockchip,rk3588s-orangepi-5\0rockchip,rk3588\0"),
    ("orangepi5-mainline", b"xunlong,orangepi-5\0rockchip,rk3588s\0"),
    ("rock5b", b"radxa,rock-5b\0rockchip,rk3588\0"),
    ("rock4d", b"radxa,rock-4d\0rockchip,rk3576\0"),
    ("raspberrypi4", b"raspberrypi,4-model-b\0brcm,bcm2711\0"),
])
def test_device_tree_bytes_are_those_of_the_real_boards(kind, compatible, tmp_path):
    root = str(tmp_path)
    boards.build(kind, root)
    assert read(root, "proc/device-tree/compatible") == compatible
    assert read(root, "proc/device-tree/model").endswith(b"\0")


@pytest.mark.parametrize("kind, addr, top_mhz, cores", [
    ("rock5b", "fdab0000", 1000, 3),
    ("orangepi5-vendor", "fdab0000", 1000, 3),
    ("rock4d", "27700000", 950, 2),
])
def test_vendor_board_has_what_a_frequency_pinning_role_writes(kind, addr, top_mhz, cores, tmp_path):
    root = str(tmp_path)
    boards.build(kind, root)
    npu = "sys/class/devfreq/%s.npu/" % addr
    freqs = [int(f) for f in read(root, npu + "available_frequencies").split()]
    assert freqs[0] == 300000000 and freqs[-1] == top_mhz * 1000000 == int(read(root, npu + "max_freq"))
    assert {b"rknpu_ondemand", b"userspace"} <= set(read(root, npu + "available_governors").split())
    assert read(root, npu + "governor") == b"rknpu_ondemand\n"
    assert os.path.isfile(os.path.join(root, npu, "userspace/set_freq"))
    assert read(root, "sys/class/drm/renderD129/device/of_node/name") == b"npu\0"
    assert read(root, "sys/kernel/debug/rknpu/version") == b"RKNPU driver: v0.9.8\n"
    load = read(root, "sys/kernel/debug/rknpu/load").decode()
    assert load.startswith("NPU load:  Core0:  0%,") and load.count("Core") == cores
    assert b"[drm] Initialized rknpu 0.9.8 20240828 for %s.npu on minor 1" % addr.encode() in read(root, "var/log/kern.log")
    assert b"userspace" in read(root, "sys/class/devfreq/dmc/available_governors")
    policies = os.listdir(os.path.join(root, "sys/devices/system/cpu/cpufreq"))
    assert policies and all(os.path.isfile(os.path.join(root, "sys/devices/system/cpu/cpufreq", p, "scaling_setspeed"))
                            for p in policies)
    assert os.path.isfile(os.path.join(root, "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"))


def test_link_dev_and_switching_kinds_leave_no_stale_hardware(tmp_path):
    root = str(tmp_path / "board")
    cli("rock5b", root)
    cli("rock5b-rocket", root, "--link-dev")
    assert os.readlink(os.path.join(root, "dev")) == "/dev"
    assert not os.path.exists(os.path.join(root, "sys/module/rknpu"))
    assert not os.path.exists(os.path.join(root, "sys/class/drm"))
    assert gather(root)[0]["driver"] == "rocket"
    cli("rock4d", root)
    assert os.path.isdir(os.path.join(root, "dev")) and not os.path.islink(os.path.join(root, "dev"))
    assert not os.path.exists(os.path.join(root, "sys/module/rocket"))
    facts = gather(root)[0]
    assert (facts["soc"], facts["driver"], facts["supported"]) == ("rk3576", "vendor", True)
    assert os.path.exists("/dev/null")


def test_rebuild_restores_boot_values_of_writable_settings(tmp_path):
    root = str(tmp_path)
    boards.build("rock5b", root)
    governor = os.path.join(root, "sys/class/devfreq/fdab0000.npu/governor")
    with open(governor, "w", encoding="ascii") as handle:
        handle.write("userspace\n")
    assert boards.build("rock5b", root)["written"] == 1
    assert read(root, "sys/class/devfreq/fdab0000.npu/governor") == b"rknpu_ondemand\n"
