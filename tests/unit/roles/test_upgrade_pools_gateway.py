"""upgrade.yml reads the gateway's pools from the nginx.conf the gateway_nginx role really renders (issue 14).

The configuration is rendered by the role's own tasks and template (test_gateway_routing.run_role: b1 and b2
serve Qwen, b3 DeepSeek-R1); rkllm.fleet.gateway_pools must find each board's pool and drain mark in it, and
rkllm.fleet.pool_outages must refuse draining the last board in service of a pool.
"""

import importlib.util
import os

import pytest

from ansible_collections.rkllm.fleet.plugins.filter.upgrade_pools import gateway_pools, pool_outages

QWEN, DEEPSEEK = 'Qwen2.5-1.5B-Instruct', 'DeepSeek-R1-1.5B'


def _routing():
    path = os.path.join(os.path.dirname(__file__), "test_gateway_routing.py")
    spec = importlib.util.spec_from_file_location("rkllm_test_gateway_routing_for_upgrade", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def b2_drained(tmp_path_factory, run_play):
    res, files = _routing().run_role(run_play, tmp_path_factory.mktemp("upgrade-pools"), {"gateway_nginx_drained": ["b2"]})
    assert res.returncode == 0, res.stdout + res.stderr
    return files["nginx.conf"]


def test_reads_the_rendered_pools_and_drain_marks(b2_drained):
    assert {b: (v['pool'], v['drained']) for b, v in gateway_pools(b2_drained).items()} == {
        'b1': (QWEN, False), 'b2': (QWEN, True), 'b3': (DEEPSEEK, False)}


def test_refuses_draining_the_last_board_in_service_of_each_pool(b2_drained):
    gateway = gateway_pools(b2_drained)
    assert [o['pool'] for o in pool_outages(gateway, ['b3'])] == [DEEPSEEK]
    # b2 is drained already, so b1 is Qwen's last board in service.
    assert [o['pool'] for o in pool_outages(gateway, ['b1'])] == [QWEN]
    assert pool_outages(gateway, ['b2']) == []
