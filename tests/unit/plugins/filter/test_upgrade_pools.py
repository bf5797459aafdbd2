"""upgrade.yml's pool guard (issues 14 and 16): what the gateway serves, and the pools a drain would leave empty."""

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.rkllm.fleet.plugins.filter.upgrade_pools import gateway_pools, pool_outages

QWEN, DEEPSEEK = 'Qwen2.5-1.5B-Instruct', 'DeepSeek-R1-1.5B'

# As roles/gateway_nginx writes it: one upstream per served model, one server line per board.
POOLS_CONF = """
http {
    upstream rkllm_pool_qwen2_5_1_5b_instruct {
        # Qwen2.5-1.5B-Instruct (qwen2.5-1.5b-instruct-rkllm). Shared state, so least_conn holds across workers.
        zone rkllm_pool_qwen2_5_1_5b_instruct 64k;
        least_conn;
        server 172.18.0.3:52415 max_fails=3 fail_timeout=30s; # board opi5
        server 172.18.0.4:52415 max_fails=3 fail_timeout=30s down; # board rock4d
        keepalive 32;
    }

    upstream rkllm_pool_deepseek_r1_1_5b {
        # DeepSeek-R1-1.5B (deepseek-r1-1.5b-rkllm). Shared state, so least_conn holds across workers.
        zone rkllm_pool_deepseek_r1_1_5b 64k;
        least_conn;
        server 172.18.0.5:52415 max_fails=3 fail_timeout=30s; # board rock5b
        keepalive 32;
    }

    upstream rkllm_mirror_upstream {
        server 172.18.0.9:8000;
    }
    server {
        location /v1/ { js_content rkllm_router.route; }
    }
}
"""

# Before the model-aware gateway: every board in one upstream.
ONE_POOL_CONF = """
    upstream rkllm_boards {
        zone rkllm_boards 256k;
        least_conn;
        server 172.18.0.3:52415 max_fails=3 fail_timeout=30s; # board opi5
        server 172.18.0.5:52415 max_fails=3 fail_timeout=30s max_conns=2 down; # board rock5b
    }
"""


def test_reads_each_boards_pool_and_drain_mark():
    assert gateway_pools(POOLS_CONF) == {
        'opi5': {'pool': QWEN, 'upstream': 'rkllm_pool_qwen2_5_1_5b_instruct', 'drained': False},
        'rock4d': {'pool': QWEN, 'upstream': 'rkllm_pool_qwen2_5_1_5b_instruct', 'drained': True},
        'rock5b': {'pool': DEEPSEEK, 'upstream': 'rkllm_pool_deepseek_r1_1_5b', 'drained': False},
    }


def test_reads_the_single_upstream_of_an_older_gateway():
    assert gateway_pools(ONE_POOL_CONF) == {
        'opi5': {'pool': 'rkllm_boards', 'upstream': 'rkllm_boards', 'drained': False},
        'rock5b': {'pool': 'rkllm_boards', 'upstream': 'rkllm_boards', 'drained': True},
    }


def test_refuses_what_is_not_a_configuration():
    with pytest.raises(AnsibleFilterError, match='nginx.conf'):
        gateway_pools(None)


def test_draining_the_last_ready_board_of_a_pool_is_an_outage():
    # rock4d is drained already, so opi5 is Qwen's last board in service.
    assert pool_outages(gateway_pools(POOLS_CONF), ['opi5']) == [{'pool': QWEN, 'ready': ['opi5'], 'drained': ['opi5']}]
    assert pool_outages(gateway_pools(POOLS_CONF), ['rock5b']) == [
        {'pool': DEEPSEEK, 'ready': ['rock5b'], 'drained': ['rock5b']}]


def test_a_pool_with_another_ready_board_is_no_outage():
    conf = POOLS_CONF.replace(' down; # board rock4d', '; # board rock4d')
    assert pool_outages(gateway_pools(conf), ['opi5']) == []


def test_a_board_failed_in_this_run_does_not_count_as_ready():
    conf = POOLS_CONF.replace(' down; # board rock4d', '; # board rock4d')
    assert pool_outages(gateway_pools(conf), ['opi5'], ['rock4d']) == [{'pool': QWEN, 'ready': ['opi5'], 'drained': ['opi5']}]


def test_draining_a_whole_batch_empties_every_pool_it_covers():
    assert [o['pool'] for o in pool_outages(gateway_pools(POOLS_CONF), ['opi5', 'rock5b'])] == [DEEPSEEK, QWEN]


def test_a_pool_already_without_a_ready_board_is_not_reported():
    conf = POOLS_CONF.replace('fail_timeout=30s; # board rock5b', 'fail_timeout=30s down; # board rock5b')
    assert pool_outages(gateway_pools(conf), ['rock5b']) == []


def test_no_drain_no_outage():
    assert pool_outages(gateway_pools(POOLS_CONF), []) == []
