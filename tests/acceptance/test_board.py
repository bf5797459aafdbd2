"""What every provisioned board must look like (the boards group of the inventory)."""

import json
import os

import pytest
import yaml

from conftest import STATE_FILE, connects, http

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RKLLAMA_HOME = "/var/lib/rkllama"
MODELS = f"{RKLLAMA_HOME}/RKLLAMA/models"
HUB = f"{RKLLAMA_HOME}/.cache/huggingface/hub"
SERVICES = {
    # unit: (user, the hardening settings systemd must report for it)
    "rkllama.service": ("rkllama", {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                                    "PrivateTmp": "yes", "LimitNOFILE": "102400"}),
    "exo-rkllm.service": ("exo", {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                                  "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": ""}),
}
CODE_DIRS = ["/opt/rkllm", MODELS]


def role_default(role, name):
    with open(os.path.join(ROOT, "roles", role, "defaults", "main.yml"), encoding="utf-8") as f:
        return yaml.safe_load(f).get(name)


@pytest.mark.parametrize("unit", sorted(SERVICES))
def test_service_runs_as_its_user_hardened(fleet, board, unit):
    host = fleet.host(board)
    user, hardening = SERVICES[unit]
    svc = host.service(unit)
    assert svc.is_running, f"{board}: {unit} is not running (systemctl status {unit}; journalctl -u {unit})"
    assert svc.is_enabled, f"{board}: {unit} is not enabled: it would not come back after a reboot"
    props = svc.systemd_properties
    assert props.get("User") == user, f"{board}: {unit} runs as {props.get('User') or 'root'!r}, expected {user!r}"
    wrong = {k: (v, props.get(k)) for k, v in hardening.items() if props.get(k, "") != v}
    assert not wrong, f"{board}: {unit} hardening differs (setting: (expected, found)): {wrong}"


def test_ports_open_to_exactly_whom_they_should(fleet, board):
    """8080 (rkllama) from the board only; 52415 (exo) and 9100 (metrics) from the gateway only."""
    me = fleet.host(board)
    problems = []
    if not connects(me, "127.0.0.1", 8080):
        problems.append("rkllama (8080) does not answer on the board itself")
    for gw in fleet.all_gateways:
        g = fleet.host(gw)
        if connects(g, board, 8080):
            problems.append(f"the gateway {gw} reaches rkllama (8080): it must be local only")
        for port, what in ((52415, "exo"), (9100, "the metrics exporter")):
            if not connects(g, board, port):
                problems.append(f"the gateway {gw} can't reach {what} ({port})")
    others = [b for b in fleet.all_boards if b != board][:1]
    for other in others:
        o = fleet.host(other)
        for port in (8080, 52415, 9100):
            if connects(o, board, port):
                problems.append(f"another board, {other}, reaches port {port}: only the gateway may")
    assert not problems, f"{board}: " + "; ".join(problems)


def test_running_versions_match_the_recorded_state_and_target(fleet, board, state_of):
    host = fleet.host(board)
    state = state_of(board)
    found = {
        "runtime_version": os.path.basename(host.file("/opt/rkllm/runtime/current").linked_to),
        "rkllama_version": os.path.basename(host.file("/opt/rkllm/rkllama/current").linked_to),
        "exo_version": os.path.basename(host.file("/opt/rkllm/exo/current").linked_to),
    }
    wrong = {k: (state.get(k), v) for k, v in found.items() if state.get(k) != v}
    assert not wrong, f"{board}: active releases differ from {STATE_FILE} (name: (recorded, active)): {wrong}"
    # The running processes started after their releases were switched in (a switch without a restart
    # leaves the old code, or the old runtime library, running).
    now = float(host.check_output("date +%s"))
    for unit, links in (("rkllama.service", ["rkllama", "runtime"]), ("exo-rkllm.service", ["exo"])):
        pid = host.service(unit).systemd_properties.get("MainPID")
        started = now - float(host.check_output(f"ps -o etimes= -p {pid}"))
        for link in links:
            switched = float(host.check_output(f"stat -c %Y /opt/rkllm/{link}/current"))
            assert started + 1 >= switched, (
                f"{board}: {unit} started {now - started:.0f} s ago, before /opt/rkllm/{link}/current was switched "
                f"{now - switched:.0f} s ago: it still runs the previous release (restart it, or re-run site.yml)")
    # What the inventory asks for (or the collection's default when it asks nothing).
    for key, role in (("runtime_version", "runtime"), ("rkllama_version", "rkllama"), ("exo_version", "exo")):
        target = fleet.var(board, key) or role_default(role, key)
        assert str(target) == state.get(key), (
            f"{board}: runs {key}={state.get(key)} but the inventory's target is {target}: run site.yml "
            f"(or upgrade.yml) to bring it there")


def test_assigned_model_present_verified_and_loaded(fleet, board, state_of):
    host = fleet.host(board)
    state = state_of(board)
    model = state.get("rkllama_default_model")
    assert model, f"{board}: {STATE_FILE} names no default model"
    entry = next((m for m in state.get("rkllama_models", []) if m.get("name") == model), None)
    assert entry, f"{board}: the default model {model} is not among the models recorded in {STATE_FILE}"
    mdir = host.file(f"{MODELS}/{model}")
    assert mdir.is_directory, f"{board}: {mdir.path} is missing"
    files = [f for f in host.check_output(f"ls -1 {MODELS}/{model}").split() if f.endswith(".rkllm")]
    assert len(files) == 1, f"{board}: expected one .rkllm file in {mdir.path}, found {files}"
    recorded = [f for f in entry.get("files", {}).values() if isinstance(f, dict) and os.path.basename(f.get("file", "")) == files[0]]
    assert recorded, f"{board}: {files[0]} in {mdir.path} is not the file recorded for {model} in {STATE_FILE}"
    sha = recorded[0].get("sha256")
    if sha:
        got = host.file(f"{MODELS}/{model}/{files[0]}").sha256sum
        assert got == sha, f"{board}: {files[0]} has sha256 {got}, the recorded identity is {sha}: the file changed"
    status, body = http(host, "http://127.0.0.1:8080/current_model")
    loaded = json.loads(body).get("model_name") if status == 200 else None
    assert loaded == model, f"{board}: rkllama holds {loaded or 'no model'}, the assigned model is {model}"


def test_tokenizer_cache_complete_and_offline(fleet, board, state_of):
    host = fleet.host(board)
    env = host.service("rkllama.service").systemd_properties.get("Environment", "")
    assert "HF_HUB_OFFLINE=1" in env.split(), f"{board}: rkllama.service does not run with HF_HUB_OFFLINE=1: {env}"
    missing = []
    for model in state_of(board).get("rkllama_models", []):
        tok = model["tokenizer"]
        repo_dir = f"{HUB}/models--{tok['repo'].replace('/', '--')}"
        if not host.file(f"{MODELS}/{model['name']}").exists:
            continue
        ref = host.file(f"{repo_dir}/refs/main")
        if not ref.exists or ref.content_string.strip() != tok["revision"]:
            missing.append(f"{repo_dir}/refs/main (expected {tok['revision']})")
            continue
        for f in tok["files"]:
            name = f["name"] if isinstance(f, dict) else f
            if not host.file(f"{repo_dir}/snapshots/{tok['revision']}/{name}").exists:
                missing.append(f"{model['name']}: {name}")
    assert not missing, f"{board}: the offline tokenizer cache lacks {missing}: rkllama would fail every request for those models"


def test_no_world_writable_file_in_code_venvs_or_models(fleet, board):
    host = fleet.host(board)
    found = host.run(f"find {' '.join(CODE_DIRS)} -xdev -perm -0002 ! -type l -print").stdout.split()
    assert not found, f"{board}: world-writable, so any local user could change what the services run: {found[:20]}"


def test_npu_metrics_are_fresh(fleet, board):
    host = fleet.host(board)
    status, text = http(host, "http://127.0.0.1:9100/metrics")
    assert status == 200, f"{board}: the node exporter (9100) answered {status}"
    stamp = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("rknpu_exporter_last_run_timestamp_seconds")]
    assert stamp, f"{board}: no rknpu_* metrics on :9100 (rknpu-metrics.service, textfile collector)"
    now = float(host.check_output("date +%s"))
    assert now - stamp[0] < 120, f"{board}: NPU metrics are {now - stamp[0]:.0f} s old (rknpu-metrics.service stalled?)"
