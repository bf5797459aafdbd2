"""rkllm_model_pools spread over the boards (issue 14): deterministic, platform-aware, refused when it can't fit."""

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.rkllm.fleet.plugins.filter.pools import model_spread

QWEN, DEEPSEEK = 'Qwen2.5-1.5B-Instruct', 'DeepSeek-R1-1.5B'
# As the default catalog: DeepSeek-R1 has no rk3576 file.
CATALOG = [{'name': QWEN, 'files': {'rk3588': {}, 'rk3576': {}}}, {'name': DEEPSEEK, 'files': {'rk3588': {}}}]


def board(name, platform='rk3588', board_models=None, catalog=None):
    return {'name': name, 'platform': platform, 'catalog': CATALOG if catalog is None else catalog,
            'board_models': board_models}


LAB = [board('opi5'), board('rock5b'), board('rock4d', 'rk3576')]


def test_no_pools_assigns_nothing():
    assert model_spread(LAB, {}) == {}


def test_two_qwen_one_deepseek_keeps_deepseek_off_the_rk3576_board():
    spread = model_spread(LAB, {QWEN: 2, DEEPSEEK: 1})
    assert spread == {'opi5': DEEPSEEK, 'rock5b': QWEN, 'rock4d': QWEN}


def test_the_model_fewest_boards_run_is_placed_first_whatever_the_dict_order():
    # Qwen first in inventory order would take both RK3588 boards and leave DeepSeek only the RK3576 one.
    boards = [board('rock4d', 'rk3576'), board('opi5'), board('rock5b')]
    assert model_spread(boards, {QWEN: 2, DEEPSEEK: 1}) == {'rock4d': QWEN, 'opi5': DEEPSEEK, 'rock5b': QWEN}
    assert model_spread(boards, {DEEPSEEK: 1, QWEN: 2}) == model_spread(boards, {QWEN: 2, DEEPSEEK: 1})


def test_boards_beyond_the_counts_are_left_to_their_own_assignment():
    spread = model_spread(LAB + [board('opi5-b')], {DEEPSEEK: 1, QWEN: 1})
    assert spread == {'opi5': DEEPSEEK, 'rock5b': QWEN}


def test_an_earlier_board_moves_only_when_a_later_one_is_the_only_fit():
    # rock4d can run only Qwen; opi5 gives Qwen up for DeepSeek so both pools fill.
    boards = [board('opi5'), board('rock4d', 'rk3576')]
    assert model_spread(boards, {QWEN: 1, DEEPSEEK: 1}) == {'opi5': DEEPSEEK, 'rock4d': QWEN}


def test_the_same_inventory_gives_the_same_spread():
    assert model_spread(list(LAB), {QWEN: 2, DEEPSEEK: 1}) == model_spread(list(LAB), {QWEN: 2, DEEPSEEK: 1})


def test_more_deepseek_boards_than_can_run_it_is_refused_naming_the_rk3576_board():
    with pytest.raises(AnsibleFilterError) as info:
        model_spread(LAB, {DEEPSEEK: 3})
    msg = str(info.value)
    assert 'asks for 3 boards serving DeepSeek-R1-1.5B, but only 2 can run it (opi5, rock5b)' in msg
    assert 'rock4d (rk3576)' in msg


def test_a_board_that_does_not_get_the_model_does_not_count():
    boards = [board('opi5', board_models=[QWEN]), board('rock5b'), board('rock4d', 'rk3576')]
    with pytest.raises(AnsibleFilterError, match=r'only 1 can run it \(rock5b\)'):
        model_spread(boards, {DEEPSEEK: 2})


def test_more_boards_than_the_inventory_has_is_refused():
    with pytest.raises(AnsibleFilterError, match='asks for 4 boards in all .* the inventory has 3'):
        model_spread(LAB, {QWEN: 3, DEEPSEEK: 1})


def test_a_name_not_in_the_catalog_is_refused_with_the_catalog():
    with pytest.raises(AnsibleFilterError, match="names 'qwen2.5-1.5b-instruct-rkllm', which is not in the model catalog"):
        model_spread(LAB, {'qwen2.5-1.5b-instruct-rkllm': 1})


@pytest.mark.parametrize('count', [-1, 'two', 1.5, True])
def test_a_count_that_is_not_a_whole_number_is_refused(count):
    with pytest.raises(AnsibleFilterError, match='must be a whole number of boards'):
        model_spread(LAB, {QWEN: count})


def test_a_board_without_an_rkllm_platform_runs_nothing():
    boards = [board('pi', None), board('opi5')]
    assert model_spread(boards, {QWEN: 1}) == {'opi5': QWEN}
    with pytest.raises(AnsibleFilterError, match=r'pi \(no RKLLM platform\)'):
        model_spread(boards, {QWEN: 2})


def test_counts_that_each_fit_but_not_together_are_refused():
    # X and Y each have a board (a), and there are two boards, but b runs neither.
    catalog = [{'name': 'X', 'files': {'rk3576': {}}}, {'name': 'Y', 'files': {'rk3576': {}}},
               {'name': 'Z', 'files': {'rk3588': {}}}]
    boards = [board('a', 'rk3576', catalog=catalog), board('b', 'rk3588', catalog=catalog)]
    with pytest.raises(AnsibleFilterError, match='can not be spread over the boards: 1 for [XY] left without a board'):
        model_spread(boards, {'X': 1, 'Y': 1})
