#!/usr/bin/env python3
"""The rkllm.fleet Docker lab: images, containers, status.

Lab only; never shipped (galaxy build_ignore). Usage:

  lab.py images [--release trixie|bookworm]   build (or reuse) the lab images (and those of the
                                               inventory boards' `lab_release`, e.g. bookworm)
  lab.py up [--inventory FILE]                 start the fleet the lab inventory lists
  lab.py status                                print the endpoints and one line per board
  lab.py down                                  remove every container, network, image and file the lab made,
                                               and those of the Molecule scenarios, make matrix and make ee

The fleet is read from the lab inventory (inventories/lab/hosts.yml): every host of the
groups `boards`, `gateway` and `lab_upstream` becomes a container of the same name, and a
board's `lab_board_kind` selects the simulated hardware that lab/boards.py writes under
/lab/sysroot inside it. Container options are the ones CI-MACHINE.md verified for systemd
in Docker without --privileged.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

LAB = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(LAB)
STATE = os.path.join(LAB, ".state")
PREFIX = "rkllm-lab-"
NETWORK = "rkllm-lab"
IMAGE_REPO = "rkllm-lab"
# The Molecule scenarios run the same images as a fleet of their own (molecule/*/molecule.yml), so
# `make test` leaves a running lab alone: containers rkllm-mol-<host>, network rkllm-mol.
MOLECULE_PREFIX = "rkllm-mol-"
MOLECULE_NETWORK = "rkllm-mol"
# What `make matrix` and `make ee` (.ci/matrix.py, .ci/ee.py) build from the lab's base image:
# images rkllm-fleet/{matrix,ee,ee-base}, the matrix's venv volume, its (--rm) containers.
CI_PREFIX = "rkllm-fleet-"
CI_IMAGE_REPO = "rkllm-fleet"
CI_VOLUMES = ("rkllm-fleet-matrix",)
LABEL = "rkllm.lab.recipe"
DEFAULT_RELEASE = "trixie"
DEBIAN_MIRROR = os.environ.get("LAB_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ["systemd", "systemd-sysv", "python3", "dbus", "ca-certificates"]
HOST_CA_GLOB = "/usr/local/share/ca-certificates/*.crt"
SYSROOT = "/lab/sysroot"

# Options that let systemd run as PID 1 without --privileged (CI-MACHINE.md, item 3).
SYSTEMD_OPTS = [
    "--cap-add", "SYS_ADMIN",
    "--security-opt", "seccomp=unconfined",
    "--security-opt", "apparmor=unconfined",
    "--cgroupns=host",
    "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--tmpfs", "/run", "--tmpfs", "/run/lock",
]
# Boards also get a firewall (nftables needs NET_ADMIN) and an NPU device node.
BOARD_OPTS = ["--cap-add", "NET_ADMIN", "--device", "/dev/null:/dev/dri/renderD129"]


def say(msg):
    print(f"==> {msg}", flush=True)


def run(cmd, check=True, capture=False, **kw):
    res = subprocess.run(cmd, check=False, text=True,
                         stdout=subprocess.PIPE if capture else None,
                         stderr=subprocess.PIPE if capture else None, **kw)
    if check and res.returncode != 0:
        detail = (res.stderr or "").strip() if capture else ""
        sys.exit(f"lab: command failed ({res.returncode}): {' '.join(cmd)}\n{detail}")
    return res


def docker(*args, check=True, capture=True):
    return run(["docker", *args], check=check, capture=capture)


# --------------------------------------------------------------------------- docker engine
def docker_answers():
    if not shutil.which("docker"):
        return False
    return run(["docker", "info"], check=False, capture=True).returncode == 0


def ensure_docker():
    if docker_answers():
        return
    if not shutil.which("dockerd"):
        if os.geteuid() != 0:
            sys.exit("lab: no Docker engine answers and installing one needs root: run as root, or start Docker first.")
        say("Installing Debian's Docker engine (docker.io)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "docker.io"], env=env, capture=True)
    if os.path.isdir("/run/systemd/system"):
        say("Starting the Docker engine with systemctl")
        run(["systemctl", "start", "docker"], check=False, capture=True)
    if not docker_answers():
        say("Starting dockerd in the background (no service manager runs it); log: /var/log/rkllm-lab-dockerd.log")
        with open("/var/log/rkllm-lab-dockerd.log", "ab") as log:
            subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)  # pylint: disable=consider-using-with
    for _ in range(60):
        if docker_answers():
            return
        time.sleep(1)
    sys.exit("lab: dockerd did not answer within 60 s; see /var/log/rkllm-lab-dockerd.log")


# --------------------------------------------------------------------------- images
def digest(parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def files_digest(paths):
    parts = []
    for path in sorted(paths):
        parts.append(os.path.relpath(path, ROOT))
        with open(path, "rb") as f:
            parts.append(f.read())
    return digest(parts)


def tree_files(top):
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d not in ("__pycache__", ".state")]
        out.extend(os.path.join(dirpath, f) for f in filenames if not f.endswith(".pyc"))
    return out


def image_recipe(image):
    res = docker("image", "inspect", "--format", "{{ index .Config.Labels \"%s\" }}" % LABEL, image, check=False)
    return res.stdout.strip() if res.returncode == 0 else None


def host_cas():
    return sorted(glob.glob(HOST_CA_GLOB))


def unmount_below(path):
    """Unmount whatever debootstrap or chroot left mounted inside a rootfs (deepest first)."""
    real = os.path.realpath(path)
    with open("/proc/mounts", encoding="utf-8") as f:
        points = [line.split()[1] for line in f]
    for point in sorted((p for p in points if p.startswith(real + "/")), key=len, reverse=True):
        run(["umount", "-l", point], check=False, capture=True)


def build_base(release):
    image = f"{IMAGE_REPO}/base:{release}"
    recipe = digest([release, DEBIAN_MIRROR, *BASE_PACKAGES, files_digest(host_cas()) if host_cas() else "no-ca"])
    if image_recipe(image) == recipe:
        say(f"Reusing {image} (recipe unchanged)")
        return
    if not shutil.which("debootstrap"):
        say("Installing debootstrap")
        run(["apt-get", "update", "-qq"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        run(["apt-get", "install", "-y", "-qq", "debootstrap"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), capture=True)
    say(f"Building {image} from Debian's mirror with debootstrap (about a minute)")
    os.makedirs(STATE, exist_ok=True)
    rootfs = tempfile.mkdtemp(prefix=f"rootfs-{release}-", dir=STATE)
    try:
        run(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES), release, rootfs, DEBIAN_MIRROR],
            capture=True)
        # Trust the host's extra CAs: outbound TLS here is re-signed by a local CA (CI-MACHINE.md item 4).
        for ca in host_cas():
            shutil.copy(ca, os.path.join(rootfs, "usr/local/share/ca-certificates", os.path.basename(ca)))
        run(["chroot", rootfs, "update-ca-certificates"], capture=True)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(os.path.join(rootfs, junk), ignore_errors=True)
            os.makedirs(os.path.join(rootfs, junk), exist_ok=True)
        unmount_below(rootfs)
        # --one-file-system: never pack a host filesystem that is still mounted inside the rootfs.
        tar = subprocess.Popen(["tar", "--one-file-system", "-C", rootfs, "-c", "."],  # pylint: disable=consider-using-with
                               stdout=subprocess.PIPE)
        run(["docker", "import", "-c", 'CMD ["/lib/systemd/systemd"]', "-c", f"LABEL {LABEL}={recipe}", "-", image],
            stdin=tar.stdout, capture=True)
        if tar.wait() != 0:
            docker("rmi", "-f", image, check=False)
            sys.exit(f"lab: packing the {release} rootfs failed; nothing was kept")
    finally:
        unmount_below(rootfs)
        shutil.rmtree(rootfs, ignore_errors=True)


# The lab's CPython build (lab/images/python) is served where python-build-standalone's releases
# are, under a release named "lab"; lab.py writes its identity for the lab inventory's exo_python_builds.
PYTHON_BUILD_RELEASE = "bookworm"
PYTHON_BUILD_URL = "https://github.com/indygreg/python-build-standalone/releases/download/lab/"
PYTHON_BUILD_STATE = os.path.join(STATE, "python-build.json")
# Set by images()/up() when a board of the inventory runs a release whose Python exo can't use.
_WANT_PYTHON_BUILD = {"wanted": False}


def build_python(out):
    """Build (or reuse) the lab CPython image, put its tarball into the upstream tree, record its identity."""
    build_base(PYTHON_BUILD_RELEASE)
    build_image("python", PYTHON_BUILD_RELEASE)
    image = f"{IMAGE_REPO}/python:{PYTHON_BUILD_RELEASE}"
    name = docker("create", image, "true").stdout.strip()
    try:
        listing = docker("run", "--rm", image, "ls", "/out").stdout.split()
        tarball = [f for f in listing if f.endswith("-install_only.tar.gz")][0]
        dest_dir = os.path.join(out, "github.com", *PYTHON_BUILD_URL.split("/")[3:-1])
        os.makedirs(dest_dir, exist_ok=True)
        docker("cp", f"{name}:/out/{tarball}", os.path.join(dest_dir, tarball))
    finally:
        docker("rm", "-f", name, check=False)
    with open(os.path.join(dest_dir, tarball), "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    version = tarball.split("-")[1].split("+")[0]
    arch = tarball.split("+lab-")[1].split("-")[0]
    with open(PYTHON_BUILD_STATE, "w", encoding="utf-8") as f:
        json.dump({arch: {"version": version, "url": PYTHON_BUILD_URL + tarball.replace("+", "%2B"), "sha256": sha256}},
                  f, indent=2)
    say(f"Lab CPython build {version} ({arch}) served at {PYTHON_BUILD_URL}{tarball}")


def build_upstream_content():
    """Build the lab upstream's content tree (deterministic) for the upstream image."""
    out = os.path.join(STATE, "upstream-root")
    builder = os.path.join(LAB, "upstream", "build.py")
    say("Building the lab upstream's content (runtime builds, stand-in git repos, models, tokenizers)")
    run([sys.executable, builder, "--out", out], capture=True)
    if _WANT_PYTHON_BUILD["wanted"]:
        build_python(out)
    elif os.path.exists(PYTHON_BUILD_STATE):
        os.remove(PYTHON_BUILD_STATE)
    return out


def build_image(kind, release):
    image = f"{IMAGE_REPO}/{kind}:{release}"
    recipe_dir = os.path.join(LAB, "images", kind)
    context_files = tree_files(recipe_dir)
    extra = {}
    if kind == "board":
        extra["boards.py"] = os.path.join(LAB, "boards.py")
    if kind == "upstream":
        content = build_upstream_content()
        extra["server.py"] = os.path.join(LAB, "upstream", "server.py")
        extra["rkllm-lab-upstream.service"] = os.path.join(LAB, "upstream", "rkllm-lab-upstream.service")
        context_files += tree_files(content)
        extra["root"] = content
    recipe = digest([release, image_recipe(f"{IMAGE_REPO}/base:{release}"),
                     files_digest([p for p in context_files]),
                     files_digest([p for k, p in extra.items() if k != "root"])])
    if image_recipe(image) == recipe:
        say(f"Reusing {image} (recipe unchanged)")
        return
    say(f"Building {image}")
    ctx = tempfile.mkdtemp(prefix=f"ctx-{kind}-", dir=STATE)
    try:
        shutil.copytree(recipe_dir, ctx, dirs_exist_ok=True)
        for name, path in extra.items():
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(ctx, name), symlinks=True)
            else:
                shutil.copy(path, os.path.join(ctx, name))
        run(["docker", "build", "-q", "--build-arg", f"RELEASE={release}", "--label", f"{LABEL}={recipe}",
             "-t", image, ctx], capture=True)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def board_releases(inventory):
    """Releases of the inventory's boards other than the default (a board's `lab_release`)."""
    if not inventory or not os.path.exists(inventory):
        return set()
    return {m["vars"]["lab_release"] for m in load_inventory(inventory)
            if m["image_kind"] == "board" and m["vars"].get("lab_release")}


def images(release=DEFAULT_RELEASE, kinds=("board", "gateway", "upstream"), inventory=None):
    ensure_docker()
    os.makedirs(STATE, exist_ok=True)
    others = board_releases(inventory) - {release}
    # Debian 12's Python is 3.11: exo needs a Python build from the (lab) upstream there.
    _WANT_PYTHON_BUILD["wanted"] = "bookworm" in others | {release}
    build_base(release)
    for kind in kinds:
        build_image(kind, release)
    for other in sorted(others):
        build_base(other)
        build_image("board", other)


# --------------------------------------------------------------------------- fleet
def load_inventory(path):
    import yaml  # pylint: disable=import-outside-toplevel  (only the venv has it; `down` must work without)

    with open(path, encoding="utf-8") as f:
        inv = yaml.safe_load(f)
    fleet = []
    children = inv["all"]["children"]
    for group, kind in (("boards", "board"), ("gateway", "gateway"), ("lab_upstream", "upstream")):
        for host, hvars in ((children.get(group) or {}).get("hosts") or {}).items():
            fleet.append({"name": host, "image_kind": kind, "vars": hvars or {}})
    return fleet


def published_ports(member):
    ports = []
    if member["image_kind"] == "gateway":
        ports += ["-p", f"127.0.0.1:{os.environ.get('LAB_GATEWAY_PORT', '18080')}:80",
                  "-p", f"127.0.0.1:{os.environ.get('LAB_PROMETHEUS_PORT', '19090')}:9092"]
    if member["image_kind"] == "upstream":
        ports += ["-p", f"127.0.0.1:{os.environ.get('LAB_UPSTREAM_PORT', '18000')}:8000"]
    return ports


def container_state(name):
    res = docker("inspect", "--format", '{{.State.Running}} {{.Image}} {{index .Config.Labels "rkllm.lab.ports"}}', name, check=False)
    if res.returncode != 0:
        return None
    running, image, ports = (res.stdout.strip().split(" ", 2) + [""])[:3]
    return {"running": running == "true", "image": image, "ports": ports}


def image_id(image):
    return docker("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()


def start(member, release):
    name = member["name"]
    image = f"{IMAGE_REPO}/{member['image_kind']}:{member['vars'].get('lab_release', release)}"
    wanted_ports = published_ports(member)
    ports_label = ",".join(wanted_ports[1::2])
    state = container_state(name)
    if state and state["running"] and state["image"] == image_id(image) and state["ports"] == ports_label:
        say(f"{name}: already running on the current image")
        return False
    if state:
        docker("rm", "-f", name)
    say(f"{name}: starting ({image})")
    opts = list(SYSTEMD_OPTS)
    if member["image_kind"] == "board":
        opts += BOARD_OPTS
    docker("run", "-d", "--name", name, "--hostname", name, "--network", NETWORK,
           "--label", "rkllm.lab=1", "--label", f"rkllm.lab.ports={ports_label}", *opts, *wanted_ports, image, "/lib/systemd/systemd")
    return True


def wait_running(name):
    for _ in range(60):
        res = docker("exec", name, "systemctl", "is-system-running", check=False)
        if res.stdout.strip() in ("running", "degraded"):
            return
        time.sleep(1)
    sys.exit(f"lab: systemd in {name} did not come up; try: docker logs {name}")


def make_sysroot(member):
    kind = member["vars"].get("lab_board_kind")
    if not kind:
        return
    docker("exec", member["name"], "python3", "/usr/local/lib/rkllm-lab/boards.py", kind, SYSROOT, "--link-dev")


def up(inventory, release=DEFAULT_RELEASE):
    images(release, inventory=inventory)
    if docker("network", "inspect", NETWORK, check=False).returncode != 0:
        say(f"Creating the Docker network {NETWORK}")
        docker("network", "create", "--label", "rkllm.lab=1", NETWORK)
    fleet = load_inventory(inventory)
    for member in fleet:
        start(member, release)
    for member in fleet:
        wait_running(member["name"])
        make_sysroot(member)
    say(f"Lab fleet up: {', '.join(m['name'] for m in fleet)}")


def down():
    """Remove what the lab, the Molecule scenarios, make matrix and make ee made (containers first)."""
    if not docker_answers():
        say("No Docker engine answers: nothing to remove")
    else:
        names = docker("ps", "-aq", "--filter", "label=rkllm.lab=1").stdout.split()
        for prefix in (PREFIX, MOLECULE_PREFIX, CI_PREFIX):
            names += docker("ps", "-aq", "--filter", f"name=^{prefix}").stdout.split()
        if names:
            say(f"Removing {len(set(names))} lab, Molecule and CI containers")
            docker("rm", "-f", *sorted(set(names)))
        for network in (NETWORK, MOLECULE_NETWORK):
            for net in docker("network", "ls", "-q", "--filter", f"name=^{network}$").stdout.split():
                say(f"Removing the Docker network {network}")
                docker("network", "rm", net, check=False)
        # The CI images first: they are built on the lab's base image, which can't go while they stay.
        listed = docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
        imgs = ([i for i in listed if i.startswith(f"{CI_IMAGE_REPO}/")]
                + [i for i in listed if i.startswith(f"{IMAGE_REPO}/")])
        if imgs:
            say(f"Removing lab and CI images: {' '.join(imgs)}")
            docker("rmi", "-f", *imgs, check=False)
        docker("image", "prune", "-f", "--filter", f"label={LABEL}", check=False)
        volumes = docker("volume", "ls", "-q").stdout.split()
        for volume in (v for v in CI_VOLUMES if v in volumes):
            say(f"Removing the Docker volume {volume}")
            docker("volume", "rm", "-f", volume, check=False)
    if os.path.isdir(STATE):
        say(f"Removing {os.path.relpath(STATE, ROOT)}")
        shutil.rmtree(STATE)
    for facts in glob.glob(os.path.join(ROOT, ".cache", "facts", f"*{PREFIX}*")):
        os.remove(facts)
    say("Lab removed")


def http_status(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # nosec: loopback only
            return resp.status
    except (OSError, ValueError):
        return None


def untag(value):
    """Drop ansible-core 2.19's serialised data tags ({"value": ..., "__ansible_type": ...})."""
    if isinstance(value, dict):
        if "__ansible_type" in value and "value" in value:
            return untag(value["value"])
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value


def cached_facts(host):
    """The facts ansible-playbook cached for host (ansible.cfg: jsonfile in .cache/facts)."""
    # ansible-core 2.19 prefixes cache files with its serialisation version (s1_<host>).
    for path in sorted(glob.glob(os.path.join(ROOT, ".cache", "facts", f"*{host}")), reverse=True):
        if os.path.basename(path) in (host, f"s1_{host}") or os.path.basename(path).endswith(f"_{host}"):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                payload = data.get("__payload__", data) if isinstance(data, dict) else {}
                return untag(json.loads(payload) if isinstance(payload, str) else payload)
            except (OSError, ValueError):
                continue
    return {}


def status(inventory):
    gw = os.environ.get("LAB_GATEWAY_PORT", "18080")
    prom = os.environ.get("LAB_PROMETHEUS_PORT", "19090")
    code = http_status(f"http://127.0.0.1:{gw}/healthz")
    print()
    print(f"Gateway (OpenAI-compatible): http://127.0.0.1:{gw}/v1/chat/completions   /healthz: {code or 'not answering'}")
    code = http_status(f"http://127.0.0.1:{prom}/-/healthy")
    print(f"Prometheus:                  http://127.0.0.1:{prom}/   /-/healthy: {code or 'not answering'}")
    print()
    for member in load_inventory(inventory):
        if member["image_kind"] != "board":
            continue
        facts = cached_facts(member["name"])
        npu = facts.get("ansible_rknpu") or facts.get("rknpu") or {}
        check = facts.get("rkllm_model_check") or {}
        res = docker("exec", member["name"], "python3", "-c",
                     "import urllib.request as u;print(u.urlopen('http://127.0.0.1:52415/healthcheck',timeout=5).status)",
                     check=False)
        exo = "exo up" if res.returncode == 0 and res.stdout.strip() == "200" else "exo DOWN"
        tps = check.get("tokens_per_second")
        print(f"{member['name']:<22} {str(npu.get('soc')):<8} platform={str(npu.get('platform')):<7} "
              f"driver={str(npu.get('driver_version')):<6} model={check.get('model', '-')} "
              f"tokens/s={tps if tps is not None else '-'}  {exo}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["images", "up", "status", "down", "docker"])
    parser.add_argument("--release", default=DEFAULT_RELEASE, help="Debian release of the lab images")
    parser.add_argument("--inventory", default=os.path.join(ROOT, "inventories", "lab", "hosts.yml"))
    args = parser.parse_args()
    if args.command == "docker":
        ensure_docker()
    elif args.command == "images":
        images(args.release, inventory=args.inventory)
    elif args.command == "up":
        up(args.inventory, args.release)
    elif args.command == "status":
        status(args.inventory)
    else:
        down()


if __name__ == "__main__":
    main()
