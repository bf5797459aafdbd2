#!/usr/bin/env python3
"""Run `ansible-test sanity` on this collection, offline-safe.

ansible-test needs the collection at .../ansible_collections/rkllm/fleet, so the shipped
content (what `ansible-galaxy collection build` would ship, plus tests/) is copied to
.cache/sanity/ansible_collections/rkllm/fleet. ansible-test bootstraps pip in each of its
venvs from a script it downloads from a host this machine cannot reach; this puts an
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
DEST = os.path.join(ROOT, ".cache", "sanity", "ansible_collections", "rkllm", "fleet")
SHIPPED = ["galaxy.yml", "meta", "plugins", "roles", "playbooks", "docs", "changelogs", "tests",
           "README.md", "inventories", "LICENSE"]
SKIP_DIRS = {"__pycache__", ".pytest_cache", "lab"}

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


def copy_collection():
    if os.path.isdir(DEST):
        shutil.rmtree(DEST)
    os.makedirs(DEST)
    for name in SHIPPED:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(DEST, name), ignore=lambda d, names: [n for n in names if n in SKIP_DIRS])
        elif os.path.isfile(src):
            shutil.copy(src, os.path.join(DEST, name))
    # tests/lab exercises the lab stand-ins (not shipped); keep sanity to the collection's code.
    shutil.rmtree(os.path.join(DEST, "tests", "lab"), ignore_errors=True)
    # The copy lives inside this checkout's (ignored) .cache, so ansible-test would ask the outer
    # git repository for its file list and find nothing: give the copy a repository of its own.
    subprocess.run(["git", "init", "-q"], cwd=DEST, check=True)
    subprocess.run(["git", "add", "-A"], cwd=DEST, check=True)


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
    copy_collection()
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    print(f"==> ansible-test sanity (Python {py}) in {os.path.relpath(DEST, ROOT)}", flush=True)
    env = dict(os.environ)
    env.setdefault("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    cmd = [os.path.join(os.path.dirname(sys.executable), "ansible-test"), "sanity", "--color", "no",
           "--python", py, "--requirements"] + sys.argv[1:]
    sys.exit(subprocess.call(cmd, cwd=DEST, env=env))


if __name__ == "__main__":
    main()
