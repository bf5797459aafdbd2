# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read what a Rockchip board's kernel says about its NPU: device tree, rknpu driver, devfreq.

Everything here only reads files (and, for the live root, the kernel ring buffer through a
callable the caller supplies). Nothing raises on a strange host: a missing, unreadable or
malformed file becomes a problem (when it decides whether RKLLM can run) or a note (when it
does not), so the caller always gets a complete answer.

Paths in the answer are as seen on the board (``/dev/dri/renderD129``), i.e. relative to the
sysroot the files were read under.
"""

from __future__ import annotations

import os
import re
import stat

# RKLLM target platform and NPU core count of each Rockchip SoC RKLLM (as provisioned by this
# collection) runs on. The S variants are the same silicon with fewer I/O pins.
PLATFORMS = {
    "rk3588": ("rk3588", 3),
    "rk3588s": ("rk3588", 3),
    "rk3576": ("rk3576", 2),
    "rk3576s": ("rk3576", 2),
}
# Rockchip SoCs with an NPU that RKLLM has no platform for here (RKNN-only): core counts.
OTHER_NPU_SOCS = {"rk3562": 1, "rk3566": 1, "rk3568": 1}

# Where the vendor driver's version can be read, in order of preference (REFERENCE.md).
VERSION_FILES = (
    "/sys/module/rknpu/version",
    "/sys/kernel/debug/rknpu/version",
    "/proc/rknpu/version",
)
KERNEL_LOG_FILE = "/var/log/kern.log"
DEVICE_TREE_DIRS = ("/proc/device-tree", "/sys/firmware/devicetree/base")

MAX_SMALL_FILE = 65536
MAX_LOG_BYTES = 256 * 1024 * 1024

_SOC_COMPATIBLE = re.compile(r"^rockchip,((?:rk|rv|px)\d{3,4}[a-z]?)$")
_SOC_IN_BOARD_COMPATIBLE = re.compile(r"^rockchip,((?:rk|rv|px)\d{3,4}[a-z]?)-")
_VERSION = re.compile(r"^\d+(?:\.\d+)*$")
_VERSION_IN_TEXT = re.compile(r"(?<![\w.])v?(\d+\.\d+(?:\.\d+)*)(?![\w.])")
_PRINTABLE = re.compile(r"^[\x20-\x7e]+$")
_LOG_VENDOR = re.compile(r"Initialized rknpu (\d+(?:\.\d+)+) \d+ for (\S+) on minor (\d+)")
_LOG_ROCKET = re.compile(r"Initialized rocket \S+ .*for rknn")


class ReadResult(object):
    """Outcome of reading one file: ``data`` (bytes) or ``error`` ("missing" or a reason)."""

    __slots__ = ("path", "data", "error")

    def __init__(self, path, data=None, error=None):
        self.path = path
        self.data = data
        self.error = error

    @property
    def missing(self):
        return self.error == "missing"


def _reason(exc):
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory"
    return exc.strerror or str(exc)


class Sysroot(object):
    """Reads board paths (``/sys/...``) under a prefix, never raising on I/O errors."""

    def __init__(self, root="/"):
        self.root = root or "/"

    def path(self, board_path):
        return os.path.join(self.root, board_path.lstrip("/"))

    def shown(self, board_path):
        """The path as it is named in messages: the real path read."""
        return os.path.normpath(self.path(board_path))

    def read(self, board_path, limit=MAX_SMALL_FILE):
        path = self.path(board_path)
        try:
            with open(path, "rb") as handle:
                return ReadResult(board_path, data=handle.read(limit))
        except FileNotFoundError:
            return ReadResult(board_path, error="missing")
        except NotADirectoryError:
            return ReadResult(board_path, error="missing")
        except (OSError, ValueError) as exc:
            return ReadResult(board_path, error=_reason(exc))

    def exists(self, board_path):
        return os.path.lexists(self.path(board_path))

    def isdir(self, board_path):
        return os.path.isdir(self.path(board_path))

    def listdir(self, board_path):
        try:
            return sorted(os.listdir(self.path(board_path)))
        except OSError:
            return []


def split_dt_strings(data):
    """Split a device-tree string list (NUL-terminated strings) into text.

    A missing final NUL is tolerated. Returns (strings, malformed): pieces that are not
    printable ASCII (garbage bytes) are dropped and make ``malformed`` true.
    """
    strings = []
    malformed = False
    for piece in data.split(b"\0"):
        if not piece:
            continue
        try:
            text = piece.decode("ascii")
        except UnicodeDecodeError:
            malformed = True
            continue
        if not _PRINTABLE.match(text):
            malformed = True
            continue
        strings.append(text)
    return strings, malformed


def is_version(text):
    return bool(_VERSION.match(text or ""))


def version_tuple(text):
    """``"0.9.10"`` -> ``(0, 9, 10)``; raises ValueError for anything that is not a version."""
    if not is_version(text):
        raise ValueError("not a version: %r" % (text,))
    return tuple(int(part) for part in text.split("."))


def compare_versions(left, right):
    """-1, 0 or 1 as ``left`` is older than, equal to or newer than ``right`` (numeric parts)."""
    a, b = list(version_tuple(left)), list(version_tuple(right))
    width = max(len(a), len(b))
    a += [0] * (width - len(a))
    b += [0] * (width - len(b))
    return (a > b) - (a < b)


def version_from_text(text):
    """The first dotted version in a driver version file (``RKNPU driver: v0.9.8`` -> ``0.9.8``)."""
    match = _VERSION_IN_TEXT.search(text)
    return match.group(1) if match else None


def soc_from_compatible(compatible):
    """Most specific Rockchip SoC named by a compatible list, e.g. ``rk3588s``; None if none.

    An S variant mentioned anywhere (``rockchip,rk3588s-orangepi-5``) refines the base SoC.
    """
    soc = None
    for entry in compatible:
        match = _SOC_COMPATIBLE.match(entry)
        if match:
            soc = match.group(1)
            break
    if soc is None:
        for entry in compatible:
            match = _SOC_IN_BOARD_COMPATIBLE.match(entry)
            if match:
                soc = match.group(1)
                break
    if soc is None:
        return None
    if not soc.endswith("s"):
        variant = re.compile(r"(?<![0-9a-z])%ss(?![0-9a-z])" % re.escape(soc))
        if any(variant.search(entry) for entry in compatible):
            soc += "s"
    return soc


def parse_kernel_log(lines):
    """Scan kernel log lines for the NPU drivers' init lines; the last one wins (latest boot).

    Returns a dict: ``driver`` (vendor, rocket or None), ``version``, ``device_name``
    (e.g. fdab0000.npu) and ``minor`` (the DRM minor of the vendor driver's card).
    """
    found = {"driver": None, "version": None, "device_name": None, "minor": None}
    for line in lines:
        if "Initialized r" not in line:
            continue
        match = _LOG_VENDOR.search(line)
        if match:
            found = {"driver": "vendor", "version": match.group(1), "device_name": match.group(2),
                     "minor": int(match.group(3))}
            continue
        if _LOG_ROCKET.search(line):
            found = {"driver": "rocket", "version": None, "device_name": None, "minor": None}
    return found


def _text_lines(data):
    return data.decode("utf-8", "replace").splitlines()


class _Gatherer(object):
    """One fact-gathering run; methods fill ``facts``, ``problems`` and ``notes``."""

    def __init__(self, sysroot, min_driver_version, run_dmesg):
        self.fs = Sysroot(sysroot)
        self.live = os.path.normpath(self.fs.root) == "/"
        self.min_version = min_driver_version
        self.run_dmesg = run_dmesg
        self.problems = []
        self.notes = []
        self._log = None
        self._log_tried = []
        self.facts = {
            "present": False, "soc": None, "platform": None, "board": None, "compatible": [],
            "npu_cores": None, "driver": None, "driver_version": None, "device": None,
            "devfreq": None, "supported": False, "problems": self.problems,
        }
        self.npu_nodes = []

    # -- device tree ------------------------------------------------------------------
    def dt_dir(self):
        for candidate in DEVICE_TREE_DIRS:
            if self.fs.isdir(candidate):
                return candidate
        return None

    def read_device_tree(self):
        """Fill compatible, board, soc, platform, npu_cores; return False when there is no DT."""
        base = self.dt_dir()
        if base is None:
            return False
        result = self.fs.read(base + "/compatible")
        if result.error:
            why = "is missing" if result.missing else "can't be read (%s)" % result.error
            self.problems.append("The device tree's %s %s, so the SoC can't be identified; check that %s is the "
                                 "board's device tree and readable." % (self.fs.shown(result.path), why, self.fs.shown(base)))
        else:
            strings, malformed = split_dt_strings(result.data)
            self.facts["compatible"] = strings
            if not strings:
                self.problems.append("The device tree's %s holds no readable compatible strings, so the SoC can't be "
                                     "identified; check that %s is the board's device tree."
                                     % (self.fs.shown(result.path), self.fs.shown(base)))
            elif malformed:
                self.notes.append("%s holds garbage bytes besides the compatible strings %s; they were ignored."
                                  % (self.fs.shown(result.path), ", ".join(strings)))
        model = self.fs.read(base + "/model")
        if model.data is not None:
            names, malformed = split_dt_strings(model.data)
            if names and not malformed:
                self.facts["board"] = names[0]
            else:
                self.notes.append("%s is not a readable board name; board is left unset." % self.fs.shown(model.path))
        elif not model.missing:
            self.notes.append("%s can't be read (%s); board is left unset." % (self.fs.shown(model.path), model.error))

        soc = soc_from_compatible(self.facts["compatible"])
        self.facts["soc"] = soc
        if soc in PLATFORMS:
            self.facts["platform"], self.facts["npu_cores"] = PLATFORMS[soc]
        elif soc in OTHER_NPU_SOCS:
            self.facts["npu_cores"] = OTHER_NPU_SOCS[soc]
        self.npu_nodes = self._npu_nodes(base)
        return True

    def _npu_nodes(self, base):
        """NPU nodes of the device tree: (name, compatible list, enabled)."""
        nodes = []
        parents = [base] + [base + "/" + n for n in self.fs.listdir(base) if n == "soc" or n.startswith("soc@")]
        for parent in parents:
            for name in self.fs.listdir(parent):
                path = parent + "/" + name
                if not self.fs.isdir(path):
                    continue
                compat = self.fs.read(path + "/compatible")
                strings = split_dt_strings(compat.data)[0] if compat.data is not None else []
                is_npu = any("rknpu" in c or "rknn-core" in c for c in strings)
                if not is_npu and not (name.startswith("npu@") and any(c.startswith("rockchip,") for c in strings)):
                    continue
                status = self.fs.read(path + "/status")
                words = split_dt_strings(status.data)[0] if status.data is not None else []
                enabled = not words or words[0] in ("okay", "ok")
                nodes.append((name, strings, enabled))
        return nodes

    # -- kernel log -------------------------------------------------------------------
    def kernel_log(self):
        """Parsed kernel log (dmesg for the live root, else the sysroot's kern.log); cached."""
        if self._log is not None:
            return self._log
        self._log = parse_kernel_log([])
        if self.live and self.run_dmesg is not None:
            try:
                rc, out, err = self.run_dmesg()
            except Exception as exc:  # the caller's runner failing must not break fact gathering
                rc, out, err = 1, "", str(exc)
            if rc == 0:
                self._log = parse_kernel_log(out.splitlines())
                if self._log["driver"]:
                    return self._log
                self._log_tried.append("dmesg: no NPU driver line (the ring buffer may have wrapped)")
            else:
                text = (err or out or "").strip()
                self._log_tried.append("dmesg: %s" % (text.splitlines()[0] if text else "exit code %s" % rc))
        path = self.fs.path(KERNEL_LOG_FILE)
        try:
            with open(path, "rb") as handle:
                self._log = parse_kernel_log(_text_lines(handle.read(MAX_LOG_BYTES)))
            if not self._log["driver"]:
                self._log_tried.append("%s: no NPU driver line" % self.fs.shown(KERNEL_LOG_FILE))
        except FileNotFoundError:
            self._log_tried.append("%s: missing" % self.fs.shown(KERNEL_LOG_FILE))
        except (OSError, ValueError) as exc:
            self._log_tried.append("%s: %s" % (self.fs.shown(KERNEL_LOG_FILE), _reason(exc)))
        return self._log

    # -- driver -----------------------------------------------------------------------
    def detect_driver(self):
        vendor = (self.fs.exists("/sys/module/rknpu") or self.fs.exists("/sys/kernel/debug/rknpu")
                  or self.fs.exists("/proc/rknpu") or self.fs.exists("/dev/rknpu") or bool(self._render_nodes()))
        if vendor:
            return "vendor"
        if self.fs.exists("/sys/module/rocket"):
            return "rocket"
        if not self.facts["soc"] and not self.npu_nodes:
            return None  # no Rockchip NPU here: don't go looking through the kernel log
        return self.kernel_log()["driver"]

    def read_driver_version(self):
        """The vendor driver's version from the first source that gives one."""
        tried = []
        malformed = []
        for board_path in VERSION_FILES:
            result = self.fs.read(board_path)
            if result.error:
                tried.append("%s: %s" % (self.fs.shown(board_path), result.error))
                continue
            text = result.data.decode("ascii", "replace").strip()
            version = version_from_text(text)
            if version:
                if malformed:
                    # Unreadable debugfs is normal for non-root; a file with the wrong content is not.
                    self.notes.append("The driver version was read from %s because %s." % (
                        self.fs.shown(board_path), "; ".join(malformed)))
                return version
            why = "empty" if not text else "not a version"
            malformed.append("%s is %s" % (self.fs.shown(board_path), why))
            tried.append("%s: %s" % (self.fs.shown(board_path), why))
        log = self.kernel_log()
        if log["version"]:
            return log["version"]
        tried.extend(self._log_tried)
        denied = any("permission denied" in t or "Operation not permitted" in t for t in tried)
        todo = ("run it as root (become: true) so debugfs and the kernel log can be read" if denied else
                "flash a newer board image or vendor kernel whose rknpu driver reports its version")
        self.problems.append("The rknpu driver is loaded but its version could not be read (%s), so the minimum %s "
                             "can't be checked; %s." % ("; ".join(tried), self.min_version, todo))
        return None

    def builtin(self):
        # /sys/module/<name>/initstate exists only for loadable modules.
        return not self.fs.exists("/sys/module/rknpu/initstate")

    # -- device node ------------------------------------------------------------------
    def _render_nodes(self):
        found = []
        for name in self.fs.listdir("/sys/class/drm"):
            if not name.startswith("renderD"):
                continue
            base = "/sys/class/drm/%s/device" % name
            of_name = self.fs.read(base + "/of_node/name")
            names = split_dt_strings(of_name.data)[0] if of_name.data is not None else []
            uevent = self.fs.read(base + "/uevent")
            lines = _text_lines(uevent.data) if uevent.data is not None else []
            if names[:1] == ["npu"] or "OF_NAME=npu" in lines:
                found.append("/dev/dri/" + name)
        return found

    def _accel_nodes(self):
        found = []
        for name in self.fs.listdir("/sys/class/accel"):
            uevent = self.fs.read("/sys/class/accel/%s/device/uevent" % name)
            lines = _text_lines(uevent.data) if uevent.data is not None else []
            of_name = self.fs.read("/sys/class/accel/%s/device/of_node/name" % name)
            names = split_dt_strings(of_name.data)[0] if of_name.data is not None else []
            if "DRIVER=rocket" in lines or names[:1] == ["npu"]:
                found.append("/dev/accel/" + name)
        return found

    def _is_char_device(self, board_path):
        try:
            return stat.S_ISCHR(os.stat(self.fs.path(board_path)).st_mode)
        except OSError:
            return None

    def find_device(self, driver):
        if driver == "rocket":
            for node in self._accel_nodes():
                if self._is_char_device(node):
                    return node
            return None
        candidates = self._render_nodes()
        if self.fs.exists("/dev/rknpu") or self.fs.exists("/sys/class/misc/rknpu"):
            candidates.append("/dev/rknpu")
        for node in candidates:
            if self._is_char_device(node):
                return node
        render_group = "the service user is in the render group (video too on some images)"
        if candidates:
            node = candidates[0]
            state = "is not a character device" if self._is_char_device(node) is False else "does not exist"
            self.problems.append("The NPU's device node %s %s; check that udev created it (in a container, pass it "
                                 "with --device %s) and that %s." % (self.fs.shown(node), state, node, render_group))
            return None
        minor = self.kernel_log()["minor"] if self.kernel_log()["driver"] == "vendor" else None
        expected = "/dev/dri/renderD%d" % (128 + minor) if minor is not None else "/dev/dri/renderD129"
        self.problems.append("No NPU device node was found (expected %s, the DRM render node whose sysfs of_node is npu, "
                             "or /dev/rknpu); check that udev created it (in a container, pass it with --device) "
                             "and that %s." % (expected, render_group))
        return None

    # -- devfreq ----------------------------------------------------------------------
    def read_devfreq(self):
        names = ["%s.npu" % node.split("@", 1)[1] for node, _compat, _on in self.npu_nodes if "@" in node]
        names += [n for n in self.fs.listdir("/sys/class/devfreq") if n.endswith(".npu") and n not in names]
        for name in names:
            board_path = "/sys/class/devfreq/" + name
            if not self.fs.isdir(board_path):
                continue
            info = {"path": board_path, "governor": None, "cur_freq": None, "max_freq": None}
            for key in ("governor", "cur_freq", "max_freq"):
                result = self.fs.read(board_path + "/" + key)
                if result.error:
                    if not result.missing:
                        self.notes.append("%s can't be read (%s)." % (self.fs.shown(result.path), result.error))
                    continue
                text = result.data.decode("ascii", "replace").strip()
                if key == "governor":
                    if _PRINTABLE.match(text) and " " not in text:
                        info[key] = text
                        continue
                elif text.isdigit():
                    info[key] = int(text)
                    continue
                self.notes.append("%s holds %r, not a %s; it was ignored." % (
                    self.fs.shown(result.path), text[:40], "governor name" if key == "governor" else "frequency in Hz"))
            return info
        return None

    # -- all together -----------------------------------------------------------------
    def run(self):
        facts = self.facts
        if not self.read_device_tree():
            self.problems.append("This host has no device tree (no %s), so it has no Rockchip NPU and can't serve RKLLM; "
                                 "run it on an RK3588 or RK3576 board." % self.fs.shown(DEVICE_TREE_DIRS[0]))
            return self.finish()
        soc = facts["soc"]
        enabled = [n for n in self.npu_nodes if n[2]]
        rockchip = soc is not None or any(c.startswith("rockchip,") for c in facts["compatible"])
        if not rockchip and not self.npu_nodes:
            if facts["compatible"]:
                described = ", ".join(([facts["board"]] if facts["board"] else []) + facts["compatible"][-1:])
                self.problems.append("This host has no Rockchip NPU (its device tree says %s), so it can't serve RKLLM; "
                                     "take it out of the boards group." % described)
            return self.finish()

        driver = self.detect_driver()
        facts["driver"] = driver
        facts["present"] = bool(enabled) or driver is not None
        if soc is not None and soc not in PLATFORMS:
            self.problems.append("The %s SoC has no NPU that RKLLM supports (RKLLM platforms: rk3588, rk3576), so this "
                                 "board can't serve RKLLM; take it out of the boards group." % soc)
        elif soc is None and facts["compatible"]:
            self.problems.append("The device tree names no Rockchip SoC (%s), so the RKLLM platform can't be chosen; "
                                 "check that this is an RK3588 or RK3576 board with its vendor device tree."
                                 % ", ".join(facts["compatible"]))

        if self.npu_nodes and not enabled and driver is None:
            self.problems.append("The NPU node %s is disabled in the device tree; enable it (the board's NPU device-tree "
                                 "overlay) and reboot." % self.npu_nodes[0][0])
        elif driver == "rocket":
            self.problems.append("The NPU is driven by the mainline rocket driver, but RKLLM needs Rockchip's vendor rknpu "
                                 "driver; boot a vendor kernel (a board image with the rknpu driver).")
        elif driver is None and any("rknn-core" in c for n in self.npu_nodes for c in n[1]):
            self.problems.append("The device tree describes the NPU for the mainline rocket driver (rknn-core nodes) and "
                                 "no vendor rknpu driver is loaded, but RKLLM needs the vendor rknpu driver; boot a vendor "
                                 "kernel (a board image with the rknpu driver).")
        elif driver is None and soc in PLATFORMS:
            what = "describes an NPU" if enabled else "describes no NPU (a mainline kernel?)"
            self.problems.append("The device tree %s but no NPU driver is loaded, so RKLLM can't run; boot a vendor kernel "
                                 "with Rockchip's rknpu driver (the board vendor's image)." % what)

        if driver == "vendor":
            version = self.read_driver_version()
            facts["driver_version"] = version
            if version is not None and compare_versions(version, self.min_version) < 0:
                fix = ("the driver is built into the kernel, so flash a newer board image or vendor kernel" if self.builtin()
                       else "the driver is a loadable module, so install an rknpu module of %s or newer built for this "
                            "kernel, or flash a newer board image" % self.min_version)
                self.problems.append("The NPU driver is %s but the RKLLM runtime needs %s or newer; %s."
                                     % (version, self.min_version, fix))
        if driver is not None:
            facts["device"] = self.find_device(driver)
        if driver == "vendor":
            facts["devfreq"] = self.read_devfreq()
        return self.finish()

    def finish(self):
        facts = self.facts
        facts["supported"] = bool(
            facts["present"] and facts["platform"] and facts["driver"] == "vendor" and facts["driver_version"]
            and facts["device"] and not self.problems)
        return facts, self.notes


def gather(sysroot="/", min_driver_version="0.9.8", run_dmesg=None):
    """Gather the ``rknpu`` facts of the board whose /proc, /sys and /dev live under ``sysroot``.

    ``run_dmesg`` is a callable returning ``(rc, stdout, stderr)`` of ``dmesg``; it is used only
    when ``sysroot`` is ``/`` (the kernel ring buffer is the running host's), before the
    sysroot's ``/var/log/kern.log``. Returns ``(facts, notes)``: the facts dict documented in
    the npu_facts module, and sentences about oddities that do not stop RKLLM (for warnings).
    Raises ValueError only for a ``min_driver_version`` that is not a version.
    """
    version_tuple(min_driver_version)
    return _Gatherer(sysroot, min_driver_version, run_dmesg).run()
