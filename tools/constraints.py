#!/usr/bin/env python3
"""Pinned pip constraints for the forks the roles install, and the wheel test that keeps them true.

    python3 tools/constraints.py generate exo     [--commit C] [--upgrade]
    python3 tools/constraints.py generate rkllama [--commit C] [--upgrade]
    python3 tools/constraints.py check [FILE ...] [--python 3.13] [--platform aarch64]

`generate` reads the fork's own dependency list at a commit from the read-only mirror
(exo-rkllama: setup.py's install_requires, read with ast, never run; rkllama: requirements.txt),
resolves the whole closure with pip for every target (CPython version x linux aarch64 / x86_64,
glibc 2.36 = Debian 12, the oldest board OS), wheels only, and writes
roles/<role>/files/constraints/<commit>.txt. Existing pins are kept unless --upgrade.

`check` (make wheels, part of make test) resolves every shipped constraints file again for each
target its header says has wheels (must resolve to wheels only, with nothing unpinned pulled in) and
for each target it says has none (must still fail, naming the package): the roles choose a Python
from that header, so a wrong header would make a role choose a Python pip can't serve.

Header lines the roles read (roles/exo/tasks/python.yml):
    # rkllm.fleet wheels: 3.12/aarch64 3.12/x86_64        targets that install from wheels only
    # rkllm.fleet no-wheel: 3.13/aarch64=numpy==2.0.0 ...  targets that can't, and the first package why
    # rkllm.fleet source-only: nuitka uuid                 pure-Python sdists with no wheel on PyPI at all
    # rkllm.fleet vcs: tinygrad                            pulled from git by the fork's setup.py

Needs PyPI (CI reaches it) but not GitHub: a VCS requirement (exo's tinygrad) is named in the
header and left out of the resolution, since its repository can't be reached here.
"""
import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRRORS = {
    "exo": "/work/.mirror/jfreed-dev+exo-rkllama/repo",
    "rkllama": "/work/.mirror/jfreed-dev+rkllama/repo",
}
DEFAULT_COMMITS = {
    "exo": "0c831d39a0c42772aa68df9bacd6af8c8bd3cd84",
    "rkllama": "1d8d210ae34cf960b688183bdfe256e0b8043cab",
}
# Python versions each role may select (exo-rkllama needs 3.12+, REFERENCE.md; rkllama 3.11+).
PYTHONS = {"exo": ["3.12", "3.13"], "rkllama": ["3.11", "3.12", "3.13"]}
PLATFORMS = ["aarch64", "x86_64"]
GLIBC_MINOR = 36  # Debian 12 (2.36); Ubuntu 24.04 has 2.39, Debian 13 2.41
HEADER = "# rkllm.fleet "
# Why some pins are what they are (kept in the generated header).
NOTES = {
    "rkllama": [
        "# requirements.txt pins only Flask==2.3.2 and requests==2.31.0; the rest floats upstream:",
        "#   transformers 4.46.3 (the version exo-rkllama pins too) -> tokenizers 0.20.x (abi3 wheels),",
        "#   huggingface-hub < 1.0; torch 2.6.0 (aarch64 CPU wheels for 3.9-3.13, pins sympy 1.13.1);",
        "#   numpy 2.3 (the last series with 3.11 wheels); Werkzeug 2.3.8 (Flask 2.3.2 predates Werkzeug 3).",
        "# setuptools: torch needs it on Python >= 3.12 only. nvidia-*/triton: torch's CUDA wheels, pulled on",
        "# x86_64 only (about 2.5 GB; never on a board); a constraint is harmless where unused.",
    ],
    "exo": [
        "# setup.py pins numpy==2.0.0: it has no cp313 wheel (those start at 2.1.0), so no Python 3.13.",
    ],
}


def platform_args(arch):
    tags = ["manylinux_2_%d_%s" % (m, arch) for m in range(GLIBC_MINOR, 16, -1)]
    tags += ["manylinux2014_%s" % arch, "linux_%s" % arch]
    return [a for t in tags for a in ("--platform", t)]


# pip evaluates environment markers against the Python running it, not the --platform and
# --python-version it resolves for (pip issue 11664): from this x86_64 CPython 3.11, torch's
# `nvidia-*; platform_machine == "x86_64"` would be pulled for aarch64 and its
# `setuptools; python_version >= "3.12"` dropped for 3.12. So pip runs with its marker
# environment set to the target's.
_PIP_AS_TARGET = """
import sys
from pip._vendor.packaging import markers
_default = markers.default_environment
def _target():
    env = _default()
    env.update(__TARGET__)
    return env
markers.default_environment = _target
from pip._internal.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def pip(args, check=False, python=None, arch=None):
    code = "from pip._internal.cli.main import main; import sys; sys.exit(main(sys.argv[1:]))"
    if python:
        target = {"python_version": python, "python_full_version": python + ".0", "platform_machine": arch,
                  "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython"}
        code = _PIP_AS_TARGET.replace("__TARGET__", repr(target))
    cmd = [sys.executable, "-c", code, "--disable-pip-version-check", "--no-input"] + args
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def name_of(req):
    return re.split(r"[<>=!~;\[ @]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def resolve(requirements, python, arch, constraints=None):
    """pip's resolver for one target, wheels only. Returns (pins, error_text)."""
    with tempfile.TemporaryDirectory() as tmp:
        req = os.path.join(tmp, "req.txt")
        with open(req, "w") as f:
            f.write("\n".join(requirements) + "\n")
        args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--only-binary=:all:",
                "--python-version", python, "--implementation", "cp", "--abi", "cp" + python.replace(".", ""),
                "--abi", "abi3", "--abi", "none", "--report", os.path.join(tmp, "r.json"), "-r", req]
        args += platform_args(arch)
        if constraints:
            con = os.path.join(tmp, "con.txt")
            with open(con, "w") as f:
                f.write("\n".join(constraints) + "\n")
            args += ["-c", con]
        proc = pip(args, python=python, arch=arch)
        if proc.returncode != 0:
            return None, proc.stderr
        with open(os.path.join(tmp, "r.json")) as f:
            report = json.load(f)
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
            for i in report["install"]}, ""


def missing_package(error_text, pins, python, arch, suspect=None):
    """The first pin without a wheel for this target (pip's resolver may only say ResolutionImpossible)."""
    m = re.search(r"No matching distribution found for (\S+)", error_text)
    if m:
        return m.group(1)
    for pin in ([suspect] if suspect else []) + pins:
        if pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--no-deps", "--only-binary=:all:",
                "--python-version", python] + platform_args(arch) + [pin]).returncode != 0:
            return pin
    return "(pip: %s)" % error_text.strip().splitlines()[-1][:200]


def has_any_wheel(req, python):
    """True when PyPI has a wheel of this exact pin for any Linux target we support."""
    for arch in PLATFORMS:
        if pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--no-deps", "--only-binary=:all:",
                "--python-version", python] + platform_args(arch) + [req]).returncode == 0:
            return True
    return False


def sdist_requires(req):
    """Run-time requirements of a pure-Python sdist (its metadata is built on this machine)."""
    with tempfile.TemporaryDirectory() as tmp:
        pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--no-deps", "--no-binary=:all:",
             "--report", os.path.join(tmp, "r.json"), req], check=True)
        with open(os.path.join(tmp, "r.json")) as f:
            meta = json.load(f)["install"][0]["metadata"]
    return [r for r in meta.get("requires_dist") or [] if "extra ==" not in r]


def fork_requirements(role, commit):
    git = ["git", "-C", MIRRORS[role], "show"]
    if role == "rkllama":
        text = subprocess.run(git + ["%s:requirements.txt" % commit], capture_output=True, text=True,
                              check=True).stdout
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")], \
            "requirements.txt"
    source = subprocess.run(git + ["%s:setup.py" % commit], capture_output=True, text=True, check=True).stdout
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "install_requires" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts], "setup.py install_requires"
    raise SystemExit("no install_requires list in %s setup.py at %s" % (role, commit))


def read_pins(path):
    pins = {}
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, version = line.partition("==")
                pins[name_of(name)] = version
    return pins


def read_header(path_or_text):
    text = open(path_or_text).read() if os.path.exists(path_or_text) else path_or_text
    header = {"wheels": [], "no-wheel": [], "source-only": [], "vcs": [], "requires": []}
    for line in text.splitlines():
        if line.startswith(HEADER):
            key, _, value = line[len(HEADER):].partition(":")
            header[key.strip()] = value.split()
    return header


def generate(role, commit, upgrade):
    out = os.path.join(ROOT, "roles", role, "files", "constraints", commit + ".txt")
    top, source = fork_requirements(role, commit)
    pythons = PYTHONS[role]
    vcs = [r for r in top if " @ " in r or r.startswith("git+")]
    plain = [r for r in top if r not in vcs]
    source_only = [r for r in plain if "==" in r and not has_any_wheel(r, pythons[0])]
    wheel_reqs = [r for r in plain if r not in source_only]
    for r in source_only:
        wheel_reqs += sdist_requires(r)
    source_names = [name_of(r) for r in source_only]
    pins = {} if upgrade else {k: v for k, v in read_pins(out).items() if k not in source_names}
    keep = ["%s==%s" % kv for kv in sorted(pins.items())]
    # The first target fixes the versions; the others must take the same ones (a package only one
    # platform needs, such as torch's CUDA wheels on x86_64, is added at what resolves there).
    verdict = {}
    for python in pythons:
        for arch in PLATFORMS:
            got, err = resolve(wheel_reqs, python, arch, keep)
            if got is None:
                verdict["%s/%s" % (python, arch)] = missing_package(err, keep or wheel_reqs, python, arch)
                print("no wheels for %s/%s: %s" % (python, arch, verdict["%s/%s" % (python, arch)]))
                continue
            for name, version in got.items():
                pins.setdefault(name, version)
            keep = ["%s==%s" % kv for kv in sorted(pins.items())]
            verdict["%s/%s" % (python, arch)] = None
            print("wheels for %s/%s: %d packages" % (python, arch, len(got)))
    for r in source_only:
        pins[name_of(r)] = r.split("==", 1)[1]
    ok = [t for t, why in verdict.items() if why is None]
    bad = ["%s=%s" % (t, why) for t, why in verdict.items() if why is not None]
    lines = [
        "# pip constraints for %s at %s," % ("jfreed-dev/exo-rkllama" if role == "exo" else "jfreed-dev/rkllama", commit),
        "# generated by tools/constraints.py from the fork's %s; do not edit (re-run the script)." % source,
        "# The full dependency closure, resolved with wheels only for",
        "# CPython %s on linux aarch64 (real boards) and x86_64 (the lab), glibc 2.%d (Debian 12) or newer."
        % (", ".join(pythons), GLIBC_MINOR),
    ]
    lines += NOTES.get(role, [])
    if source_only:
        lines.append("# Source-only: %s have no wheel on PyPI at all; they are pure Python (no compiler), so"
                     % ", ".join(source_only))
        lines.append("# the role lets pip build just these (--no-binary) and everything else stays --only-binary.")
    if vcs:
        lines.append("# VCS, built from git by pip and not resolvable here (GitHub is unreachable), so the wheel")
        lines.append("# test leaves it out and its own dependencies are not in this file:")
        lines += ["#   " + r for r in vcs]
    lines += [
        HEADER + "wheels: " + " ".join(ok),
        HEADER + "no-wheel: " + " ".join(bad),
        HEADER + "source-only: " + " ".join(name_of(r) for r in source_only),
        HEADER + "vcs: " + " ".join(name_of(r) for r in vcs),
        # What the wheel test resolves against these pins: the fork's own requirements (the
        # source-only ones replaced by their dependencies), written without spaces.
        HEADER + "requires: " + " ".join(r.replace(" ", "") for r in wheel_reqs),
    ]
    lines += ["%s==%s" % kv for kv in sorted(pins.items())]
    with open(out, "w") as f:
        f.write("\n".join(line.rstrip() for line in lines) + "\n")
    print("wrote", os.path.relpath(out, ROOT))


def check(paths, only_python=None, only_platform=None):
    failures = 0
    _seen = {}
    for path in paths:
        header = read_header(path)
        pins = read_pins(path)
        wheel_pins = ["%s==%s" % kv for kv in sorted(pins.items()) if kv[0] not in header["source-only"]]
        requires = header["requires"]
        expect = {t: None for t in header["wheels"]}
        expect.update(dict(t.split("=", 1) for t in header["no-wheel"]))
        if only_python or only_platform:
            wanted = ["%s/%s" % (p, a) for p in (only_python or sorted({t.split("/")[0] for t in expect}))
                      for a in (only_platform or PLATFORMS)]
            # Asked for explicitly: check as a role selecting that Python would need it (wheels for all).
            expect = {t: None for t in wanted}
        if not expect:
            print("FAIL %s: no '# rkllm.fleet wheels:' header" % path)
            failures += 1
        for target, why in sorted(expect.items()):
            python, arch = target.split("/")
            key = (tuple(requires), tuple(wheel_pins), target)
            if key not in _seen:  # the rkllama commits share one dependency set
                _seen[key] = resolve(requires, python, arch, wheel_pins)
            got, err = _seen[key]
            rel = os.path.relpath(path, ROOT)
            if not requires:
                print("FAIL %s: no '# rkllm.fleet requires:' header (re-run generate)" % rel)
                failures += 1
                continue
            if why is None and got is None:
                print("FAIL %s %s (cpython %s, linux %s): no wheel: %s"
                      % (rel, target, python, arch, missing_package(err, wheel_pins, python, arch)))
                failures += 1
            elif why is None:
                extra = sorted(set(got) - set(pins))
                if extra:
                    print("FAIL %s %s: pulls unpinned %s" % (rel, target, ", ".join(extra)))
                    failures += 1
                else:
                    print("ok   %s %s: %d wheels" % (rel, target, len(got)))
            elif got is not None:
                print("FAIL %s %s: header says no wheel (%s) but it resolves: update the header" % (rel, target, why))
                failures += 1
            elif missing_package(err, wheel_pins, python, arch, why).lower() != why.lower():
                print("FAIL %s %s: header names %s, pip names %s"
                      % (rel, target, why, missing_package(err, wheel_pins, python, arch)))
                failures += 1
            else:
                print("ok   %s %s: no wheel, as the header says (%s)" % (rel, target, why))
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("role", choices=sorted(MIRRORS))
    gen.add_argument("--commit")
    gen.add_argument("--upgrade", action="store_true", help="re-resolve every pin instead of keeping them")
    chk = sub.add_parser("check")
    chk.add_argument("paths", nargs="*")
    chk.add_argument("--python", action="append",
                     help="check that this version resolves to wheels, whatever the header says")
    chk.add_argument("--platform", action="append", choices=PLATFORMS)
    args = parser.parse_args()
    if args.cmd == "generate":
        generate(args.role, args.commit or DEFAULT_COMMITS[args.role], args.upgrade)
        return 0
    paths = args.paths or sorted(
        os.path.join(ROOT, "roles", role, "files", "constraints", f)
        for role in MIRRORS for f in os.listdir(os.path.join(ROOT, "roles", role, "files", "constraints"))
        if f.endswith(".txt"))
    failures = check(paths, args.python, args.platform)
    print("%d failed" % failures if failures else "every constraints file resolves as its header says")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
