"""The rknpu facts parser against board trees built from lab/boards.py, with targeted edits."""

import builtins
import os
import shutil

import pytest

from ansible_collections.rkllm.fleet.plugins.module_utils import rknpu
from ansible_collections.rkllm.fleet.plugins.module_utils.rknpu import compare_versions, gather

DT = "sys/firmware/devicetree/base"


def write(root, rel, data):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.islink(path):
        os.unlink(path)
    with open(path, "wb") as handle:
        handle.write(data)


def remove(root, rel):
    path = os.path.join(root, rel)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def facts_of(root, **kwargs):
    facts, _notes = gather(root, **kwargs)
    return facts


def deny(monkeypatch, *suffixes):
    """Make reads of files ending in SUFFIXES fail with EACCES (tests run as root, so chmod can't)."""
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if str(path).endswith(suffixes):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(rknpu, "open", fake_open, raising=False)


# -- the boards' compatible strings (REFERENCE.md) --------------------------------------

@pytest.mark.parametrize("compatible, soc, platform, cores", [
    (b"xunlong,orangepi-5\0rockchip,rk3588s\0", "rk3588s", "rk3588", 3),          # Orange Pi 5, mainline
    (b"rockchip,rk3588s-orangepi-5\0rockchip,rk3588\0", "rk3588s", "rk3588", 3),  # Orange Pi 5 / 5B, vendor
    (b"radxa,rock-5b\0rockchip,rk3588\0", "rk3588", "rk3588", 3),                 # Rock 5B
    (b"radxa,rock-4d\0rockchip,rk3576\0", "rk3576", "rk3576", 2),                 # Radxa Rock 4D
    (b"vendor,some-board\0rockchip,rk3576s\0", "rk3576s", "rk3576", 2),           # an RK3576S board
    (b"rockchip,rk3588-evb1-lp4-v10\0", "rk3588", "rk3588", 3),                   # SoC only in the board string
])
def test_soc_and_platform_come_from_the_compatible_strings(board_tree, compatible, soc, platform, cores):
    root = board_tree("rock5b")
    write(root, DT + "/compatible", compatible)
    facts = facts_of(root)
    assert (facts["soc"], facts["platform"], facts["npu_cores"]) == (soc, platform, cores)
    assert facts["compatible"] == [s for s in compatible.decode().split("\0") if s]
    assert facts["supported"] is True, facts["problems"]


def test_every_key_is_returned_for_a_good_board(board_tree):
    facts = facts_of(board_tree("orangepi5-vendor"))
    assert facts == {
        "present": True, "soc": "rk3588s", "platform": "rk3588", "board": "Orange Pi 5",
        "compatible": ["rockchip,rk3588s-orangepi-5", "rockchip,rk3588"], "npu_cores": 3,
        "driver": "vendor", "driver_version": "0.9.8", "device": "/dev/dri/renderD129",
        "devfreq": {"path": "/sys/class/devfreq/fdab0000.npu", "governor": "rknpu_ondemand",
                    "cur_freq": 1000000000, "max_freq": 1000000000},
        "supported": True, "problems": [],
    }


def test_rk3576_board_has_two_cores_and_its_own_npu_address(board_tree):
    facts = facts_of(board_tree("rock4d"))
    assert facts["platform"] == "rk3576" and facts["npu_cores"] == 2
    assert facts["devfreq"]["path"] == "/sys/class/devfreq/27700000.npu"
    assert facts["supported"] is True


def test_device_tree_read_through_sys_firmware_when_proc_is_absent(board_tree):
    root = board_tree("rock5b")
    os.unlink(os.path.join(root, "proc/device-tree"))
    facts = facts_of(root)
    assert facts["soc"] == "rk3588" and facts["board"] == "Radxa ROCK 5B" and facts["supported"] is True


# -- driver version sources and their order of preference --------------------------------

SOURCES = {
    "sys/module/rknpu/version": b"0.9.8\n",
    "sys/kernel/debug/rknpu/version": b"RKNPU driver: v0.9.9\n",
    "proc/rknpu/version": b"RKNPU driver: v0.9.10\n",
    "var/log/kern.log": b"Nov 25 08:00:01 rock5b kernel: [    2.1] [drm] Initialized rknpu 0.9.11 20250101 for fdab0000.npu on minor 1\n",
}


@pytest.mark.parametrize("dropped, expected", [
    (0, "0.9.8"),    # /sys/module/rknpu/version first
    (1, "0.9.9"),    # then debugfs
    (2, "0.9.10"),   # then procfs
    (3, "0.9.11"),   # then the kernel log
])
def test_driver_version_sources_in_order_of_preference(board_tree, dropped, expected):
    root = board_tree("rock5b")
    for rel, data in SOURCES.items():
        write(root, rel, data)
    for rel in list(SOURCES)[:dropped]:
        remove(root, rel)
    facts = facts_of(root)
    assert facts["driver"] == "vendor"
    assert facts["driver_version"] == expected


def test_unreadable_debugfs_falls_back_to_the_kernel_log(board_tree, monkeypatch):
    root = board_tree("rock5b")
    remove(root, "sys/module/rknpu/version")
    deny(monkeypatch, "debug/rknpu/version")
    facts, notes = gather(root)
    assert facts["driver_version"] == "0.9.8" and facts["supported"] is True
    assert notes == []  # the log gave the answer: nothing to warn about


def test_debugfs_denied_to_non_root_is_normal_and_not_warned_about(board_tree, monkeypatch):
    root = board_tree("orangepi5-vendor")  # has /proc/rknpu/version
    remove(root, "sys/module/rknpu/version")
    deny(monkeypatch, "debug/rknpu/version")
    facts, notes = gather(root)
    assert facts["driver_version"] == "0.9.8" and notes == []


def test_no_readable_version_is_a_problem_that_says_run_as_root(board_tree, monkeypatch):
    root = board_tree("rock5b")
    remove(root, "sys/module/rknpu/version")
    remove(root, "var/log/kern.log")
    deny(monkeypatch, "debug/rknpu/version")
    facts = facts_of(root)
    assert facts["driver"] == "vendor" and facts["driver_version"] is None
    assert facts["supported"] is False
    [problem] = facts["problems"]
    assert "permission denied" in problem and "become: true" in problem and "0.9.8" in problem


def test_garbage_in_the_preferred_version_file_falls_back_with_a_warning(board_tree):
    root = board_tree("rock5b")
    write(root, "sys/module/rknpu/version", b"\xff\xfe\x00garbage")
    facts, notes = gather(root)
    assert facts["driver_version"] == "0.9.8" and facts["supported"] is True
    assert len(notes) == 1 and "sys/module/rknpu/version" in notes[0]


def test_empty_version_files_and_no_log_line_are_a_problem(board_tree):
    root = board_tree("rock5b")
    write(root, "sys/module/rknpu/version", b"")
    write(root, "sys/kernel/debug/rknpu/version", b"\n")
    write(root, "var/log/kern.log", b"\x00\xff random bytes \xfe\n")
    facts = facts_of(root)
    assert facts["driver_version"] is None and facts["supported"] is False
    assert "version could not be read" in facts["problems"][0]
    assert "empty" in facts["problems"][0]


def test_kernel_log_last_init_line_wins(board_tree):
    root = board_tree("rock5b")
    remove(root, "sys/module/rknpu/version")
    remove(root, "sys/kernel/debug/rknpu/version")
    write(root, "var/log/kern.log",
          b"Jan  1 kernel: [drm] Initialized rknpu 0.9.6 20240322 for fdab0000.npu on minor 1\n"
          b"Nov 25 kernel: [drm] Initialized rknpu 0.9.8 20240828 for fdab0000.npu on minor 1\n")
    assert facts_of(root)["driver_version"] == "0.9.8"


class FakeDmesg(object):
    def __init__(self, rc, out="", err=""):
        self.result = (rc, out, err)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.result


def live_root(monkeypatch, tree):
    """Make sysroot "/" read TREE, so the live-host code path (dmesg) runs against a fixture."""
    monkeypatch.setattr(rknpu.Sysroot, "path", lambda self, p: os.path.join(tree, p.lstrip("/")))


def test_live_root_reads_the_ring_buffer_before_kern_log(board_tree, monkeypatch):
    root = board_tree("rock5b")
    remove(root, "sys/module/rknpu/version")
    remove(root, "sys/kernel/debug/rknpu/version")
    live_root(monkeypatch, root)
    dmesg = FakeDmesg(0, "[    2.0] [drm] Initialized rknpu 0.9.10 20250101 for fdab0000.npu on minor 1\n")
    facts, _notes = gather("/", run_dmesg=dmesg)
    assert dmesg.calls == 1 and facts["driver_version"] == "0.9.10"


def test_live_root_falls_back_to_kern_log_when_dmesg_is_denied(board_tree, monkeypatch):
    root = board_tree("rock5b")
    remove(root, "sys/module/rknpu/version")
    remove(root, "sys/kernel/debug/rknpu/version")
    live_root(monkeypatch, root)
    dmesg = FakeDmesg(1, err="dmesg: read kernel buffer failed: Operation not permitted\n")
    facts, _notes = gather("/", run_dmesg=dmesg)
    assert dmesg.calls == 1 and facts["driver_version"] == "0.9.8"

    remove(root, "var/log/kern.log")
    facts, _notes = gather("/", run_dmesg=dmesg)
    assert facts["driver_version"] is None
    assert "Operation not permitted" in facts["problems"][0] and "become: true" in facts["problems"][0]


def test_other_sysroots_never_read_the_hosts_ring_buffer(board_tree):
    root = board_tree("rock5b")
    remove(root, "sys/module/rknpu/version")
    remove(root, "sys/kernel/debug/rknpu/version")
    dmesg = FakeDmesg(0, "[drm] Initialized rknpu 0.9.10 20250101 for fdab0000.npu on minor 1\n")
    facts, _notes = gather(root, run_dmesg=dmesg)
    assert dmesg.calls == 0 and facts["driver_version"] == "0.9.8"  # from ROOT/var/log/kern.log


# -- old driver, version compare, min_driver_version --------------------------------------

def test_old_builtin_driver_says_flash_a_newer_image(board_tree):
    facts = facts_of(board_tree("rk3588-old-driver"))
    assert facts["driver_version"] == "0.9.6" and facts["supported"] is False
    assert facts["problems"] == [
        "The NPU driver is 0.9.6 but the RKLLM runtime needs 0.9.8 or newer; the driver is built into the kernel, "
        "so flash a newer board image or vendor kernel."]


def test_old_loadable_driver_says_install_a_newer_module(board_tree):
    root = board_tree("rk3588-old-driver")
    write(root, "sys/module/rknpu/initstate", b"live\n")
    [problem] = facts_of(root)["problems"]
    assert "loadable module" in problem and "0.9.8" in problem


@pytest.mark.parametrize("left, right, expected", [
    ("0.9.10", "0.9.8", 1), ("0.9.8", "0.9.10", -1), ("0.9.8", "0.9.8", 0),
    ("0.10.0", "0.9.99", 1), ("1.0", "0.9.8", 1), ("0.9", "0.9.0", 0),
])
def test_versions_compare_as_numbers(left, right, expected):
    assert compare_versions(left, right) == expected


def test_driver_0_9_10_is_newer_than_0_9_8(board_tree):
    root = board_tree("rock5b")
    write(root, "sys/module/rknpu/version", b"0.9.10\n")
    facts = facts_of(root, min_driver_version="0.9.8")
    assert facts["driver_version"] == "0.9.10" and facts["supported"] is True


@pytest.mark.parametrize("kind, minimum, supported", [
    ("rock5b", "0.9.8", True),
    ("rock5b", "0.9.9", False),
    ("rk3588-old-driver", "0.9.6", True),
    ("rk3588-old-driver", "0.9.7", False),
])
def test_min_driver_version_sets_the_bar(board_tree, kind, minimum, supported):
    facts = facts_of(board_tree(kind), min_driver_version=minimum)
    assert facts["supported"] is supported
    if not supported:
        assert "needs %s or newer" % minimum in facts["problems"][0]


def test_min_driver_version_must_be_a_version(tmp_path):
    with pytest.raises(ValueError):
        gather(str(tmp_path), min_driver_version="latest")


# -- rocket, no device tree, other boards, disabled or missing NPU --------------------------

def test_rocket_driver_is_detected_and_refused(board_tree):
    facts = facts_of(board_tree("rock5b-rocket"))
    assert facts["driver"] == "rocket" and facts["driver_version"] is None
    assert facts["present"] is True and facts["supported"] is False
    assert facts["device"] == "/dev/accel/accel0"
    [problem] = facts["problems"]
    assert "rocket" in problem and "vendor rknpu driver" in problem and "boot a vendor kernel" in problem


def test_rocket_is_recognised_from_the_kernel_log_alone(board_tree):
    root = board_tree("rock5b-rocket")
    remove(root, "sys/module/rocket")
    assert facts_of(root)["driver"] == "rocket"


def test_rknn_core_nodes_without_a_driver_point_to_a_vendor_kernel(board_tree):
    root = board_tree("rock5b-rocket")
    remove(root, "sys/module/rocket")
    remove(root, "var/log/kern.log")
    facts = facts_of(root)
    assert facts["driver"] is None and facts["present"] is True
    assert "rknn-core" in facts["problems"][0] and "boot a vendor kernel" in facts["problems"][0]


def test_host_without_device_tree_gets_an_answer(tmp_path):
    facts = facts_of(str(tmp_path))
    assert facts["present"] is False and facts["supported"] is False
    assert facts["compatible"] == [] and facts["soc"] is None and facts["board"] is None
    [problem] = facts["problems"]
    assert "no device tree" in problem and "RK3588 or RK3576" in problem


def test_raspberry_pi_has_no_rockchip_npu(board_tree):
    facts = facts_of(board_tree("raspberrypi4"))
    assert facts["present"] is False and facts["soc"] is None and facts["platform"] is None
    assert facts["board"] == "Raspberry Pi 4 Model B Rev 1.4"
    [problem] = facts["problems"]
    assert "no Rockchip NPU" in problem and "Raspberry Pi 4" in problem


@pytest.mark.parametrize("soc", ["rk3399", "rk3568"])
def test_rockchip_soc_without_an_rkllm_platform(board_tree, soc):
    root = board_tree("rock5b")
    write(root, DT + "/compatible", ("vendor,board\0rockchip,%s\0" % soc).encode())
    facts = facts_of(root)
    assert facts["soc"] == soc and facts["platform"] is None and facts["supported"] is False
    assert any("%s SoC has no NPU that RKLLM supports" % soc in p for p in facts["problems"])


def test_mainline_kernel_without_npu_says_boot_a_vendor_kernel(board_tree):
    root = board_tree("orangepi5-mainline")
    for rel in ("sys/module", "sys/kernel", "sys/class/drm", DT + "/npu@fdab0000", "var/log/kern.log"):
        remove(root, rel)
    facts = facts_of(root)
    assert facts["present"] is False and facts["driver"] is None and facts["soc"] == "rk3588s"
    [problem] = facts["problems"]
    assert "no NPU driver is loaded" in problem and "boot a vendor kernel" in problem


def test_disabled_npu_node_says_enable_it(board_tree):
    root = board_tree("rock5b")
    for rel in ("sys/module", "sys/kernel", "sys/class/drm", "var/log/kern.log"):
        remove(root, rel)
    write(root, DT + "/npu@fdab0000/status", b"disabled\0")
    facts = facts_of(root)
    assert facts["present"] is False
    [problem] = facts["problems"]
    assert "npu@fdab0000 is disabled" in problem and "reboot" in problem


# -- device node --------------------------------------------------------------------------

def test_missing_device_node_names_it_and_the_render_group(board_tree):
    root = board_tree("rock5b")
    remove(root, "dev/dri/renderD129")
    facts = facts_of(root)
    assert facts["device"] is None and facts["supported"] is False
    [problem] = facts["problems"]
    assert "/dev/dri/renderD129" in problem and "render group" in problem and "--device" in problem


def test_device_node_that_is_a_plain_file_is_refused(board_tree):
    root = board_tree("rock5b")
    write(root, "dev/dri/renderD129", b"")
    facts = facts_of(root)
    assert facts["device"] is None
    assert "not a character device" in facts["problems"][0]


def test_no_render_node_in_sysfs_expects_the_one_the_log_names(board_tree):
    root = board_tree("rock5b")
    remove(root, "sys/class/drm")
    remove(root, "dev")
    write(root, "var/log/kern.log", b"[drm] Initialized rknpu 0.9.8 20240828 for fdab0000.npu on minor 2\n")
    facts = facts_of(root)
    assert facts["device"] is None
    assert "expected /dev/dri/renderD130" in facts["problems"][0] and "/dev/rknpu" in facts["problems"][0]


def test_dev_rknpu_is_used_by_dma_heap_builds(board_tree):
    root = board_tree("rock5b")
    remove(root, "sys/class/drm")
    remove(root, "dev/dri/renderD129")
    os.symlink("/dev/null", os.path.join(root, "dev/rknpu"))
    facts = facts_of(root)
    assert facts["device"] == "/dev/rknpu" and facts["supported"] is True


# -- malformed files ----------------------------------------------------------------------

def test_compatible_without_final_nul_still_parses(board_tree):
    root = board_tree("rock5b")
    write(root, DT + "/compatible", b"radxa,rock-5b\0rockchip,rk3588")
    write(root, DT + "/model", b"Radxa ROCK 5B")
    facts, notes = gather(root)
    assert facts["compatible"] == ["radxa,rock-5b", "rockchip,rk3588"] and facts["board"] == "Radxa ROCK 5B"
    assert facts["supported"] is True and notes == []


@pytest.mark.parametrize("data, reason", [
    (b"\xff\xfe\xfd\x00\x01\x02\x80", "no readable compatible strings"),
    (b"", "no readable compatible strings"),
    (None, "permission denied"),
])
def test_bad_compatible_file_is_a_problem_not_a_traceback(board_tree, monkeypatch, data, reason):
    root = board_tree("rock5b")
    if data is None:
        deny(monkeypatch, "device-tree/compatible")
    else:
        write(root, DT + "/compatible", data)
    facts = facts_of(root)
    assert facts["soc"] is None and facts["platform"] is None and facts["supported"] is False
    assert any(reason in p and "compatible" in p for p in facts["problems"])


def test_garbage_beside_good_compatible_strings_is_a_warning(board_tree):
    root = board_tree("rock5b")
    write(root, DT + "/compatible", b"radxa,rock-5b\0\xff\xfe\0rockchip,rk3588\0")
    facts, notes = gather(root)
    assert facts["soc"] == "rk3588" and facts["supported"] is True
    assert len(notes) == 1 and "garbage" in notes[0]


def test_garbage_model_leaves_board_unset_with_a_warning(board_tree, monkeypatch):
    root = board_tree("rock5b")
    write(root, DT + "/model", b"\x89PNG\r\n\x1a\n")
    facts, notes = gather(root)
    assert facts["board"] is None and facts["supported"] is True
    assert "model" in notes[0]
    deny(monkeypatch, "device-tree/model")
    facts, notes = gather(root)
    assert facts["board"] is None and "permission denied" in notes[0]


def test_malformed_devfreq_values_become_null(board_tree):
    root = board_tree("rock5b")
    devfreq = "sys/devices/platform/fdab0000.npu/devfreq/fdab0000.npu/"
    write(root, devfreq + "cur_freq", b"\xff\xfe\n")
    remove(root, devfreq + "max_freq")
    facts, notes = gather(root)
    assert facts["devfreq"] == {"path": "/sys/class/devfreq/fdab0000.npu", "governor": "rknpu_ondemand",
                                "cur_freq": None, "max_freq": None}
    assert facts["supported"] is True and "cur_freq" in notes[0]


def test_unreadable_everything_is_still_an_answer(board_tree, monkeypatch):
    root = board_tree("rock5b")
    deny(monkeypatch, "")  # every open() fails
    facts = facts_of(root)
    assert set(facts) == {"present", "soc", "platform", "board", "compatible", "npu_cores", "driver",
                          "driver_version", "device", "devfreq", "supported", "problems"}
    assert facts["supported"] is False and facts["problems"]
