"""The Molecule scenarios leave a running `make lab` fleet alone, and `lab.py down` removes what they left.

`make test` used to destroy a running lab: the scenarios' containers had the lab's names, joined
its network and published its ports. Each scenario now runs the same images as a fleet of its
own (containers rkllm-mol-*, network rkllm-mol, ports 28080/29090/28000), while its inventory keeps
the lab's host names: ansible_host names the scenario's container, and on the scenario's network
each container also answers to its host name, so the lab's URLs (rkllm-lab-upstream,
rkllm-lab-gateway) reach the scenario's own upstream and gateway.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import types

import pytest
import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LAB_PY = os.path.join(REPO, "lab", "lab.py")
SCENARIOS = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(REPO, "molecule", "*", "molecule.yml")))
GROUPS = ("boards", "gateway", "lab_upstream")

_spec = importlib.util.spec_from_file_location("rkllm_lab_lab", LAB_PY)
lab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lab)
# What lab.py calls the scenarios' containers and network (`lab.py down` removes them).
MOL_PREFIX = getattr(lab, "MOLECULE_PREFIX", "rkllm-mol-")
MOL_NETWORK = getattr(lab, "MOLECULE_NETWORK", "rkllm-mol")


def interpolate(text, env):
    """Molecule's ${VAR} and ${VAR:-default} interpolation of molecule.yml."""
    def one(match):
        value = env.get(match.group(1))
        return value if value else (match.group(3) or "")
    return re.sub(r"\$\{(\w+)(:?-([^}]*))?\}", one, text)


def load_scenario(name, **env):
    path = os.path.join(REPO, "molecule", name, "molecule.yml")
    env = dict({"MOLECULE_PROJECT_DIRECTORY": REPO,
                "MOLECULE_EPHEMERAL_DIRECTORY": f"/tmp/molecule-ephemeral/{name}"}, **env)
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(interpolate(f.read(), env))


def host_ports(platform):
    """The host ports a platform publishes ("127.0.0.1:28080:80" -> "28080")."""
    return [p.split(":")[-2] for p in platform.get("published_ports") or []]


def linked(name, key):
    links = load_scenario(name)["provisioner"]["inventory"]["links"]
    assert key in links, f"molecule/{name}/molecule.yml links no {key}"
    return os.path.normpath(os.path.join(REPO, "molecule", name, links[key]))


def inventory_hosts(name):
    with open(linked(name, "hosts"), encoding="utf-8") as f:
        children = yaml.safe_load(f)["all"]["children"]
    return sorted(h for g in GROUPS for h in ((children.get(g) or {}).get("hosts") or {}))


def ansible_host(name, host):
    path = os.path.join(linked(name, "host_vars"), f"{host}.yml")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return (yaml.safe_load(f) or {}).get("ansible_host")


def aliases(platform):
    """The names a platform's container answers to on each of its networks."""
    return {n["name"]: set(n.get("aliases") or []) for n in platform.get("networks") or []}


def lab_ports():
    """The host ports `make lab` publishes (lab.py, with the Makefile's defaults)."""
    ports = lab.published_ports({"image_kind": "gateway"}) + lab.published_ports({"image_kind": "upstream"})
    return {p.split(":")[-2] for p in ports[1::2]}


def test_there_are_scenarios():
    assert {"default", "upgrade", "faults"} <= set(SCENARIOS)


@pytest.mark.parametrize("name", SCENARIOS)
def test_containers_and_network_are_not_the_labs(name):
    for platform in load_scenario(name)["platforms"]:
        assert not platform["name"].startswith(lab.PREFIX), f"{platform['name']} is a `make lab` container name"
        assert lab.NETWORK not in aliases(platform), f"{platform['name']} joins the `make lab` network {lab.NETWORK}"
        assert platform["name"].startswith(MOL_PREFIX), platform["name"]
        assert set(aliases(platform)) == {MOL_NETWORK}, f"{platform['name']} joins {set(aliases(platform))}"
        # A platform in a group would put its container name into the inventory next to the host
        # that stands for it (hosts.yml has the groups).
        assert platform.get("groups") == [], f"{platform['name']} has groups {platform.get('groups')}"


@pytest.mark.parametrize("lab_env", [{}, {"LAB_GATEWAY_PORT": "8080", "LAB_PROMETHEUS_PORT": "9090", "LAB_UPSTREAM_PORT": "8000"}])
@pytest.mark.parametrize("name", SCENARIOS)
def test_host_ports_are_not_the_labs(name, lab_env, monkeypatch):
    for var, value in lab_env.items():
        monkeypatch.setenv(var, value)
    taken = lab_ports()
    published = [port for p in load_scenario(name, **lab_env)["platforms"] for port in host_ports(p)]
    assert published, "the scenario publishes no ports"
    assert not set(published) & taken, f"molecule/{name} publishes {published}, and `make lab` {sorted(taken)}"
    assert len(published) == len(set(published))


@pytest.mark.parametrize("name", SCENARIOS)
def test_each_inventory_host_runs_in_its_own_scenario_container(name):
    platforms = {p["name"]: p for p in load_scenario(name)["platforms"]}
    hosts = inventory_hosts(name)
    containers = {h: ansible_host(name, h) for h in hosts}
    missing = [h for h, c in containers.items() if not c]
    assert not missing, f"no ansible_host for {missing}: Molecule would run them in the lab's containers"
    assert sorted(containers.values()) == sorted(platforms), f"hosts {containers} vs platforms {sorted(platforms)}"
    for host, container in containers.items():
        assert host in aliases(platforms[container]).get(MOL_NETWORK, set()), f"{container} does not answer to {host}"


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_labs_urls_reach_the_scenarios_own_upstream_and_gateway(name):
    with open(os.path.join(REPO, "inventories", "lab", "group_vars", "all", "lab_pins.yml"), encoding="utf-8") as f:
        upstream_url = yaml.safe_load(f)["lab_pins"]["upstream_url"]
    with open(os.path.join(REPO, "inventories", "lab", "group_vars", "all", "lab.yml"), encoding="utf-8") as f:
        mirror_url = yaml.safe_load(f)["rkllm_mirror_url"]
    names = set(re.findall(r"https?://([A-Za-z0-9.-]+)[:/]", f"{upstream_url} {mirror_url}"))
    assert {"rkllm-lab-upstream", "rkllm-lab-gateway"} <= names, names
    answered = set().union(*(aliases(p).get(MOL_NETWORK, set()) for p in load_scenario(name)["platforms"]))
    assert names <= answered, f"{sorted(names - answered)} would not resolve in molecule/{name}'s network"


@pytest.mark.parametrize("name", SCENARIOS)
def test_verify_tasks_reach_the_scenarios_ports_and_cache_facts_apart(name):
    scenario = load_scenario(name, MOL_GATEWAY_PORT="38080", MOL_PROMETHEUS_PORT="39090", MOL_UPSTREAM_PORT="38000")
    env = scenario["provisioner"]["env"]
    platforms = {p["name"]: p for p in scenario["platforms"]}
    gateway = [p for p in platforms.values() if len(host_ports(p)) == 2]
    upstream = [p for p in platforms.values() if len(host_ports(p)) == 1]
    assert [host_ports(p) for p in gateway + upstream] == [["38080", "39090"], ["38000"]], "MOL_*_PORT do not set the ports"
    assert (env["LAB_GATEWAY_PORT"], env["LAB_PROMETHEUS_PORT"], env["LAB_UPSTREAM_PORT"]) == ("38080", "39090", "38000")
    # The acceptance suite reads the checkout's ansible.cfg, whose fact cache (.cache/facts) holds the
    # lab's facts under the same host names: facts a scenario run cached there, `make lab` would read.
    assert env["ANSIBLE_CACHE_PLUGIN_CONNECTION"].startswith(f"/tmp/molecule-ephemeral/{name}")


def test_no_scenario_points_a_tool_at_the_labs_inventory_or_containers():
    offenders = []
    for path in glob.glob(os.path.join(REPO, "molecule", "**", "*.yml"), recursive=True):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.lstrip().startswith("#"):
                    continue
                if re.search(r"inventories/lab\b(?!/(hosts\.yml|group_vars))|docker[\"', ]+exec[\"', ]+rkllm-lab-", line):
                    offenders.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


class FakeDocker:
    """Answers lab.py's docker calls from a canned engine; records what it was asked to do."""

    def __init__(self):
        self.containers = {"c-lab": "rkllm-lab-rock5b", "c-mol": "rkllm-mol-rock5b", "c-mol-gw": "rkllm-mol-gateway",
                           "c-ci": "rkllm-fleet-matrix-2-20-4242", "c-other": "someone-elses"}
        self.networks = {"n-lab": "rkllm-lab", "n-mol": "rkllm-mol", "n-other": "bridge"}
        self.images = ["rkllm-lab/base:trixie", "rkllm-lab/board:trixie", "rkllm-fleet/ee:latest",
                       "rkllm-fleet/ee-base:trixie", "rkllm-fleet/matrix:2.20.10-19ad0d9b", "debian:13"]
        self.volumes = ["rkllm-fleet-matrix", "someone-elses-volume"]
        self.calls = []

    def __call__(self, *args, check=True, capture=True):
        self.calls.append(args)
        out = ""
        if args[:2] == ("ps", "-aq"):
            flt = args[3]
            if flt.startswith("name=^"):
                out = "\n".join(i for i, n in self.containers.items() if n.startswith(flt[len("name=^"):]))
        elif args[:3] == ("network", "ls", "-q"):
            want = args[4][len("name=^"):-1]
            out = "\n".join(i for i, n in self.networks.items() if n == want)
        elif args[0] == "images":
            out = "\n".join(self.images)
        elif args[:3] == ("volume", "ls", "-q"):
            out = "\n".join(self.volumes)
        return types.SimpleNamespace(returncode=0, stdout=out, stderr="")

    def asked(self, *prefix):
        return [c[len(prefix):] for c in self.calls if c[:len(prefix)] == prefix]


def test_down_removes_the_scenarios_and_ci_leftovers_and_nothing_else(monkeypatch, tmp_path):
    fake = FakeDocker()
    monkeypatch.setattr(lab, "docker", fake)
    monkeypatch.setattr(lab, "docker_answers", lambda: True)
    monkeypatch.setattr(lab, "STATE", str(tmp_path / "state"))
    monkeypatch.setattr(lab, "ROOT", str(tmp_path))
    lab.down()
    removed = {c for call in fake.asked("rm", "-f") for c in call}
    assert removed == {"c-lab", "c-mol", "c-mol-gw", "c-ci"}
    assert sorted(n for call in fake.asked("network", "rm") for n in call) == ["n-lab", "n-mol"]
    rmi = [i for call in fake.asked("rmi", "-f") for i in call]
    assert set(rmi) == set(fake.images) - {"debian:13"}
    # The CI images are built on the lab's base image, so they go first.
    assert max(rmi.index(i) for i in rmi if i.startswith("rkllm-fleet/")) < min(rmi.index(i) for i in rmi if i.startswith("rkllm-lab/"))
    assert fake.asked("volume", "rm") == [("-f", "rkllm-fleet-matrix")]
