"""What the gateway must look like: pool, keys, models, Prometheus, mirror."""

import json
import re

import pytest
import requests

from conftest import connects, http



def _key(fleet, gateway, request):
    """An API key of the gateway: --api-key / RKLLM_API_KEY, else the inventory's first key."""
    key = request.config.getoption("api_key")
    if key is None:
        keys = fleet.var(gateway, "gateway_nginx_api_keys") or []
        key = keys[0] if keys else ""
    return key


def test_every_ready_board_is_in_its_models_pool_and_no_drained_one(fleet, gateway, state_of):
    """Each board provisioned and ready is a server of its model's pool (`upstream rkllm_pool_<model>`,
    the model being its rkllama_default_model), in no other pool; a drained one is `down`."""
    host = fleet.host(gateway)
    config = host.run("nginx -T 2>/dev/null").stdout
    blocks = re.findall(r"upstream\s+(rkllm_pool_\w+)\s*{(.*?)}", config, re.S)
    assert blocks, f"{gateway}: nginx has no `upstream rkllm_pool_*` (is gateway_nginx applied?)"
    pool, where = {}, {}
    for upstream, body in blocks:
        for opts, name in re.findall(r"^\s*server\s+\S+\s*([^;]*);\s*#\s*board\s+(\S+)", body, re.M):
            pool[name] = "down" in opts.split()
            where.setdefault(name, []).append(upstream)
    problems = []
    for board in fleet.all_boards:
        ready = http(host, f"http://{fleet.var(board, 'ansible_host') or board}:52415/healthcheck", timeout=5)[0] == 200
        provisioned = fleet.host(board).file("/etc/rkllm/fleet-state.json").exists
        if ready and provisioned and board not in pool:
            problems.append(f"{board} is ready (exo answers /healthcheck) but in no pool")
        if board in pool and not pool[board] and not ready:
            problems.append(f"{board} is in service in a pool but its exo does not answer /healthcheck")
        # (With rkllm_model_pools the spread decides at run time: the inventory's value is not the board's.)
        model = None if fleet.var(board, "rkllm_model_pools") else fleet.var(board, "rkllama_default_model")
        if board in where and model:
            expected = "rkllm_pool_" + re.sub(r"[^a-z0-9]+", "_", str(model).lower())
            if where[board] != [expected]:
                problems.append(f"{board} serves {model} but is in {where[board]}, not [{expected}]")
    unknown = sorted(set(pool) - set(fleet.all_boards))
    if unknown:
        problems.append(f"the pools have servers that are not boards of the inventory: {unknown}")
    assert not problems, f"{gateway}: " + "; ".join(problems)


def test_keys_are_enforced(fleet, gateway, request):
    """No key or a wrong one gets 401, on the gateway itself and, with --gateway-url, from this machine."""
    key = _key(fleet, gateway, request)
    if not fleet.var(gateway, "gateway_nginx_api_keys"):
        pytest.skip(f"{gateway}: no API keys configured (gateway_nginx_api_keys is empty)")
    body = {"model": "qwen2.5-1.5b-instruct-rkllm", "messages": [{"role": "user", "content": "hi"}]}
    bad = (({}, "no key"), ({"Authorization": "Bearer not-a-key-of-this-fleet-0000"}, "a wrong key"))
    host = fleet.host(gateway)
    for headers, what in bad:
        status, text = http(host, "http://127.0.0.1:80/v1/chat/completions", "POST", headers, body)
        assert status == 401, f"{gateway}: a request with {what} got {status}, expected 401: {text[:200]}"
    status, text = http(host, "http://127.0.0.1:80/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert status == 200, f"{gateway}: a request with a valid key got {status}, expected 200: {text[:200]}"
    url = request.config.getoption("gateway_url")
    if url:
        for headers, what in bad:
            answer = requests.post(url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert answer.status_code == 401, (
                f"{gateway}: from this machine, {url} answered a request with {what} with {answer.status_code}, expected 401")


def test_models_list_is_true_to_the_fleet(fleet, gateway, request, state_of):
    key = _key(fleet, gateway, request)
    host = fleet.host(gateway)
    status, text = http(host, "http://127.0.0.1:80/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert status == 200, f"{gateway}: /v1/models answered {status}: {text[:200]}"
    listed = {m["id"] for m in json.loads(text).get("data", [])}
    served = {state_of(b).get("rkllama_default_model") for b in fleet.all_boards}
    exo_ids = {"Qwen2.5-1.5B-Instruct": "qwen2.5-1.5b-instruct-rkllm", "DeepSeek-R1-1.5B": "deepseek-r1-1.5b-rkllm"}
    missing = {m for m in served if exo_ids.get(m, m) not in listed and m not in listed}
    assert not missing, f"{gateway}: /v1/models lists {sorted(listed)} but not {sorted(missing)}, which the boards serve"


def test_prometheus_has_every_target_up_and_no_alert_firing(fleet, gateway):
    host = fleet.host(gateway)
    status, text = http(host, "http://127.0.0.1:9090/api/v1/targets?state=active")
    assert status == 200, f"{gateway}: Prometheus (127.0.0.1:9090 on the gateway) answered {status}"
    targets = json.loads(text)["data"]["activeTargets"]
    down = [f"{t['labels'].get('job')} {t['scrapeUrl']}: {t.get('lastError')}" for t in targets if t["health"] != "up"]
    boards_scraped = {t["labels"].get("board") for t in targets}
    missing = [b for b in fleet.all_boards if b not in boards_scraped]
    assert not missing, f"{gateway}: Prometheus scrapes no target of {missing}"
    assert not down, f"{gateway}: targets not up: {down}"
    status, text = http(host, "http://127.0.0.1:9090/api/v1/alerts")
    firing = [f"{a['labels'].get('alertname')} {a['labels'].get('board', '')}" for a in json.loads(text)["data"]["alerts"]
              if a["state"] == "firing"]
    assert not firing, f"{gateway}: alerts firing on a fleet that should be healthy: {firing}"


def test_mirror_serves_boards_only(fleet, gateway):
    if not fleet.var(gateway, "gateway_nginx_mirror_enabled"):
        pytest.skip(f"{gateway}: the artifact mirror is off (gateway_nginx_mirror_enabled)")
    port = int(fleet.var(gateway, "gateway_nginx_mirror_port") or 8081)
    gw_addr = fleet.var(gateway, "ansible_host") or gateway
    probe = f"http://{gw_addr}:{port}/github.com/"
    board = fleet.host(fleet.all_boards[0])
    status, _ = http(board, probe, timeout=10)
    assert status not in (0, 403), f"{gateway}: a board ({fleet.all_boards[0]}) can't use the mirror on {port}: got {status or 'no answer'}"
    outsiders = [h for h in fleet.runner.get_hosts("all") if h not in fleet.all_boards and h not in fleet.gateways]
    for name in outsiders[:1]:
        other = fleet.host(name)
        status, _ = http(other, probe, timeout=10)
        assert status in (0, 403) or not connects(other, gw_addr, port), (
            f"{gateway}: {name}, which is not a board, got {status} from the mirror on {port}: it must serve boards only")
