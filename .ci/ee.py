#!/usr/bin/env python3
"""`make ee`: the execution environment for AWX / Automation Platform, built and tried.

1. The base image rkllm-fleet/ee-base:trixie, from the lab's debootstrap image
   rkllm-lab/base:trixie (built first with lab/lab.py when missing): Debian 13 with Python
   3.13, pip and git. No registry is needed.
2. The collection tarball from this tree (ansible-galaxy collection build), copied to
   .cache/ee/rkllm-fleet.tar.gz, where execution-environment.yml takes it from.
3. `ansible-builder build` of execution-environment.yml (context .cache/ee/context) with
   Docker, tagged rkllm-fleet/ee:<collection version> and rkllm-fleet/ee:latest.
4. The image as AWX runs it (a non-root user): rkllm.fleet installed, ansible-runner
   and ssh present, and `ansible-playbook rkllm.fleet.<playbook> --syntax-check` for every
   playbook against the example inventory the collection ships.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
OUT = os.path.join(ROOT, ".cache", "ee")  # ignored by yamllint and ansible-lint, like every cache
LAB_BASE = "rkllm-lab/base:trixie"
EE_BASE = "rkllm-fleet/ee-base:trixie"
IMAGE = "rkllm-fleet/ee"
PLAYBOOKS = ["site", "upgrade", "verify", "benchmark"]
INSTALLED = "/usr/share/ansible/collections/ansible_collections/rkllm/fleet"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def say(msg):
    print(f"==> {msg}", flush=True)


def check(cmd, **kwargs):
    print("    $ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


def image_exists(image):
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False).returncode == 0


def ensure_docker():
    """CI starts with no dockerd: the lab's helper starts one (CI-MACHINE.md, item 1)."""
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        check([sys.executable, os.path.join(ROOT, "lab", "lab.py"), "docker"])


def base_image():
    if image_exists(EE_BASE):
        return
    if not image_exists(LAB_BASE):
        say(f"{LAB_BASE} is missing: building the lab's images (lab/lab.py images)")
        check([sys.executable, os.path.join(ROOT, "lab", "lab.py"), "images", "--release", "trixie"])
    say(f"building {EE_BASE} from {LAB_BASE}")
    # PIP_CERT: the system CA bundle (the lab's image trusts this machine's CA in it), so pip
    # works behind a TLS-inspecting proxy; the package lists stay for bindep's apt-get installs.
    dockerfile = f"""FROM {LAB_BASE}
ENV DEBIAN_FRONTEND=noninteractive PIP_CERT={CA_BUNDLE} PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-pip git
CMD ["bash"]
"""
    check(["docker", "build", "-q", "-t", EE_BASE, "-"], input=dockerfile.encode())


def tarball():
    with open(os.path.join(ROOT, "galaxy.yml"), encoding="utf-8") as f:
        version = str(yaml.safe_load(f)["version"])
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    say("building the collection tarball")
    check([os.path.join(BIN, "ansible-galaxy"), "collection", "build", "--force", "--output-path", OUT, ROOT],
          stdout=subprocess.DEVNULL)
    built = glob.glob(os.path.join(OUT, "rkllm-fleet-*.tar.gz"))[0]
    shutil.move(built, os.path.join(OUT, "rkllm-fleet.tar.gz"))
    return version


def build(version):
    say(f"ansible-builder build: {IMAGE}:{version}")
    check([os.path.join(BIN, "ansible-builder"), "build", "--file", os.path.join(ROOT, "execution-environment.yml"),
           "--context", os.path.join(OUT, "context"), "--container-runtime", "docker",
           "--tag", f"{IMAGE}:{version}", "--tag", f"{IMAGE}:latest", "-v", "2"], cwd=ROOT)


def try_image(version):
    image = f"{IMAGE}:{version}"
    say(f"{image} as AWX runs it (uid 1000, no home of its own)")
    script = "set -e; ansible --version | head -1; ansible-runner --version; ssh -V 2>&1; " \
             "ansible-galaxy collection list rkllm.fleet | tail -1; " \
             f"cp -r {INSTALLED}/inventories/example /tmp/inventory; cd /tmp; "
    script += "; ".join(f"ansible-playbook -i /tmp/inventory rkllm.fleet.{p} --syntax-check" for p in PLAYBOOKS)
    cmd = ["docker", "run", "--rm", "--user", "1000", "-e", "HOME=/runner", "-e", "ANSIBLE_NOCOLOR=1",
           image, "bash", "-c", script]
    print("    $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    print("    " + out.strip().replace("\n", "\n    "))
    if proc.returncode:
        sys.exit(f"ee: {image} failed the check (rc {proc.returncode}; 127 is a missing command)")
    if f"rkllm.fleet {version}" not in " ".join(out.split()):
        sys.exit(f"ee: rkllm.fleet {version} is not in {image}")
    say(f"{image}: passed")


def check_ansible_core():
    """The EE's ansible-core must be a version meta/runtime.yml admits (and make matrix tests)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tarball_test import tested_ansible_versions  # pylint: disable=import-outside-toplevel

    with open(os.path.join(ROOT, "execution-environment.yml"), encoding="utf-8") as f:
        pin = yaml.safe_load(f)["dependencies"]["ansible_core"]["package_pip"]
    minor = ".".join(pin.split("==")[-1].split(".")[:2])
    if "==" not in pin or minor not in tested_ansible_versions():
        sys.exit(f"ee: execution-environment.yml installs {pin}; pin an ansible-core==X.Y.Z whose X.Y "
                 f"meta/runtime.yml admits ({', '.join(tested_ansible_versions())})")


def main():
    check_ansible_core()
    ensure_docker()
    base_image()
    version = tarball()
    build(version)
    try_image(version)


if __name__ == "__main__":
    main()
