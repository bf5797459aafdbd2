#!/usr/bin/env python3
"""Run `ansible-test sanity` on this collection as users get it, offline-safe.

The tarball is built from this tree and installed (.ci/tarball_test.py's build_and_install)
under .cache/sanity/collections/ansible_collections/rkllm/fleet, and sanity runs there: on
exactly what ships (tests/unit and tests/sanity included), nothing lab-only.
ansible-test bootstraps pip in each of its venvs from a script it downloads from a host this
machine cannot reach; this puts an
equivalent script in its cache first (CI-MACHINE.md, item 10): it makes the venv's pip
trust the system CA bundle, runs ensurepip in a subprocess, then installs what ansible-test
asked for.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, ".cache", "sanity")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tarball_test import build_and_install  # noqa: E402  pylint: disable=wrong-import-position

BOOTSTRAP = r'''"""Offline stand-in for ansible-test's get-pip bootstrap (written by .ci/sanity.py)."""
import os
import subprocess
import sys

with open(os.path.join(sys.prefix, "pip.conf"), "w") as conf:
    conf.write("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"])
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install"] + args)
'''


def pip_version():
    """The pip version ansible-test pins (it names the cached bootstrap script after it)."""
    import ansible_test  # pylint: disable=import-outside-toplevel

    path = os.path.join(os.path.dirname(ansible_test.__file__), "_internal", "python_requirements.py")
    with open(path, encoding="utf-8") as f:
        match = re.search(r"pip='([0-9.]+)'", f.read())
    return match.group(1) if match else "24.2"


def place_bootstrap():
    cache = os.path.expanduser(f"~/.ansible/test/cache/get_pip_{pip_version().replace('.', '_')}.py")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "w", encoding="utf-8") as f:
        f.write(BOOTSTRAP)


def install_collection(work=WORK):
    """Build and install the tarball under WORK; return the installed collection's directory."""
    if os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work)
    _, dest = build_and_install(work)
    # The copy lives inside this checkout's (ignored) .cache, so ansible-test would ask the outer
    # git repository for its file list and find nothing: give the copy a repository of its own.
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    return dest


def ensure_shellcheck():
    """ansible-test skips its shellcheck test without the tool: install it where we can."""
    if shutil.which("shellcheck") or not shutil.which("apt-get") or os.geteuid() != 0:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", "shellcheck"], env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    ensure_shellcheck()
    place_bootstrap()
    print("==> ansible-test sanity: build and install the tarball", flush=True)
    dest = install_collection()
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    print(f"==> ansible-test sanity (Python {py}) in {os.path.relpath(dest, ROOT)}", flush=True)
    env = dict(os.environ)
    env.setdefault("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    cmd = [os.path.join(os.path.dirname(sys.executable), "ansible-test"), "sanity", "--color", "no",
           "--python", py, "--requirements"] + sys.argv[1:]
    sys.exit(subprocess.call(cmd, cwd=dest, env=env))


if __name__ == "__main__":
    main()
