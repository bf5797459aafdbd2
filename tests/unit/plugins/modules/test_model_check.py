# -*- coding: utf-8 -*-
# Copyright: rkllm.fleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tests for the rkllm.fleet.model_check module against a fake of rkllama's old API.

The fake (FakeRkllama, in tests/unit/plugins/module_utils/test_rkllama_api.py) answers like
the jfreed-dev fork at 1d8d210 and records every request and whether each token stream was
read to its end. Every test that generates checks that the stream was.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from ansible_collections.rkllm.fleet.plugins.module_utils.rkllama_api import RkllamaClient
from ansible_collections.rkllm.fleet.plugins.modules import model_check
from ansible_collections.rkllm.fleet.plugins.modules.model_check import CheckFailed, check_model

try:
    from ansible.module_utils.testing import patch_module_args
except ImportError:  # ansible-core < 2.19
    import contextlib
    from unittest import mock

    from ansible.module_utils import basic

    @contextlib.contextmanager
    def patch_module_args(args):
        with mock.patch.object(basic, '_ANSIBLE_ARGS', json.dumps({'ANSIBLE_MODULE_ARGS': args}).encode()):
            yield


def _load_fake():
    path = os.path.join(os.path.dirname(__file__), '..', 'module_utils', 'test_rkllama_api.py')
    spec = importlib.util.spec_from_file_location('rkllama_fake', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fake_api = _load_fake()
FakeRkllama = fake_api.FakeRkllama
QWEN = fake_api.QWEN
DEEPSEEK = fake_api.DEEPSEEK
ANSWER = 'The capital of France is Paris.'


@pytest.fixture
def fake():
    server = FakeRkllama().start()
    yield server
    server.stop()


def run_check(fake, model=QWEN, timeout=10, **kwargs):
    return check_model(RkllamaClient(fake.url, timeout), model, **kwargs)


def fail_check(fake, model=QWEN, timeout=10, **kwargs):
    with pytest.raises(CheckFailed) as info:
        run_check(fake, model, timeout, **kwargs)
    return info.value


def assert_streams_read_to_end(fake, count):
    streams = fake.wait_streams(count)
    assert len(streams) == count
    assert all(stream['read_to_end'] for stream in streams), streams


def run_module(args, capsys):
    with patch_module_args(args):
        with pytest.raises(SystemExit) as info:
            model_check.main()
    output = json.loads(capsys.readouterr().out)
    return info.value.code, output


# -- the usual paths ---------------------------------------------------------------------------


def test_fresh_load_loads_generates_and_reports_figures(fake):
    fake.load_seconds = 0.2
    fake.first_token_delay = 0.1
    fake.reported_tps = 7.9
    result = run_check(fake)
    assert result['changed'] is True
    assert result['loaded'] is True
    assert result['previously_loaded'] is None
    assert result['load_seconds'] >= 0.2
    assert result['time_to_first_token'] >= 0.1
    assert result['tokens_per_second'] == 7.9
    assert result['completion_tokens'] == 7
    assert result['response'] == ANSWER
    assert result['msg'].startswith('Loaded %s in ' % QWEN)
    assert fake.current == QWEN
    assert fake.posts() == ['/load_model', '/generate']
    assert_streams_read_to_end(fake, 1)


def test_already_loaded_model_is_not_reloaded(fake):
    fake.current = QWEN
    result = run_check(fake)
    assert result['changed'] is False
    assert result['loaded'] is True
    assert result['previously_loaded'] == QWEN
    assert result['load_seconds'] is None
    assert result['response'] == ANSWER
    assert fake.posts() == ['/generate']
    assert_streams_read_to_end(fake, 1)


def test_other_model_without_replace_fails_naming_it_and_leaves_it_loaded(fake):
    fake.current = DEEPSEEK
    failure = fail_check(fake)
    assert DEEPSEEK in failure.msg and 'replace' in failure.msg
    assert failure.result['previously_loaded'] == DEEPSEEK
    assert failure.result['loaded'] is False
    assert failure.result['changed'] is False
    assert fake.current == DEEPSEEK
    assert fake.posts() == []


def test_replace_unloads_the_other_model_and_loads(fake):
    fake.current = DEEPSEEK
    result = run_check(fake, replace=True)
    assert result['changed'] is True
    assert result['loaded'] is True
    assert result['previously_loaded'] == DEEPSEEK
    assert fake.current == QWEN
    assert fake.posts() == ['/unload_model', '/load_model', '/generate']
    assert result['msg'].startswith('Unloaded %s and loaded %s' % (DEEPSEEK, QWEN))
    assert_streams_read_to_end(fake, 1)


def test_after_a_swap_the_next_check_changes_nothing(fake):
    # A client made the board load DeepSeek; the first check swaps Qwen back, the re-run only tests it.
    fake.current = DEEPSEEK
    assert run_check(fake, replace=True)['changed'] is True
    again = run_check(fake, replace=True)
    assert again['changed'] is False
    assert again['previously_loaded'] == QWEN and again['load_seconds'] is None
    assert fake.posts() == ['/unload_model', '/load_model', '/generate', '/generate']
    assert_streams_read_to_end(fake, 2)


def test_replace_puts_the_previous_model_back_when_the_new_one_fails(fake):
    fake.current = DEEPSEEK
    fake.models[QWEN] = 'init-fails'
    failure = fail_check(fake, replace=True)
    assert 'failed to initialise %s' % QWEN in failure.msg
    assert '%s was loaded back' % DEEPSEEK in failure.msg
    assert fake.current == DEEPSEEK
    assert failure.result['loaded'] is False
    assert fake.posts() == ['/unload_model', '/load_model', '/load_model']


def test_replace_says_when_the_npu_is_left_empty(fake):
    fake.current = DEEPSEEK
    fake.models[QWEN] = 'init-fails'
    fake.models[DEEPSEEK] = 'init-fails'
    failure = fail_check(fake, replace=True)
    assert 'no model is loaded now' in failure.msg
    assert fake.current is None


# -- each failure, one sentence ---------------------------------------------------------------


def test_html_500_on_load_means_the_runtime_failed_to_initialise(fake):
    fake.models['Qwen2.5-1.5B-Instruct-rk3576'] = 'init-fails'
    failure = fail_check(fake, 'Qwen2.5-1.5B-Instruct-rk3576')
    assert 'failed to initialise Qwen2.5-1.5B-Instruct-rk3576' in failure.msg
    assert 'another platform' in failure.msg and 'out of memory' in failure.msg
    assert 'journalctl -u rkllama' in failure.msg and 'E rkllm:' in failure.msg
    assert '<html' not in failure.msg
    assert failure.result['loaded'] is False and failure.result['changed'] is False
    assert fake.current is None


def test_missing_model_lists_what_the_board_has(fake):
    failure = fail_check(fake, 'Llama-3-8B')
    assert 'Llama-3-8B is not on the board' in failure.msg
    assert '%s, %s' % (DEEPSEEK, QWEN) in failure.msg


def test_missing_modelfile(fake):
    fake.models['Bare'] = 'no-modelfile'
    failure = fail_check(fake, 'Bare')
    assert 'Bare has no Modelfile' in failure.msg
    assert 'HUGGINGFACE_PATH' in failure.msg


def test_modelfile_without_from(fake):
    fake.models['Spaced'] = 'bad-modelfile'
    failure = fail_check(fake, 'Spaced')
    assert 'lacks FROM or HUGGINGFACE_PATH' in failure.msg and 'KEY="value"' in failure.msg


def test_connection_refused_asks_whether_the_service_runs():
    port = fake_api.free_port()
    with pytest.raises(CheckFailed) as info:
        check_model(RkllamaClient('http://127.0.0.1:%d' % port, 5), QWEN)
    assert 'not answering at http://127.0.0.1:%d' % port in info.value.msg
    assert 'rkllama.service' in info.value.msg and 'journalctl -u rkllama' in info.value.msg


def test_another_program_on_the_port(fake):
    fake.not_rkllama = '404'
    failure = fail_check(fake)
    assert 'GET / returned HTTP 404' in failure.msg and 'url' in failure.msg


def test_generation_timeout_reports_partial_figures_and_the_leak(fake):
    fake.current = QWEN
    fake.tokens = ['tok'] * 100
    fake.token_delay = 0.1
    failure = fail_check(fake, timeout=0.6)
    assert 'did not finish answering within the 0.6 s timeout' in failure.msg
    assert 'keeps running on the board' in failure.msg and 'restart rkllama.service' in failure.msg
    assert failure.result['completion_tokens'] >= 1
    assert failure.result['response'].startswith('tok')


def test_load_timeout(fake):
    fake.load_seconds = 1.5
    failure = fail_check(fake, timeout=0.4)
    assert 'did not finish loading within the 0.4 s timeout' in failure.msg
    assert 'raise timeout' in failure.msg


def test_below_min_tokens_per_second_gives_the_figures(fake):
    fake.current = QWEN
    fake.reported_tps = 3.1
    failure = fail_check(fake, min_tokens_per_second=5)
    assert '7 tokens at 3.1 tokens/s, below min_tokens_per_second 5' in failure.msg
    assert failure.result['tokens_per_second'] == 3.1
    assert_streams_read_to_end(fake, 1)


def test_min_tokens_per_second_met(fake):
    fake.current = QWEN
    fake.reported_tps = 8.0
    result = run_check(fake, min_tokens_per_second=7.5)
    assert result['tokens_per_second'] == 8.0


def test_tokens_per_second_computed_when_the_server_sends_none(fake):
    fake.current = QWEN
    fake.reported_tps = 0
    fake.token_delay = 0.03
    result = run_check(fake)
    assert 5 < result['tokens_per_second'] <= 34


def test_empty_generation_fails(fake):
    fake.current = QWEN
    fake.tokens = []
    failure = fail_check(fake)
    assert 'held no text' in failure.msg and 'E rkllm:' in failure.msg
    assert_streams_read_to_end(fake, 1)


def test_html_500_on_generate_points_at_the_tokenizer(fake):
    fake.current = QWEN
    fake.generate_error = 'html500'
    failure = fail_check(fake)
    assert 'HTTP 500 on /generate' in failure.msg and 'HF_HUB_OFFLINE' in failure.msg


def test_crash_while_generating(fake):
    fake.current = QWEN
    fake.crash_after = 2
    failure = fail_check(fake)
    assert 'stopped answering' in failure.msg and 'journalctl -u rkllama' in failure.msg


def test_model_loaded_by_another_client_in_between_is_used(fake):
    fake.race_loads = QWEN
    result = run_check(fake)
    assert result['changed'] is False
    assert result['loaded'] is True
    assert result['response'] == ANSWER


def test_other_model_loaded_by_another_client_in_between_is_left_alone(fake):
    fake.race_loads = DEEPSEEK
    failure = fail_check(fake)
    assert 'Another client loaded %s' % DEEPSEEK in failure.msg
    assert fake.current == DEEPSEEK


def test_every_stream_is_read_to_its_end_over_several_checks(fake):
    fake.tokens = ['word '] * 30
    fake.token_delay = 0.001
    for _attempt in range(3):
        result = run_check(fake)
        assert result['completion_tokens'] == 30
    assert_streams_read_to_end(fake, 3)


def test_long_response_is_shortened(fake):
    fake.current = QWEN
    fake.tokens = ['word '] * 200
    fake.token_delay = 0
    result = run_check(fake)
    assert len(result['response']) <= model_check.RESPONSE_MAX_CHARS
    assert result['response'].endswith('...')
    assert result['completion_tokens'] == 200


# -- the module as Ansible runs it ------------------------------------------------------------


def test_module_fresh_load(fake, capsys):
    code, output = run_module({'url': fake.url, 'model': QWEN, 'timeout': 10}, capsys)
    assert code == 0
    assert output['changed'] is True and output['loaded'] is True
    assert output['response'] == ANSWER
    assert set(output) >= {'loaded', 'previously_loaded', 'load_seconds', 'time_to_first_token', 'tokens_per_second',
                           'completion_tokens', 'response', 'msg'}
    assert_streams_read_to_end(fake, 1)


def test_module_failure_is_one_message_with_the_state(fake, capsys):
    fake.current = DEEPSEEK
    code, output = run_module({'url': fake.url, 'model': QWEN}, capsys)
    assert code == 1
    assert output['failed'] is True
    assert output['previously_loaded'] == DEEPSEEK and DEEPSEEK in output['msg']


@pytest.mark.parametrize('current, replace, expected', [
    (None, False, 'Would load %s' % QWEN),
    (DEEPSEEK, True, 'Would unload %s and load %s' % (DEEPSEEK, QWEN)),
])
def test_check_mode_only_reads(fake, capsys, current, replace, expected):
    fake.current = current
    code, output = run_module({'url': fake.url, 'model': QWEN, 'replace': replace, '_ansible_check_mode': True}, capsys)
    assert code == 0
    assert output['changed'] is True
    assert output['msg'].startswith(expected)
    assert output['load_seconds'] is None and output['response'] is None
    assert fake.posts() == []
    assert all(method == 'GET' for method, _path, _body in fake.requests)
    assert fake.current == current


def test_check_mode_with_the_model_loaded_changes_nothing(fake, capsys):
    fake.current = QWEN
    code, output = run_module({'url': fake.url, 'model': QWEN, '_ansible_check_mode': True}, capsys)
    assert code == 0
    assert output['changed'] is False and output['loaded'] is True
    assert fake.posts() == []


def test_check_mode_predicts_a_missing_model(fake, capsys):
    code, output = run_module({'url': fake.url, 'model': 'Llama-3-8B', '_ansible_check_mode': True}, capsys)
    assert code == 1
    assert 'Llama-3-8B is not on the board' in output['msg']
    assert fake.posts() == []


def test_check_mode_still_refuses_another_model_without_replace(fake, capsys):
    fake.current = DEEPSEEK
    code, output = run_module({'url': fake.url, 'model': QWEN, '_ansible_check_mode': True}, capsys)
    assert code == 1
    assert DEEPSEEK in output['msg']


def test_module_rejects_a_url_without_scheme(capsys):
    code, output = run_module({'url': '127.0.0.1:8080', 'model': QWEN}, capsys)
    assert code == 1
    assert 'url must start with http://' in output['msg']


def test_time_to_first_token_and_rate_ignore_a_token_left_by_an_earlier_answer(fake):
    """The unpatched fork sends the last token of the previous answer at once: not this answer's first token."""
    fake.current = QWEN
    fake.stale = [' Done.']
    fake.first_token_delay = 0.3
    fake.token_delay = 0.05
    result = run_check(fake)
    assert result['time_to_first_token'] >= 0.3  # the leftover came after about 0.005 s
    assert result['stale_tokens'] == 1
    assert result['response'] == ANSWER
    assert result['completion_tokens'] == 7
    assert 10 < result['tokens_per_second'] <= 20.5  # 6 intervals of at least 50 ms
    assert "1 token(s) of an earlier answer, ' Done.'" in result['msg']
    assert_streams_read_to_end(fake, 1)
