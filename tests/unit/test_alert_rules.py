"""The gateway_prometheus role's alert rules against their promtool unit tests (tests/prometheus/).

promtool runs where it is: on this machine if it is installed, else in the lab's running gateway
(`docker exec rkllm-lab-gateway promtool ...`, the promtool of the Prometheus that evaluates the rules);
without either the promtool test is skipped here, and Molecule's default verify runs it on the gateway
(molecule/default/tasks/alerts.yml). The static checks below run everywhere.
"""

import importlib.util
import io
import os
import shutil
import subprocess
import tarfile

import pytest
import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROM_TESTS = os.path.join(REPO, "tests", "prometheus")
GATEWAY = "rkllm-lab-gateway"


def load_renderer():
    spec = importlib.util.spec_from_file_location("render_rules", os.path.join(PROM_TESTS, "render_rules.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("rules")
    load_renderer().main([str(out)])
    return out


@pytest.fixture(scope="module")
def rules(rendered):
    with open(rendered / "rkllm_fleet.rules.yml", encoding="utf-8") as handle:
        return [rule for group in yaml.safe_load(handle)["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def prom_tests():
    with open(os.path.join(PROM_TESTS, "rkllm_fleet_rules_test.yml"), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def test_no_alert_reads_rkllm_server_up(rules):
    # exo's rkllm_server_up is 0 from its start until the first model load and changes only on a load.
    for rule in rules:
        assert "rkllm_server_up" not in rule["expr"], rule["alert"]


def test_boards_without_the_exo_metrics_patch_are_left_out_of_tokens_per_second(rules):
    tokens = [r for r in rules if r["alert"] == "RkllmTokensPerSecondLow"]
    assert len(tokens) == 1
    assert "board!~`b3`" in tokens[0]["expr"]


def test_board_names_are_escaped_in_the_tokens_filter(tmp_path):
    renderer = load_renderer()
    values = dict(renderer.VALUES, gateway_prometheus_boards=["rock5b-1.lab", "opi5"],
                  hostvars={"rock5b-1.lab": {"exo_patches_enabled": False}, "opi5": {}})
    text = renderer.render(values=values)
    tokens = [r for g in yaml.safe_load(text)["groups"] for r in g["rules"] if r.get("alert") == "RkllmTokensPerSecondLow"]
    assert "board!~`rock5b\\-1\\.lab`" in tokens[0]["expr"]
    (tmp_path / "rkllm_fleet.rules.yml").write_text(text)
    shutil.copy(os.path.join(PROM_TESTS, "rkllm_fleet_rules_test.yml"), str(tmp_path))
    code, output = run_promtool(str(tmp_path), check_only=True)
    assert code == 0, output


def test_every_alert_is_shown_firing_and_silent(rules, prom_tests):
    fired, silent = set(), set()
    for case in prom_tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in rules if "alert" in rule}
    assert names - fired == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown silent"
    causes = {rule["labels"].get("cause") for rule in rules if rule.get("alert") == "RkllamaDown"}
    shown = {alert["exp_labels"].get("cause") for case in prom_tests["tests"] for check in case.get("alert_rule_test", [])
             for alert in check.get("exp_alerts") or [] if check["alertname"] == "RkllamaDown"}
    assert causes == shown == {"not_active", "calls_failing"}


def _gateway_running():
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", GATEWAY],
                           capture_output=True, text=True, check=False)
    return probe.returncode == 0 and probe.stdout.strip() == "true"


def run_promtool(directory, check_only=False):
    """`promtool check rules` and `promtool test rules` on DIRECTORY; returns (returncode, output)."""
    commands = [["promtool", "check", "rules", "rkllm_fleet.rules.yml"]]
    if not check_only:
        commands.append(["promtool", "test", "rules", "rkllm_fleet_rules_test.yml"])
    if shutil.which("promtool"):
        outputs = [subprocess.run(c, cwd=directory, capture_output=True, text=True, check=False) for c in commands]
    elif _gateway_running():
        remote = "/var/tmp/rkllm-rules-unit-%d" % os.getpid()
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            for name in ("rkllm_fleet.rules.yml", "rkllm_fleet_rules_test.yml"):
                tar.add(os.path.join(directory, name), arcname=name)
        subprocess.run(["docker", "exec", "-i", GATEWAY, "sh", "-c", "mkdir -p %s && tar -C %s -x" % (remote, remote)],
                       input=archive.getvalue(), check=True, capture_output=True)
        try:
            outputs = [subprocess.run(["docker", "exec", "-w", remote, GATEWAY] + c, capture_output=True, text=True,
                                      check=False) for c in commands]
        finally:
            subprocess.run(["docker", "exec", GATEWAY, "rm", "-rf", remote], check=False, capture_output=True)
    else:
        pytest.skip("no promtool here and no running lab gateway (Molecule's default verify runs these tests on the gateway)")
    code = max(o.returncode for o in outputs)
    return code, "\n".join(o.stdout + o.stderr for o in outputs)


def test_promtool_unit_tests_pass(rendered):
    code, output = run_promtool(str(rendered))
    assert code == 0, output


def test_every_metric_in_the_rules_is_exported_by_the_fleet(rules):
    spec = importlib.util.spec_from_file_location("test_dashboard_names", os.path.join(REPO, "tests", "unit", "test_dashboard.py"))
    names = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(names)
    unknown = {}
    for rule in rules:
        for name in names.metric_names(rule["expr"]):
            if not names.known_metric(name):
                unknown.setdefault(rule["alert"], set()).add(name)
    assert not unknown, "metrics the fleet does not export: %r" % unknown


def test_model_swap_limit_comes_from_its_variable():
    renderer = load_renderer()
    text = renderer.render(values=dict(renderer.VALUES, gateway_prometheus_max_model_loads=5))
    swapping = [r for g in yaml.safe_load(text)["groups"] for r in g["rules"] if r.get("alert") == "RkllmModelSwapping"]
    assert len(swapping) == 1
    assert swapping[0]["expr"].rstrip().endswith("> 5")
    assert "More than 5 model loads (gateway_prometheus_max_model_loads)" in swapping[0]["annotations"]["description"]


def test_a_pool_without_boards_is_critical_and_swapping_a_warning(rules):
    by_name = {r["alert"]: r for r in rules if r.get("alert") in ("RkllmModelNoReadyBoard", "RkllmModelSwapping")}
    assert by_name["RkllmModelNoReadyBoard"]["labels"]["severity"] == "critical"
    assert by_name["RkllmModelSwapping"]["labels"]["severity"] == "warning"
    assert "503" in by_name["RkllmModelNoReadyBoard"]["annotations"]["summary"]


ROLE = os.path.join(REPO, "roles", "gateway_prometheus")


def _render_role_template(name, **values):
    import jinja2

    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["to_json"] = lambda v: __import__("json").dumps(v)
    env.filters["bool"] = load_renderer().to_bool
    with open(os.path.join(ROLE, "templates", name), encoding="utf-8") as handle:
        return env.from_string(handle.read()).render(ansible_managed="test", **values)


def _role_default(name, **context):
    """A role default as the role sees it: its template rendered with CONTEXT (what other roles define)."""
    import jinja2

    with open(os.path.join(ROLE, "defaults", "main.yml"), encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)[name]
    return jinja2.Environment().from_string(str(raw)).render(**context) if isinstance(raw, str) else raw


def _gateway_models_job(**context):
    """The file_sd loop item of the rkllm_gateway_models job (tasks/configure.yml), with the role's defaults."""
    import jinja2

    with open(os.path.join(ROLE, "tasks", "configure.yml"), encoding="utf-8") as handle:
        tasks = yaml.safe_load(handle)
    items = [t for t in tasks if t.get("name") == "Write the scrape targets"][0]["loop"]
    item = [i for i in items if i["job"] == "gateway_models"][0]
    variables = {k: _role_default(k, **context) for k in ("gateway_prometheus_gateway_models_port",
                                                          "gateway_prometheus_scrape_gateway_models")}
    variables.update({k: v for k, v in context.items() if k.startswith("gateway_prometheus_")})
    return {k: jinja2.Environment().from_string(v).render(**variables) if isinstance(v, str) else v for k, v in item.items()}


def test_gateway_model_metrics_are_scraped_on_the_gateway_nginx_internal_port():
    # nginx serves /metrics/models on its internal port (gateway_nginx_internal_port); Prometheus runs on the gateway.
    with open(os.path.join(ROLE, "vars", "main.yml"), encoding="utf-8") as handle:
        path = yaml.safe_load(handle)["_gateway_prometheus_gateway_models_path"]
    assert path == "/metrics/models"
    config = yaml.safe_load(_render_role_template(
        "prometheus.yml.j2", gateway_prometheus_scrape_interval="15s", gateway_prometheus_scrape_timeout="",
        gateway_prometheus_evaluation_interval="15s", gateway_prometheus_external_labels={},
        gateway_prometheus_alertmanagers=[], gateway_prometheus_extra_scrape_configs=[],
        _gateway_prometheus_rules_file="/etc/prometheus/rules/rkllm_fleet.yml",
        _gateway_prometheus_file_sd_dir="/etc/prometheus/file_sd", _gateway_prometheus_gateway_models_path=path))
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["rkllm_gateway_models"]["metrics_path"] == "/metrics/models"
    assert jobs["rkllm_gateway_models"]["file_sd_configs"] == [{"files": ["/etc/prometheus/file_sd/rkllm_gateway_models.yml"]}]
    assert "metrics_path" not in jobs["rkllm_exo"]

    for context, port in (({"gateway_nginx_internal_port": 8181}, "8181"), ({}, "8081")):
        item = _gateway_models_job(**context)
        targets = yaml.safe_load(_render_role_template("file_sd.yml.j2", item=item, inventory_hostname="gw"))
        assert targets == [{"targets": ["127.0.0.1:%s" % port], "labels": {"gateway": "gw"}}], context

    item = _gateway_models_job(gateway_prometheus_scrape_gateway_models="false")
    assert yaml.safe_load(_render_role_template("file_sd.yml.j2", item=item, inventory_hostname="gw")) == []
