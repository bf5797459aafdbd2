"""Prometheus text exposition of the fork's metrics (rkllm.fleet lab stand-in; stdlib only).

Names, labels and buckets as exo-rkllama 0c831d3 declares them: exo/api/prometheus_metrics.py:14-60,107-111
and exo/inference/rkllm/metrics.py:14-39 (prometheus_client).
"""

import threading

# Lab patch 0002-stream-metrics flips this (the fork's fix: roles/exo/files/patches/<commit>/0002-stream-metrics.patch).
# False = the fork: a streamed request adds only its last batch (1 token) to exo_tokens_generated_total
# (chatgpt_api.py:413,440) and the engine's streaming path records no rkllm_inference_duration_seconds
# (rkllm_engine.py:405-419 has no observe; only the plain path does, rkllm_engine.py:285-287).
LAB_PATCH_STREAM_METRICS = False

_LOCK = threading.Lock()
_HELP = {
    "exo_requests_total": ("counter", "Total number of inference requests"),
    "exo_requests_in_progress": ("gauge", "Number of requests currently being processed"),
    "exo_tokens_generated_total": ("counter", "Total number of tokens generated"),
    "exo_prompt_tokens_total": ("counter", "Total number of prompt tokens processed"),
    "exo_request_duration_seconds": ("histogram", "Request latency in seconds"),
    "exo_first_token_latency_seconds": ("histogram", "Time to first token in seconds"),
    "exo_tokens_per_second": ("gauge", "Current token generation rate"),
    "exo_nodes_active": ("gauge", "Number of active nodes in cluster"),
    "exo_errors_total": ("counter", "Total number of errors"),
    "rkllm_server_up": ("gauge", "RKLLAMA server availability (1=up, 0=down)"),
    "rkllm_http_requests_total": ("counter", "Total HTTP requests to RKLLAMA server"),
    "rkllm_inference_duration_seconds": ("histogram", "RKLLM inference call duration in seconds"),
    "rkllm_model_load_duration_seconds": ("histogram", "Time to load model on RKLLM server"),
}
_LABELLED = {"exo_requests_total", "exo_tokens_generated_total", "exo_prompt_tokens_total", "exo_tokens_per_second",
             "exo_errors_total", "rkllm_http_requests_total"}
# The fork's buckets (highest finite: request 300 s, first token 60 s, inference 30 s, load 300 s).
_BUCKETS = {
    "exo_request_duration_seconds": (.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300),      # prometheus_metrics.py:45-49
    "exo_first_token_latency_seconds": (.05, .1, .25, .5, 1, 2, 5, 10, 30, 60),         # prometheus_metrics.py:51-55
    "rkllm_inference_duration_seconds": (.01, .05, .1, .25, .5, 1, 2, 5, 10, 30),       # rkllm/metrics.py:29-33
    "rkllm_model_load_duration_seconds": (1, 5, 10, 30, 60, 120, 300),                  # rkllm/metrics.py:35-39
}
_VALUES = {}
_HISTS = {}


def _key(labels):
    return tuple(sorted((labels or {}).items()))


def inc(name, amount, labels=None):
    with _LOCK:
        series = _VALUES.setdefault(name, {})
        series[_key(labels)] = series.get(_key(labels), 0) + amount


def set_gauge(name, value, labels=None):
    with _LOCK:
        _VALUES.setdefault(name, {})[_key(labels)] = value


def _bounds(name):
    return tuple(_BUCKETS[name]) + (float("inf"),)


def observe(name, value):
    with _LOCK:
        bounds = _bounds(name)
        hist = _HISTS.setdefault(name, {"buckets": [0] * len(bounds), "sum": 0.0, "count": 0})
        for i, bound in enumerate(bounds):
            if value <= bound:
                hist["buckets"][i] += 1
        hist["sum"] += value
        hist["count"] += 1


def _labels(key, extra=None):
    items = list(key) + list((extra or {}).items())
    return "{" + ",".join(f'{k}="{v}"' for k, v in items) + "}" if items else ""


def render():
    out = []
    with _LOCK:
        for name, (kind, text) in _HELP.items():
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            if kind == "histogram":
                bounds = _bounds(name)
                hist = _HISTS.get(name, {"buckets": [0] * len(bounds), "sum": 0.0, "count": 0})
                for bound, count in zip(bounds, hist["buckets"]):
                    le = "+Inf" if bound == float("inf") else repr(float(bound))
                    out.append(f"{name}_bucket{_labels((), {'le': le})} {count}")
                out.append(f"{name}_sum {hist['sum']}")
                out.append(f"{name}_count {hist['count']}")
                continue
            # prometheus_client: an unlabelled metric always shows a sample (0 at start: rkllm_server_up
            # reads 0 until the first model load sets it, rkllm_engine.py:504-506); a labelled one shows
            # nothing until a label set is used (exo_tokens_per_second: the fork never sets it).
            series = _VALUES.get(name) or ({} if name in _LABELLED else {(): 0})
            for key, value in series.items():
                out.append(f"{name}{_labels(key)} {value}")
    return "\n".join(out) + "\n"
