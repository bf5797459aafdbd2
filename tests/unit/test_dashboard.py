"""Static checks of the Grafana dashboard shipped with the gateway_prometheus role.

The dashboard must import as is (Grafana's export format with a DS_PROMETHEUS input) and every
query must name only metrics the fleet exports, so a renamed metric shows up here, not as an
empty panel on a user's screen.
"""

import json
import os
import re

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DASHBOARD = os.path.join(REPO, "roles", "gateway_prometheus", "files", "grafana", "rkllm-fleet.json")
NPU_EXPORTER = os.path.join(REPO, "roles", "npu", "files", "rknpu_exporter.py")

# exo-rkllm's /metrics (docs/REFERENCE: exo with the RKLLM engine); histograms get _bucket/_sum/_count.
EXO_METRICS = {
    "exo_requests_total", "exo_requests_in_progress", "exo_tokens_generated_total", "exo_prompt_tokens_total",
    "exo_tokens_per_second", "rkllm_server_up", "rkllm_http_requests_total", "exo_errors_total",
}
# Highest finite bucket of the fork's histograms (exo/api/prometheus_metrics.py, exo/inference/rkllm/metrics.py at
# 0c831d3): a quantile can't read above it. Generations routinely take longer than 30 s.
HISTOGRAM_TOP = {"rkllm_inference_duration_seconds": 30, "exo_first_token_latency_seconds": 60,
                 "exo_request_duration_seconds": 300, "rkllm_gateway_request_duration_seconds": 300}
EXO_HISTOGRAMS = {
    "exo_request_duration_seconds", "exo_first_token_latency_seconds",
    "rkllm_inference_duration_seconds", "rkllm_model_load_duration_seconds",
}
# Debian's prometheus-nginx-exporter on the gateway (gateway_nginx role).
NGINX_EXPORTER_METRICS = {
    "nginx_up", "nginx_connections_active", "nginx_connections_accepted", "nginx_connections_handled",
    "nginx_connections_reading", "nginx_connections_writing", "nginx_connections_waiting", "nginx_http_requests_total",
}
# The gateway's per-model metrics: nginx's /metrics/models on its internal port (gateway_nginx role, job
# rkllm_gateway_models); the request duration histogram's highest finite bucket is 300 s.
GATEWAY_MODEL_METRICS = {"rkllm_gateway_requests_total", "rkllm_gateway_pool_boards", "rkllm_gateway_pool_boards_configured"}
GATEWAY_MODEL_HISTOGRAMS = {"rkllm_gateway_request_duration_seconds"}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "inf", "nan"}


def npu_metrics():
    """The NPU metric names, read from the npu role's exporter (the source of truth) when it is there."""
    try:
        with open(NPU_EXPORTER, encoding="utf-8") as handle:
            source = handle.read()
    except OSError:
        return {"rknpu_load_ratio", "rknpu_frequency_hertz", "rknpu_driver_info", "rknpu_driver_version_meets_minimum"}
    return set(re.findall(r'"(rknpu_[a-z0-9_]+)":\s*\(', source))


def known_metric(name):
    if name == "up" or name.startswith("node_"):
        return True
    if name in EXO_METRICS or name in NGINX_EXPORTER_METRICS or name in GATEWAY_MODEL_METRICS or name in npu_metrics():
        return True
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base in EXO_HISTOGRAMS or base in GATEWAY_MODEL_HISTOGRAMS


def metric_names(expr):
    """Metric names used in a PromQL expression: identifiers that are not functions, keywords,
    labels (inside {...} or by/without/on/ignoring (...)), durations, strings or numbers."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


@pytest.fixture(scope="module")
def dashboard():
    with open(DASHBOARD, encoding="utf-8") as handle:
        return json.load(handle)


def query_panels(dashboard):
    panels = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def test_metric_names_parser():
    assert metric_names('sum by (board, le) (rate(exo_request_duration_seconds_bucket{board=~"$board"}[$__rate_interval]))') == {
        "exo_request_duration_seconds_bucket"}
    assert metric_names('up{job="rkllm_exo"} == 0 or nginx_up == 0') == {"up", "nginx_up"}
    assert metric_names("rknpu_load_ratio * 100 > bool 0.5") == {"rknpu_load_ratio"}
    assert metric_names('label_replace(made_up_metric, "a", "$1", "b", "(.*)")') == {"made_up_metric"}


def test_unknown_metric_is_caught():
    assert not known_metric("exo_tokens_per_sec")
    assert not known_metric("rknpu_load_percent_bogus")
    assert known_metric("exo_first_token_latency_seconds_bucket")
    assert not known_metric("exo_requests_in_progress_bucket")


def test_importable_as_is(dashboard):
    inputs = dashboard["__inputs"]
    assert [i["name"] for i in inputs] == ["DS_PROMETHEUS"]
    assert inputs[0]["type"] == "datasource" and inputs[0]["pluginId"] == "prometheus"
    assert dashboard["uid"] == "rkllm-fleet"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard.get("id") is None
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_board_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    board = variables["board"]
    assert board["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert "board" in board["definition"]
    assert board["multi"] and board["includeAll"]


def test_every_panel_queries_prometheus(dashboard):
    panels = query_panels(dashboard)
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), "%s: a target without expr" % panel["title"]
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_every_metric_is_exported_by_the_fleet(dashboard):
    unknown = {}
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            for name in metric_names(target["expr"]):
                if not known_metric(name):
                    unknown.setdefault(panel["title"], set()).add(name)
    assert not unknown, "metrics the fleet does not export: %r" % unknown


def test_dashboard_covers_the_fleet(dashboard):
    used = set()
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            used |= metric_names(target["expr"])
    for needed in ("exo_tokens_generated_total", "exo_requests_total", "exo_request_duration_seconds_bucket",
                   "exo_first_token_latency_seconds_bucket", "exo_requests_in_progress", "node_systemd_unit_state", "up",
                   "rknpu_load_ratio", "rknpu_frequency_hertz", "rkllm_gateway_requests_total", "rkllm_gateway_pool_boards",
                   "rkllm_gateway_request_duration_seconds_bucket", "rkllm_model_load_duration_seconds_count"):
        assert needed in used, needed
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            if names & (EXO_METRICS | {n + "_bucket" for n in EXO_HISTOGRAMS} | npu_metrics()):
                assert "$board" in target["expr"], "%s: not filtered by the board variable" % panel["title"]


def test_panels_use_the_metrics_as_they_really_behave(dashboard):
    """exo-rkllama's rkllm_server_up is 0 from exo's start until its first model load and changes only on a load, so
    no panel may show it as rkllama's state; a quantile of a histogram whose top bucket is below the times it measures
    reads that bucket, so where generations exceed it the panel shows a mean; the time-to-first-token panel says
    that for non-streamed models it is the whole generation."""
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert "rkllm_server_up" not in names, panel["title"]
            assert "rkllm_inference_duration_seconds_bucket" not in names, "%s: its top bucket is 30 s" % panel["title"]
            if names & {n + "_bucket" for n in HISTOGRAM_TOP}:
                top = [HISTOGRAM_TOP[n] for n in HISTOGRAM_TOP if n + "_bucket" in names][0]
                assert "%d s" % top in panel["description"], "%s: must say its quantiles stop at %d s" % (panel["title"], top)
    ttft = [p for p in query_panels(dashboard) if "first token" in p["title"].lower()]
    assert ttft and "whole generation" in ttft[0]["description"]
    assert any("mean" == t["legendFormat"].split()[-1] for t in ttft[0]["targets"])
