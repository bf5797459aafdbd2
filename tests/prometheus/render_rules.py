"""Render the gateway_prometheus role's alert rules for the promtool unit tests next to this file.

    python3 tests/prometheus/render_rules.py [--template PATH] OUTPUT_DIR

writes OUTPUT_DIR/rkllm_fleet.rules.yml and a copy of rkllm_fleet_rules_test.yml beside it, so
`promtool test rules OUTPUT_DIR/rkllm_fleet_rules_test.yml` runs anywhere promtool is (the lab's
gateway has the one that evaluates the rules in production). The values are the ones the tests
are written for: the role's defaults, and boards b1, b2, b4 with the collection's exo patches,
b3 without them (exo_patches_enabled: false). Rendered like Ansible's template module does
(trim_blocks), with the two Ansible filters the template uses.
"""

import argparse
import os
import re
import shutil
import sys

import jinja2

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TEMPLATE = os.path.join(REPO, "roles", "gateway_prometheus", "templates", "rkllm_fleet.rules.yml.j2")
TESTS = os.path.join(HERE, "rkllm_fleet_rules_test.yml")

VALUES = {
    "ansible_managed": "Ansible managed (rendered for the promtool unit tests)",
    "gateway_prometheus_alert_for": "1m",
    "gateway_prometheus_min_tokens_per_second": 5,
    "gateway_prometheus_max_model_loads": 2,
    "gateway_prometheus_boards": ["b1", "b2", "b3", "b4"],
    "hostvars": {
        "b1": {"exo_patches_enabled": True},
        "b2": {},
        "b3": {"exo_patches_enabled": False},
        "b4": {"exo_patches_enabled": "true"},
    },
}


def to_bool(value):
    """Ansible's bool filter."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("yes", "on", "1", "true", "y", "t")


def render(template=TEMPLATE, values=None):
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["bool"] = to_bool
    env.filters["regex_escape"] = re.escape
    with open(template, encoding="utf-8") as handle:
        return env.from_string(handle.read()).render(**(values or VALUES))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default=TEMPLATE, help="the rules template (default: the role's)")
    parser.add_argument("output_dir")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "rkllm_fleet.rules.yml"), "w", encoding="utf-8") as handle:
        handle.write(render(args.template))
    shutil.copy(TESTS, os.path.join(args.output_dir, "rkllm_fleet_rules_test.yml"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
