"""Prometheus text exposition of the fork's metric names (rkllm.fleet lab stand-in; stdlib only)."""

import threading

_LOCK = threading.Lock()
_HELP = {
    "exo_requests_total": ("counter", "Total chat completion requests"),
    "exo_requests_in_progress": ("gauge", "Chat completion requests in progress"),
    "exo_tokens_generated_total": ("counter", "Total tokens generated"),
    "exo_request_duration_seconds": ("histogram", "Request duration in seconds"),
    "exo_first_token_latency_seconds": ("histogram", "Time to first token in seconds"),
    "exo_tokens_per_second": ("gauge", "Tokens per second of the last request"),
    "rkllm_server_up": ("gauge", "Whether the RKLLAMA server answers (1) or not (0)"),
    "rkllm_inference_duration_seconds": ("histogram", "RKLLM inference duration in seconds"),
    "rkllm_model_load_duration_seconds": ("histogram", "RKLLM model load duration in seconds"),
}
_LABELLED = {"exo_requests_total", "exo_tokens_generated_total", "exo_tokens_per_second"}
_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))
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


def observe(name, value):
    with _LOCK:
        hist = _HISTS.setdefault(name, {"buckets": [0] * len(_BUCKETS), "sum": 0.0, "count": 0})
        for i, bound in enumerate(_BUCKETS):
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
                hist = _HISTS.get(name, {"buckets": [0] * len(_BUCKETS), "sum": 0.0, "count": 0})
                for bound, count in zip(_BUCKETS, hist["buckets"]):
                    le = "+Inf" if bound == float("inf") else repr(float(bound))
                    out.append(f"{name}_bucket{_labels((), {'le': le})} {count}")
                out.append(f"{name}_sum {hist['sum']}")
                out.append(f"{name}_count {hist['count']}")
                continue
            # prometheus_client: an unlabelled metric always shows a sample (0 at start); a labelled
            # one shows nothing until a label set is used (exo_tokens_per_second: the fork never sets it).
            series = _VALUES.get(name) or ({} if name in _LABELLED else {(): 0})
            for key, value in series.items():
                out.append(f"{name}{_labels(key)} {value}")
    return "\n".join(out) + "\n"
