"""The gateway routes by model (issue #14): pools, the router's decisions, auto, /v1/models, preflight.

The role's own preflight and pool tasks run on a small inventory (three boards: two serve Qwen, one
DeepSeek), then its templates render nginx.conf and the router's data. The router's pure functions
(files/rkllm_router.js) run with the `njs` CLI on that data: on this machine if njs is installed
(Debian 12: njs 0.7.9, the oldest a gateway runs), else in the Docker lab's gateway (Debian 13: 0.8.9).
"""

import json
import os
import re
import shutil
import subprocess
import uuid

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ROLE = os.path.join(REPO, "roles", "gateway_nginx")
ROUTER = os.path.join(ROLE, "files", "rkllm_router.js")
LAB_GATEWAY = "rkllm-lab-gateway"
KEY = "k" * 24

INVENTORY = {
    "all": {"children": {
        "boards": {"hosts": {
            "b1": {"ansible_host": "10.0.0.1", "rkllama_default_model": "Qwen2.5-1.5B-Instruct"},
            # No model of its own: the rkllama role's default (Qwen2.5-1.5B-Instruct).
            "b2": {"ansible_host": "10.0.0.2"},
            "b3": {"ansible_host": "10.0.0.3", "rkllama_default_model": "DeepSeek-R1-1.5B"},
        }},
        "gateway": {"hosts": {"gw": {"ansible_connection": "local"}}},
    }},
}


# Added to run_play's environment (conftest.py).
ENV = {"ANSIBLE_ROLES_PATH": os.path.join(REPO, "roles"), "ANSIBLE_FACT_CACHING": "memory"}


def run_role(run_play, tmp_path, extra_vars, render=True, inventory=None):
    """Run the role's preflight and pool tasks on the gateway `gw`, then render its templates into tmp_path/out."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    inv = tmp_path / f"hosts-{uuid.uuid4().hex[:8]}.json"
    inv.write_text(json.dumps(inventory or INVENTORY))
    templates = ["nginx.conf", "rkllm_fleet.js", "internal-status.conf"] if render else []
    play = f"""
    - hosts: gw
      gather_facts: true
      gather_subset: [min]
      tasks:
        - name: Check the inputs
          ansible.builtin.include_role: {{name: gateway_nginx, tasks_from: preflight.yml, public: true}}
        - name: Work out the pools
          ansible.builtin.include_role: {{name: gateway_nginx, tasks_from: pools.yml, public: true}}
        - name: Render
          ansible.builtin.template:
            src: {ROLE}/templates/{{{{ item }}}}.j2
            dest: {out}/{{{{ item }}}}
            mode: "0644"
          loop: {json.dumps(templates)}
    """
    res = run_play(tmp_path, play, dict({"gateway_nginx_api_keys": [KEY], "_gateway_nginx_njs_version": "0.8.9"}, **extra_vars),
                   inventory=inv, cwd=tmp_path, env=ENV)
    return res, {t: (out / t).read_text() for t in templates if (out / t).exists()}


def fleet_data(js_text):
    """The router's data: the JSON literal the rendered module exports."""
    match = re.search(r"^export default (.*);$", js_text, re.M)
    assert match, js_text
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, run_play):
    tmp = tmp_path_factory.mktemp("fleet")
    res, files = run_role(run_play, tmp, {})
    assert res.returncode == 0, res.stdout + res.stderr
    return files


@pytest.fixture(scope="module")
def drained(tmp_path_factory, run_play):
    tmp = tmp_path_factory.mktemp("drained")
    res, files = run_role(run_play, tmp, {"gateway_nginx_drained": ["b3"]})
    assert res.returncode == 0, res.stdout + res.stderr
    return files


# --- the pools in nginx.conf ----------------------------------------------------------------------------

def upstreams(conf):
    return {m.group(1): re.findall(r"^\s*server (\S+) [^;]*?( down)?; # board (\S+)$", m.group(2), re.M)
            for m in re.finditer(r"upstream (rkllm_pool_\w+) \{(.*?)\n    \}", conf, re.S)}


def test_each_model_has_its_own_pool_of_boards(fleet):
    pools = upstreams(fleet["nginx.conf"])
    assert pools == {
        "rkllm_pool_qwen2_5_1_5b_instruct": [("10.0.0.1:52415", "", "b1"), ("10.0.0.2:52415", "", "b2")],
        "rkllm_pool_deepseek_r1_1_5b": [("10.0.0.3:52415", "", "b3")],
    }
    # One line per board in the whole file (drain.yml edits that line by its board name).
    assert sorted(re.findall(r"; # board (\S+)$", fleet["nginx.conf"], re.M)) == ["b1", "b2", "b3"]
    assert "least_conn;" in fleet["nginx.conf"].split("upstream rkllm_pool_qwen2_5_1_5b_instruct {")[1].split("}")[0]


def test_drained_board_is_down_in_its_pool(drained):
    assert upstreams(drained["nginx.conf"])["rkllm_pool_deepseek_r1_1_5b"] == [("10.0.0.3:52415", " down", "b3")]
    data = fleet_data(drained["rkllm_fleet.js"])
    assert {p["name"]: (p["ready"], p["configured"]) for p in data["pools"]} == \
        {"Qwen2.5-1.5B-Instruct": (2, 2), "DeepSeek-R1-1.5B": (0, 1)}


def test_v1_keeps_keys_limits_and_streaming(fleet):
    conf = fleet["nginx.conf"]
    v1 = conf.split("location /v1/ {")[1].split("\n        }\n")[0]
    # The key and path checks and the limits come before the router (rewrite and preaccess phases).
    assert 'if ($rkllm_api_key = "missing")' in v1 and "return 401" in v1
    assert 'if ($uri !~ "^/v1/[A-Za-z0-9._~:@/-]*$")' in v1
    assert "limit_req zone=rkllm_key_rate" in v1 and "limit_conn rkllm_key_conns" in v1
    assert v1.strip().endswith("js_content rkllm_router.route;")
    for name in ("@rkllm_pool", "@rkllm_pool_rewritten"):
        loc = conf.split(f"location {name} {{")[1].split("\n        }\n")[0]
        assert "proxy_pass http://$rkllm_upstream$uri$is_args$args;" in loc
        assert "proxy_buffering off;" in loc and 'proxy_set_header Authorization "";' in loc
        assert re.findall(r"^\s*proxy_next_upstream (.*);$", loc, re.M) == ["error timeout"]
        assert ("proxy_set_body $rkllm_body;" in loc) == (name == "@rkllm_pool_rewritten")
    bad = conf.split("location @rkllm_bad_gateway {")[1].split("}\n")[0]
    assert "return 503" in bad and "Retry-After 30" in bad and "$rkllm_model" in bad


def test_access_log_and_metrics(fleet, tmp_path, run_play):
    conf = fleet["nginx.conf"]
    fmt = conf.split("log_format rkllm_gateway")[1].split(";\n")[0]
    assert '"model_requested":"$rkllm_model_requested","model":"$rkllm_model","pool":"$rkllm_pool"' in fmt
    assert "js_shared_dict_zone zone=rkllm_models:1m type=number;" in conf
    # /metrics/models on the internal port answers the status allow list only.
    internal = fleet["internal-status.conf"].split("location = /metrics/models {")[1].split("}")[0]
    assert re.findall(r"(allow|deny) ([^;]+);", internal) == [("allow", "127.0.0.1"), ("allow", "::1"), ("deny", "all")]
    # njs 0.7.9 (Debian 12) has no shared dictionaries: no counters, and nothing nginx 1.22 would refuse.
    res, files = run_role(run_play, tmp_path, {"_gateway_nginx_njs_version": "0.7.9"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "js_shared_dict_zone" not in files["nginx.conf"] and "rkllm_models_tap" not in files["nginx.conf"]
    assert fleet_data(files["rkllm_fleet.js"])["metrics"] is False


def test_router_data(fleet):
    data = fleet_data(fleet["rkllm_fleet.js"])
    assert [(p["name"], p["id"], p["upstream"]) for p in data["pools"]] == [
        ("Qwen2.5-1.5B-Instruct", "qwen2.5-1.5b-instruct-rkllm", "rkllm_pool_qwen2_5_1_5b_instruct"),
        ("DeepSeek-R1-1.5B", "deepseek-r1-1.5b-rkllm", "rkllm_pool_deepseek_r1_1_5b")]
    assert data["default_pool"] == "qwen2_5_1_5b_instruct" and data["auto"] == "auto"
    assert data["rules"] == [{"pool": "deepseek_r1_1_5b", "reasoning_effort": True},
                             {"pool": "deepseek_r1_1_5b", "system_marker": "#reason"}]


# --- preflight ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, refused", [
    ({"gateway_nginx_auto_rules": [{"model": "DeepSeek-R1-1.5B", "reasoning": True}]}, "unknown key(s) reasoning"),
    ({"gateway_nginx_auto_rules": [{"model": "Llama-9B"}]}, "model Llama-9B is not a catalog model"),
    ({"gateway_nginx_auto_rules": [{"model": "DeepSeek-R1-1.5B", "min_prompt_chars": "many"}]}, "gateway_nginx_auto_rules[0]"),
    ({"gateway_nginx_reasoning_marker": '"; ngx.log(1)//'}, "gateway_nginx_reasoning_marker"),
    ({"gateway_nginx_auto_model": "qwen2.5-1.5b-instruct-rkllm"}, "gateway_nginx_auto_model"),
    ({"gateway_nginx_auto_model": "au to"}, "gateway_nginx_auto_model"),
    ({"gateway_nginx_default_model": "Qwen2.5-3B"}, "gateway_nginx_default_model"),
    ({"gateway_nginx_auto_fallback": "Phi-3-mini"}, "gateway_nginx_auto_fallback"),
])
def test_preflight_refuses_by_name(tmp_path, extra, refused, run_play):
    res, _rendered = run_role(run_play, tmp_path, extra, render=False)
    assert res.returncode != 0
    assert refused in res.stdout, res.stdout[-3000:]


def test_preflight_refuses_a_board_model_exo_cannot_serve(tmp_path, run_play):
    inventory = json.loads(json.dumps(INVENTORY))
    inventory["all"]["children"]["boards"]["hosts"]["b3"]["rkllama_default_model"] = "My\"Model"
    res, _rendered = run_role(run_play, tmp_path, {}, render=False, inventory=inventory)
    assert res.returncode != 0
    assert 'b3: My"Model' in res.stdout and "no exo model id" in res.stdout, res.stdout[-3000:]


# --- the router, run by njs -------------------------------------------------------------------------------

def njs_runner():
    """A function running `njs` on a directory of files, or None when no njs is at hand."""
    if shutil.which("njs"):
        def run_local(files):
            work = f"/tmp/rkllm-routing-{uuid.uuid4().hex[:8]}"
            os.makedirs(work)
            try:
                for name, text in files.items():
                    with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                        f.write(text)
                return subprocess.run(["njs", "-p", work, os.path.join(work, "harness.js")], capture_output=True,
                                      text=True, timeout=60, check=False)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return run_local
    if shutil.which("docker"):
        res = subprocess.run(["docker", "exec", LAB_GATEWAY, "sh", "-c", "command -v njs"], capture_output=True, text=True, check=False)
        if res.returncode == 0:
            def run_lab(files):
                work = f"/root/rkllm-routing-{uuid.uuid4().hex[:8]}"
                subprocess.run(["docker", "exec", LAB_GATEWAY, "mkdir", "-p", work], check=True)
                try:
                    for name, text in files.items():
                        subprocess.run(["docker", "exec", "-i", LAB_GATEWAY, "sh", "-c", f"cat > {work}/{name}"],
                                       input=text, text=True, check=True)
                    return subprocess.run(["docker", "exec", LAB_GATEWAY, "njs", "-p", work, f"{work}/harness.js"],
                                          capture_output=True, text=True, timeout=60, check=False)
                finally:
                    subprocess.run(["docker", "exec", LAB_GATEWAY, "rm", "-rf", work], check=False)
            return run_lab
    return None


NJS = njs_runner()
needs_njs = pytest.mark.skipif(NJS is None, reason="no njs CLI here and no lab gateway with one (apt-get install njs, or make lab)")

HARNESS = """
import router from 'rkllm_router.js';
import fleet from 'rkllm_fleet.js';
var cases = JSON.parse(%s);
var out = cases.map(function (c) {
    if (c.fn === 'decide') { return router.decide(fleet, c.method, c.path, c.body); }
    if (c.fn === 'ready') { return router.readyFromConf(c.conf); }
    if (c.fn === 'list') { return router.modelList(fleet, c.ready); }
    if (c.fn === 'metrics') { return router.metricsText(fleet, c.items, c.ready); }
});
// One line per result, each cut in pieces: the njs CLI cuts a long console.log line.
out.forEach(function (o) {
    var s = JSON.stringify(o);
    for (var i = 0; i < s.length; i += 500) {
        console.log('+' + s.substring(i, i + 500));
    }
    console.log('=');
});
"""


def run_router(fleet_js, cases):
    files = {"rkllm_router.js": open(ROUTER, encoding="utf-8").read(), "rkllm_fleet.js": fleet_js,
             "harness.js": HARNESS % json.dumps(json.dumps(cases))}
    res = NJS(files)
    assert res.returncode == 0, res.stdout + res.stderr
    results, buf = [], ""
    for line in res.stdout.split("\n"):
        if line.startswith("+"):
            buf += line[1:]
        elif line == "=":
            results.append(json.loads(buf))
            buf = ""
    assert len(results) == len(cases), res.stdout
    return results


def chat(model=None, **fields):
    body = dict(fields, messages=fields.get("messages", [{"role": "user", "content": "hi"}]))
    if model is not None:
        body["model"] = model
    return {"fn": "decide", "method": "POST", "path": "/v1/chat/completions", "body": json.dumps(body)}


QWEN, DEEPSEEK = "qwen2.5-1.5b-instruct-rkllm", "deepseek-r1-1.5b-rkllm"


@needs_njs
def test_router_picks_the_pool_by_model(fleet):
    cases = [chat("DeepSeek-R1-1.5B"), chat(DEEPSEEK), chat("DEEPSEEK-r1-1.5b"), chat(QWEN), chat(), chat("gpt-4o-mini"),
             chat("Qwen2.5-3B"), chat("auto", reasoning_effort="high"),
             chat("auto", messages=[{"role": "system", "content": "Think. #REASON please"}, {"role": "user", "content": "2+2?"}]),
             chat("auto", messages=[{"role": "system", "content": [{"type": "text", "text": "#reason"}]}]),
             chat("auto", messages=[{"role": "user", "content": "#reason"}]), chat("AUTO")]
    got = run_router(fleet["rkllm_fleet.js"], cases)
    # (pool's exo id, model the board gets, requested label) for each case.
    summary = [(d["pool"]["id"], json.loads(d["rewrite"])["model"] if d["rewrite"] else None, d["requested"])
               if d.get("pool") else (d["status"], d["answer"]["error"]["code"], d["requested"]) for d in got]
    assert summary == [
        (DEEPSEEK, DEEPSEEK, "DeepSeek-R1-1.5B"),       # catalog name: the board gets the exo id
        (DEEPSEEK, None, DEEPSEEK),                      # exo id: body untouched
        (DEEPSEEK, DEEPSEEK, "DeepSeek-R1-1.5B"),       # any case
        (QWEN, None, QWEN),
        (QWEN, QWEN, "none"),                            # no model: the default (most boards serve it)
        (QWEN, QWEN, "gpt-*"),                           # an OpenAI client's default: the default model
        (404, "model_not_found", "other"),               # a catalog model no board serves
        (DEEPSEEK, DEEPSEEK, "auto"),                    # auto, reasoning_effort set
        (DEEPSEEK, DEEPSEEK, "auto"),                    # auto, the marker in a system message (any case)
        (DEEPSEEK, DEEPSEEK, "auto"),                    # ... in a list of content parts
        (QWEN, QWEN, "auto"),                            # auto, the marker only in a user message: fallback
        (QWEN, QWEN, "auto"),
    ]
    unknown = got[6]["answer"]["error"]
    assert unknown == {"message": "The model 'Qwen2.5-3B' does not exist on this fleet. Served models: "
                                  f"{QWEN}, {DEEPSEEK}, auto.", "type": "invalid_request_error", "param": "model",
                       "code": "model_not_found"}
    # The rest of the body reaches the board unchanged.
    assert json.loads(got[7]["rewrite"]) == {"model": DEEPSEEK, "reasoning_effort": "high",
                                             "messages": [{"role": "user", "content": "hi"}]}


@needs_njs
def test_router_refuses_what_it_cannot_route(fleet, drained):
    cases = [{"fn": "decide", "method": "POST", "path": "/v1/chat/completions", "body": "not json"},
             {"fn": "decide", "method": "POST", "path": "/v1/chat/completions", "body": ""},
             {"fn": "decide", "method": "POST", "path": "/v1/chat/completions", "body": "[1]"},
             chat(7),
             {"fn": "decide", "method": "GET", "path": "/v1/something", "body": ""}]
    got = run_router(fleet["rkllm_fleet.js"], cases)
    assert [(d["status"], d["answer"]["error"]["code"]) for d in got[:4]] == \
        [(400, "invalid_json"), (400, "invalid_json"), (400, "invalid_json"), (400, "invalid_model")]
    assert got[4]["pool"]["id"] == QWEN and got[4]["rewrite"] is None   # no model to read: the default pool, as sent
    # Every DeepSeek board drained: 503 with Retry-After, never another model's board (auto's rule included).
    got = run_router(drained["rkllm_fleet.js"], [chat("DeepSeek-R1-1.5B"), chat("auto", reasoning_effort="low"), chat(QWEN)])
    assert [(d["status"], d.get("retry_after"), d.get("answer", {}).get("error", {}).get("code")) for d in got[:2]] == \
        [(503, 30, "model_unavailable")] * 2
    assert "DeepSeek-R1-1.5B" in got[0]["answer"]["error"]["message"]
    assert got[2]["pool"]["id"] == QWEN


@needs_njs
def test_models_list_follows_drain_edits(fleet):
    # drain.yml's edit of the running nginx.conf, as its replace task does it.
    drained_conf = re.sub(r"(?m)^([ \t]*server [^;#\n]*?)(?: down)?; # board b1$", r"\1 down; # board b1", fleet["nginx.conf"])
    ready = run_router(fleet["rkllm_fleet.js"], [{"fn": "ready", "conf": fleet["nginx.conf"]}, {"fn": "ready", "conf": drained_conf}])
    assert ready == [{"qwen2_5_1_5b_instruct": 2, "deepseek_r1_1_5b": 1}, {"qwen2_5_1_5b_instruct": 1, "deepseek_r1_1_5b": 1}]
    listing = run_router(fleet["rkllm_fleet.js"], [{"fn": "list", "ready": ready[1]}])[0]
    assert listing["object"] == "list"
    assert [(m["id"], m["owned_by"], m["rkllm"]["name"], m["rkllm"]["boards"]) for m in listing["data"]] == [
        (QWEN, "rkllm-fleet", "Qwen2.5-1.5B-Instruct", 1), (DEEPSEEK, "rkllm-fleet", "DeepSeek-R1-1.5B", 1),
        ("auto", "rkllm-fleet", "auto", 2)]


@needs_njs
def test_metrics_text(fleet):
    items = [["r|auto|DeepSeek-R1-1.5B|DeepSeek-R1-1.5B|200", 3], ["c|DeepSeek-R1-1.5B", 3], ["s|DeepSeek-R1-1.5B", 12.5],
             ["b|DeepSeek-R1-1.5B|5", 1], ["b|DeepSeek-R1-1.5B|10", 2], ["b|DeepSeek-R1-1.5B|30", 3]]
    text = run_router(fleet["rkllm_fleet.js"], [{"fn": "metrics", "items": items, "ready": {"deepseek_r1_1_5b": 0}}])[0]
    lines = text.splitlines()
    assert 'rkllm_gateway_requests_total{requested="auto",model="DeepSeek-R1-1.5B",pool="DeepSeek-R1-1.5B",code="200"} 3' in lines
    assert 'rkllm_gateway_request_duration_seconds_bucket{model="DeepSeek-R1-1.5B",le="2.5"} 0' in lines
    assert 'rkllm_gateway_request_duration_seconds_bucket{model="DeepSeek-R1-1.5B",le="10"} 2' in lines
    assert 'rkllm_gateway_request_duration_seconds_bucket{model="DeepSeek-R1-1.5B",le="+Inf"} 3' in lines
    assert 'rkllm_gateway_request_duration_seconds_sum{model="DeepSeek-R1-1.5B"} 12.5' in lines
    assert 'rkllm_gateway_pool_boards{model="DeepSeek-R1-1.5B"} 0' in lines
    assert 'rkllm_gateway_pool_boards{model="Qwen2.5-1.5B-Instruct"} 2' in lines
    assert 'rkllm_gateway_pool_boards_configured{model="DeepSeek-R1-1.5B"} 1' in lines


@needs_njs
def test_inventory_strings_stay_data(tmp_path, fleet, run_play):
    """A marker that preflight would refuse, rendered anyway, is still a string in the router's data, never code."""
    data = fleet_data(fleet["rkllm_fleet.js"])
    evil = "\"}; throw new Error('injected'); //</script>\u2028${x}"
    data["rules"] = [{"pool": "deepseek_r1_1_5b", "system_marker": evil}]
    out = tmp_path / "out"
    out.mkdir()
    play = f"""
    - hosts: localhost
      gather_facts: false
      tasks:
        - name: Render
          ansible.builtin.template:
            src: {ROLE}/templates/rkllm_fleet.js.j2
            dest: {out}/rkllm_fleet.js
            mode: "0644"
    """
    res = run_play(tmp_path, play, {"_gateway_nginx_fleet": data}, args=["-c", "local"], cwd=tmp_path, env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    rendered = (out / "rkllm_fleet.js").read_text()
    assert fleet_data(rendered)["rules"][0]["system_marker"] == evil
    got = run_router(rendered, [chat("auto", messages=[{"role": "system", "content": "x " + evil}])])
    assert got[0]["pool"]["id"] == DEEPSEEK


@needs_njs
def test_routing_off_is_one_pool_as_before(tmp_path, run_play):
    """gateway_nginx_model_routing: false (benchmark.yml's second arm): every board one pool, requests as sent."""
    res, files = run_role(run_play, tmp_path, {"gateway_nginx_model_routing": False})
    assert res.returncode == 0, res.stdout + res.stderr
    assert upstreams(files["nginx.conf"]) == {"rkllm_pool_all": [("10.0.0.1:52415", "", "b1"), ("10.0.0.2:52415", "", "b2"),
                                                                 ("10.0.0.3:52415", "", "b3")]}
    got = run_router(files["rkllm_fleet.js"], [chat("DeepSeek-R1-1.5B"), chat("nope"),
                                               {"fn": "decide", "method": "GET", "path": "/v1/models", "body": ""}])
    assert [(d["pool"]["upstream"], d["rewrite"]) for d in got] == [("rkllm_pool_all", None)] * 3
