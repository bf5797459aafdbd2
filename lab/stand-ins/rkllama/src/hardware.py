"""The simulated board this lab stand-in runs on (rkllm.fleet lab only).

The real runtime asks the kernel; the lab's kernel is a tree of files under RKLLM_LAB_SYSROOT.
"""

import os

SYSROOT = os.environ.get("RKLLM_LAB_SYSROOT", "/lab/sysroot")


def _read(rel):
    try:
        with open(os.path.join(SYSROOT, rel), "rb") as f:
            return f.read()
    except OSError:
        return b""


def platform():
    """RKLLM platform of the board: rk3588 (also rk3588s), rk3576, or None."""
    compatible = _read("proc/device-tree/compatible").decode("ascii", "replace").split("\0")
    for entry in compatible:
        if entry.startswith("rockchip,rk3576"):
            return "rk3576"
        if entry.startswith("rockchip,rk3588"):
            return "rk3588"
    return None


def driver_version():
    return _read("sys/module/rknpu/version").decode("ascii", "replace").strip() or None
