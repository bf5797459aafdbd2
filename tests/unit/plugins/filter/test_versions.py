"""Version ordering and the runtime ABI families that decide which runtime a pinned rkllama can use."""

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.rkllm.fleet.plugins.filter import versions as v


@pytest.mark.parametrize('version,family', [
    ('1.0.1', '1.1'), ('1.1.0', '1.1'), ('1.1.4', '1.1'),
    ('1.2.0', '1.2'), ('1.2.1', '1.2'), ('1.2.2', '1.2'), ('1.2.3', '1.2'), ('v1.2.3', '1.2'), ('release-v1.2.3', '1.2'),
    ('1.3.0', '1.3'), ('1.3.5', '1.3'),
    ('1.1.5', None), ('1.2.4', None), ('1.4.0', None), ('2.0.0', None),
])
def test_abi_family(version, family):
    assert v.abi_family(version) == family


def test_the_pinned_rkllama_abi_rejects_1_1_4_and_1_3_0():
    pinned = '1.2'  # jfreed-dev/rkllama 1d8d210 ships ctypes structs for 1.2.3
    assert v.abi_family('1.2.3') == pinned
    assert v.abi_family('1.1.4') != pinned
    assert v.abi_family('1.3.0') != pinned


@pytest.mark.parametrize('bad', ['latest', '1.2', '1.2.3.4', '', 'v1.2.x'])
def test_abi_family_refuses_what_is_not_a_version(bad):
    with pytest.raises(AnsibleFilterError, match='not an RKLLM version'):
        v.abi_family(bad)


def test_version_sort_is_numeric():
    assert v.version_sort(['1.2.10', '1.1.4', '1.2.2', '1.2.9']) == ['1.1.4', '1.2.2', '1.2.9', '1.2.10']
    assert v.version_sort(['1.2.2', '1.2.10'], reverse=True) == ['1.2.10', '1.2.2']


def test_filters_are_registered():
    names = set(v.FilterModule().filters())
    assert names == {'abi_family', 'version_sort', 'board_arch', 'mirror_url', 'artifact_relpath'}


def test_url_filters():
    url = 'https://github.com/airockchip/rknn-llm/raw/release-v1.2.3/rkllm-runtime/Linux/librkllm_api/aarch64/librkllmrt.so'
    rel = 'github.com/airockchip/rknn-llm/raw/release-v1.2.3/rkllm-runtime/Linux/librkllm_api/aarch64/librkllmrt.so'
    assert v.artifact_relpath(url) == rel
    assert v.mirror_url(url, 'http://rkllm-lab-upstream:8000') == 'http://rkllm-lab-upstream:8000/' + rel
    assert v.mirror_url(url) == url
    with pytest.raises(AnsibleFilterError):
        v.artifact_relpath('not a url')


def test_board_arch_filter():
    assert v.board_arch('armv7l') == {'name': 'armhf', 'elf_machine': 'arm'}
    assert v.board_arch('mips') is None
