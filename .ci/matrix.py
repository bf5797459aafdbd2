#!/usr/bin/env python3
"""`make matrix`: sanity and unit tests on every ansible-core version meta/runtime.yml admits.

requires_ansible in meta/runtime.yml decides the versions (.ci/tarball_test.py's
tested_ansible_versions); each must have an entry in VERSIONS below, or this fails: the
range is never widened ahead of the tests. For each version, on the collection tarball built
from this tree and installed (as .ci/sanity.py and .ci/tarball_test.py do):

  - `ansible-test sanity --requirements` (the version's own tests and ignore file),
  - the installed copy's unit tests (tests/unit, less .ci/tarball_test.py's CHECKOUT_ONLY),
  - as a user with that ansible-core alone: `ansible-playbook rkllm.fleet.<playbook>
    --syntax-check` for every playbook, a user's playbook importing ours, and a run of
    playbooks/tasks/board_target.yml (.ci/tarball_test.py's as_a_user).

A version that runs on this machine's Python (3.11) gets a venv in .cache/matrix/<version>;
one that needs a newer Python runs in a container from the lab's debootstrap image
rkllm-lab/base:trixie (Debian 13, Python 3.13; no registry needed), with ansible-test's
venvs kept in the Docker volume rkllm-fleet-matrix between runs. Containers run alongside
the versions on this machine; the output of each version is printed when it ends.

By default the version of .venv is left out: `make sanity` and `make tarball-test` run exactly
that on it. `--all` includes it; `--only 2.20` runs one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=wrong-import-position
from tarball_test import as_a_user, tested_ansible_versions, unit_tests  # noqa: E402
import sanity  # noqa: E402

# ansible-core minor version -> (the release tested, where). "host": a venv on this machine's
# Python; "trixie": Debian 13's Python 3.13 in a container (2.20 needs Python >= 3.12).
VERSIONS = {
    # Not admitted: sanity and the playbooks' syntax checks pass on 2.18, the unit tests don't.
    # Two test files import ansible.module_utils.testing.patch_module_args (2.19 added it), and
    # with a stand-in for it six tests still fail: the roles' preflight relies on 2.19's
    # templating (rkllama's `_tps is number` gets a string on 2.18; gateway_nginx's key checks).
    "2.18": ("2.18.19", "host"),
    "2.19": ("2.19.14", "host"),
    "2.20": ("2.20.10", "trixie"),
}
# What the unit tests and the playbooks import besides ansible-core (requirements.txt's pins).
TEST_REQUIREMENTS = ["pytest==9.2.0", "jinja2==3.1.6", "pyyaml==6.0.4", "requests==2.34.2",
                     # the fork's Modelfile reader, which tests/unit/roles/test_rkllama_modelfile.py runs
                     "python-dotenv==1.2.4"]
BASE_IMAGE = "rkllm-lab/base:trixie"
CACHE_VOLUME = "rkllm-fleet-matrix"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def say(msg):
    print(f"==> {msg}", flush=True)


def check(cmd, **kwargs):
    print("    $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def venv_version():
    """The ansible-core minor version of the venv running this script."""
    from ansible.release import __version__  # pylint: disable=import-outside-toplevel

    return ".".join(__version__.split(".")[:2])


# ---------------------------------------------------------------- one version, where it runs

def here(work):
    """Sanity, unit tests and the user's playbooks with the ansible-core of this Python."""
    from ansible.release import __version__  # pylint: disable=import-outside-toplevel

    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    say(f"ansible-core {__version__} on Python {py}: build and install the tarball in {work}")
    sanity.ensure_shellcheck()
    sanity.place_bootstrap()
    installed = sanity.install_collection(work)
    failed = []
    say(f"ansible-core {__version__}: ansible-test sanity")
    env = dict(os.environ)
    env.setdefault("PIP_CERT", CA_BUNDLE)
    if subprocess.call([os.path.join(os.path.dirname(sys.executable), "ansible-test"), "sanity", "--color", "no",
                        "--python", py, "--requirements"], cwd=installed, env=env):
        failed.append("ansible-test sanity")
    for what, step in (("unit tests of the installed collection", unit_tests),
                       ("the playbooks as a user runs them", as_a_user)):
        say(f"ansible-core {__version__}: {what}")
        try:
            step(work, installed)
        except SystemExit as e:
            print(e, flush=True)
            failed.append(what)
    if failed:
        sys.exit(f"==> ansible-core {__version__} on Python {py}: FAILED: {', '.join(failed)}")
    say(f"ansible-core {__version__}: passed")


# ---------------------------------------------------------------- driving each version

def host_venv(minor, release):
    """.cache/matrix/<minor>/venv with ansible-core==release and the test requirements."""
    venv = os.path.join(ROOT, ".cache", "matrix", minor, "venv")
    stamp = os.path.join(venv, ".stamp-" + hashlib.sha256(" ".join([release] + TEST_REQUIREMENTS).encode()).hexdigest()[:8])
    if not os.path.exists(stamp):
        if os.path.isdir(venv):
            shutil.rmtree(venv)
        say(f"ansible-core {release}: creating {os.path.relpath(venv, ROOT)}")
        check([sys.executable, "-m", "venv", venv])
        check([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"])
        check([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", f"ansible-core=={release}"]
              + TEST_REQUIREMENTS)
        with open(stamp, "w", encoding="utf-8"):
            pass
    return os.path.join(venv, "bin", "python")


def host_command(minor, release):
    python = sys.executable if venv_version() == minor else host_venv(minor, release)
    # Outside the checkout: pytest would otherwise take the checkout's pytest.ini (and its
    # rootdir) for the installed copy's tests.
    work = os.path.join(tempfile.gettempdir(), f"rkllm-fleet-matrix-{minor}")
    return [python, os.path.abspath(__file__), "--here", work]


def ensure_docker():
    """CI starts with no dockerd: the lab's helper starts one (CI-MACHINE.md, item 1)."""
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        check([sys.executable, os.path.join(ROOT, "lab", "lab.py"), "docker"])


def container_image(release):
    """rkllm-fleet/matrix:<release>: the lab's Debian 13 base, python3-venv, git, shellcheck, ansible-core."""
    dockerfile = f"""FROM {BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive PIP_CERT={CA_BUNDLE} PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv git shellcheck \\
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/ansible && /opt/ansible/bin/pip install -q ansible-core=={release} {' '.join(TEST_REQUIREMENTS)}
"""
    # tagged by what it holds, so a changed requirement builds a new image
    image = f"rkllm-fleet/matrix:{release}-{hashlib.sha256(dockerfile.encode()).hexdigest()[:8]}"
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False).returncode == 0:
        return image
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, check=False).returncode != 0:
        say(f"{BASE_IMAGE} is missing: building the lab's images (lab/lab.py images)")
        check([sys.executable, os.path.join(ROOT, "lab", "lab.py"), "images", "--release", "trixie"])
    say(f"building {image} from {BASE_IMAGE}")
    check(["docker", "build", "-q", "-t", image, "-"], input=dockerfile.encode())
    return image


def container_command(minor, release):
    ensure_docker()
    image = container_image(release)
    name = f"rkllm-fleet-matrix-{minor.replace('.', '-')}-{os.getpid()}"
    return ["docker", "run", "--rm", "--name", name, "--entrypoint", "",
            "-e", "PYTHONDONTWRITEBYTECODE=1", "-e", f"PIP_CERT={CA_BUNDLE}",
            "-v", f"{ROOT}:/src:ro", "-v", f"{CACHE_VOLUME}:/root/.ansible/test",
            image, "/opt/ansible/bin/python", "/src/.ci/matrix.py", "--here", "/tmp/matrix"]


def start(minor, env):
    release, where = VERSIONS[minor]
    cmd = host_command(minor, release) if where == "host" else container_command(minor, release)
    log = os.path.join(ROOT, ".cache", "matrix", f"{minor}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    say(f"ansible-core {release} ({'this machine' if where == 'host' else 'Debian 13 container'}): "
        f"{' '.join(cmd)} > {os.path.relpath(log, ROOT)}")
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env), time.monotonic(), log


def run_all(chosen):
    """The container versions run alongside the ones on this machine (sanity is CPU-bound, the
    unit tests mostly wait on their test servers); those on this machine one after another, as
    they share ansible-test's venvs in ~/.ansible/test. Each one's output goes to
    .cache/matrix/<version>.log and is printed when it ends."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("ANSIBLE_CONFIG", None)  # the installed copy is tested, not this checkout's settings
    results = {}

    def finish(minor, job):
        proc, began, log = job
        rc = proc.wait()
        results[minor] = (rc, time.monotonic() - began) + VERSIONS[minor]
        with open(log, encoding="utf-8") as f:
            print(f.read(), end="", flush=True)

    containers = {m: start(m, env) for m in chosen if VERSIONS[m][1] != "host"}
    for minor in (m for m in chosen if VERSIONS[m][1] == "host"):
        finish(minor, start(minor, env))
    for minor, job in containers.items():
        finish(minor, job)
    return {m: results[m] for m in chosen}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--here", metavar="WORK", help=argparse.SUPPRESS)
    parser.add_argument("--all", action="store_true", help="include the version of .venv")
    parser.add_argument("--only", action="append", metavar="X.Y", help="run this version only")
    args = parser.parse_args()
    if args.here:
        here(args.here)
        return

    admitted = tested_ansible_versions()
    unknown = [v for v in admitted if v not in VERSIONS]
    if unknown:
        sys.exit(f"matrix: meta/runtime.yml admits ansible-core {', '.join(unknown)}, which .ci/matrix.py does "
                 "not test: add it to VERSIONS (and pass it) or narrow requires_ansible")
    chosen = args.only or [v for v in admitted if args.all or v != venv_version()]
    missing = [v for v in chosen if v not in VERSIONS]
    if missing:
        sys.exit(f"matrix: no entry for ansible-core {', '.join(missing)} in VERSIONS (.ci/matrix.py)")
    for v in chosen:
        if v not in admitted:
            print(f"    ansible-core {v} is outside requires_ansible (meta/runtime.yml): tried, not claimed")
    if not args.only and not args.all:
        print(f"    ansible-core {venv_version()} (.venv) is left out: make sanity and make tarball-test run it")
    results = run_all(chosen)
    say("matrix: " + "; ".join(f"ansible-core {r[2]} ({'host' if r[3] == 'host' else 'Debian 13 container'}): "
                               f"{'passed' if r[0] == 0 else 'FAILED'} in {r[1]:.0f} s" for r in results.values()))
    if any(r[0] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
