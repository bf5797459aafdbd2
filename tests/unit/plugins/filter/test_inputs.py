"""Catalog, environment and argument validation, and the quoting of values for unit files.

Every bad value is refused with a sentence that names the variable (and field) and shows the value.
"""

import copy

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.rkllm.fleet.plugins.filter import inputs as f

COMMIT = '989aa7980e4cf806f80c7fef2b1adb7bc71aa306'
SHA = 'a' * 64


def entry(**over):
    e = {
        'name': 'Qwen2.5-1.5B-Instruct',
        'tokenizer': {'repo': 'Qwen/Qwen2.5-1.5B-Instruct', 'revision': COMMIT,
                      'files': ['config.json', 'tokenizer.json', {'name': 'vocab.json', 'sha256': SHA}]},
        'files': {
            'rk3588': {'repo': 'c01zaut/Qwen2.5-1.5B-Instruct-RK3588-1.1.4', 'revision': 'main',
                       'file': 'Qwen2.5-1.5B-Instruct-rk3588.rkllm', 'sha256': SHA},
            'rk3576': {'repo': 'HanzoHuang/Qwen2.5-1.5B-Instruct-RKLLM', 'revision': COMMIT,
                       'file': 'RK3576/Qwen2.5-1.5B-Instruct_w8a8_RK3576.rkllm'},
        },
        'modelfile': {'TEMPERATURE': '0.7', 'MAX_NEW_TOKENS': 2048},
    }
    e.update(over)
    return e


def with_path(path, value):
    """entry() with one nested field replaced, e.g. with_path('tokenizer.repo', 'x')."""
    e = entry()
    node = e
    keys = path.split('.')
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return [e]


def test_a_good_catalog_passes():
    assert f.catalog_problems([entry()]) == []


def test_the_lab_style_url_entry_passes():
    e = entry()
    e['files']['rk3588'] = {'url': 'https://huggingface.co/o/r/resolve/%s/m.rkllm' % COMMIT, 'sha256': SHA,
                            'git_blob': COMMIT, 'size': 262317, 'repo': 'o/r', 'revision': COMMIT, 'file': 'm.rkllm'}
    assert f.catalog_problems([e]) == []


@pytest.mark.parametrize('path,value,needle', [
    ('name', '../etc', 'rkllama_models[0].name "../etc" is not a safe model name'),
    ('name', '.hidden', 'rkllama_models[0].name ".hidden"'),
    ('tokenizer.files.0', '../../etc/cron.d/x', 'tokenizer.files[0] "../../etc/cron.d/x" is not a safe file name'),
    ('tokenizer.files.0', '/etc/passwd', 'tokenizer.files[0] "/etc/passwd"'),
    ('tokenizer.files.0', '.git/config', 'tokenizer.files[0] ".git/config"'),
    ('tokenizer.files.0', 'a/./b', 'tokenizer.files[0] "a/./b"'),
    ('tokenizer.files.2', {'name': 'x/../../y'}, 'tokenizer.files[2].name "x/../../y"'),
    ('tokenizer.repo', 'Qwen/Qwen"\nExecStartPre=/bin/sh', 'tokenizer.repo "Qwen/Qwen\\"\\nExecStartPre=/bin/sh" is not a Hugging Face'),
    ('tokenizer.repo', 'Qwen--x/y', 'tokenizer.repo "Qwen--x/y"'),
    ('tokenizer.repo', 'noslash', 'tokenizer.repo "noslash"'),
    ('tokenizer.revision', '../main', 'tokenizer.revision "../main" is neither a commit'),
    ('tokenizer.revision', 'main', 'tokenizer.revision "main" is a moving ref'),
    ('files.rk3588.repo', 'a/b/c', 'files.rk3588.repo "a/b/c"'),
    ('files.rk3588.revision', 'x\ny', 'files.rk3588.revision "x\\ny"'),
    ('files.rk3588.file', '../../../../etc/shadow', 'files.rk3588.file "../../../../etc/shadow"'),
    ('files.rk3588.sha256', 'abc', 'files.rk3588.sha256 "abc" is not a sha256'),
    ('files.rk3588.url', 'https://h/x y', 'files.rk3588.url "https://h/x y"'),
    ('modelfile', {'temperature': '1'}, 'modelfile key "temperature" is not a Modelfile key'),
    ('modelfile', {'TEMPERATURE': '0.7\nFROM="/etc/shadow"'}, 'modelfile.TEMPERATURE value "0.7\\nFROM=\\"/etc/shadow\\""'),
    ('modelfile', {'FROM': 'other.rkllm'}, 'modelfile sets FROM'),
    ('min_memory_mb', 'lots', 'min_memory_mb "lots"'),
])
def test_each_bad_field_is_refused_by_name(path, value, needle):
    problems = f.catalog_problems(with_path(path, value))
    assert any(needle in p for p in problems), problems


def test_a_file_at_a_moving_ref_without_sha256_is_refused_naming_the_model():
    e = entry()
    del e['files']['rk3588']['sha256']
    problems = f.catalog_problems([e])
    assert len(problems) == 1
    assert 'rkllama_models[0] (Qwen2.5-1.5B-Instruct).files.rk3588 is not pinned: revision "main"' in problems[0]
    assert 'rkllama_allow_unpinned_models' in problems[0]
    # The explicit opt-in trusts the mirror.
    assert f.catalog_problems([e], 'rkllama_models', True) == []


def test_a_file_without_revision_counts_as_main():
    e = entry()
    del e['files']['rk3588']['sha256']
    del e['files']['rk3588']['revision']
    assert 'not pinned' in ' '.join(f.catalog_problems([e]))


def test_a_commit_revision_pins_a_file_without_sha256():
    e = entry()
    assert 'sha256' not in e['files']['rk3576']
    assert f.catalog_problems([e]) == []


def test_the_default_catalog_is_refused_until_pinned():
    """The shipped catalog names files at revision main: refused unless the user pins or opts in."""
    import os
    import yaml
    defaults = os.path.join(os.path.dirname(__file__), '..', '..', '..', '..', 'roles', 'rkllama', 'defaults', 'main.yml')
    with open(defaults) as fh:
        models = yaml.safe_load(fh)['rkllama_models']
    problems = f.catalog_problems(models)
    unpinned = [p for p in problems if 'is not pinned' in p]
    assert unpinned and len(unpinned) == len(problems)
    assert f.catalog_problems(models, 'rkllama_models', True) == []


def test_unknown_platform_and_non_list():
    problems = f.catalog_problems(with_path('files', {'rk9999': {}}))
    assert any('"rk9999", which is not a platform' in p for p in problems)
    assert f.catalog_problems('Qwen') == ['rkllama_models must be a list of catalog entries, not "Qwen".']


@pytest.mark.parametrize('env,needle', [
    ({'A B': '1'}, 'rkllama_environment key "A B" is not an environment variable name'),
    ({'1X': '1'}, 'key "1X"'),
    ({'X': 'a\n[Service]\nExecStartPre=+/bin/sh -c id'}, 'rkllama_environment.X value "a\\n[Service]\\nExecStartPre=+/bin/sh -c id" must be one line'),
    ({'X': 'tab\there'}, 'rkllama_environment.X value "tab\\there"'),
    ({'X': None}, 'rkllama_environment.X value null'),
])
def test_bad_environment_is_refused_by_name(env, needle):
    problems = f.environment_problems(env, 'rkllama_environment')
    assert any(needle in p for p in problems), problems


def test_good_environment_passes():
    assert f.environment_problems({'RKLLM_LOG_LEVEL': 1, 'X_Y': 'a b %n "q"', '_Z': True}, 'exo_environment') == []


@pytest.mark.parametrize('args,needle', [
    (['--a\nExecStartPre=/bin/sh'], 'exo_extra_args[0] "--a\\nExecStartPre=/bin/sh" must be one argument'),
    (['--model llama'], 'exo_extra_args[0] "--model llama"'),
    ([''], 'exo_extra_args[0] "" must be a non-empty string'),
    ('--x', 'exo_extra_args must be a list'),
])
def test_bad_extra_args_are_refused_by_name(args, needle):
    problems = f.exec_args_problems(args, 'exo_extra_args')
    assert any(needle in p for p in problems), problems


def test_good_extra_args_pass():
    assert f.exec_args_problems(['--default-model', 'qwen2.5-1.5b-instruct-rkllm', 100], 'exo_extra_args') == []


def test_quoting_for_units():
    assert f.systemd_env_value('50%') == '50%%'
    assert f.systemd_env_value('a"b\\c') == 'a\\"b\\\\c'
    assert f.systemd_exec_arg('--x=$HOME%h') == '"--x=$$HOME%%h"'
    with pytest.raises(AnsibleFilterError, match='control character'):
        f.systemd_env_value('a\nb')
    with pytest.raises(AnsibleFilterError, match='control character'):
        f.systemd_exec_arg('a\nb')


def test_installed_models_and_pin_catalog_restore_the_recorded_file():
    model_files = [{'model': 'Qwen2.5-1.5B-Instruct', 'repo': 'o/r', 'revision': 'main', 'path': 'm.rkllm',
                    'url': 'https://huggingface.co/o/r/resolve/main/m.rkllm', 'sha256': SHA, 'git_blob': None,
                    'size': 10}]
    tok_files = [{'model': 'Qwen2.5-1.5B-Instruct', 'repo': 'Qwen/Q', 'revision': COMMIT, 'path': 'tokenizer.json',
                  'sha256': None, 'git_blob': COMMIT}]
    installed = f.installed_models(model_files, tok_files)
    assert installed == {'Qwen2.5-1.5B-Instruct': {
        'file': {'repo': 'o/r', 'revision': 'main', 'path': 'm.rkllm', 'url': model_files[0]['url'],
                 'sha256': SHA, 'git_blob': None, 'size': 10},
        'tokenizer': {'repo': 'Qwen/Q', 'revision': COMMIT, 'files': {'tokenizer.json': {'sha256': None, 'git_blob': COMMIT}}}}}
    catalog = [entry()]
    del catalog[0]['files']['rk3588']['sha256']
    before = copy.deepcopy(catalog)
    pinned = f.pin_catalog(catalog, installed, 'rk3588')
    assert pinned[0]['files']['rk3588']['sha256'] == SHA
    assert pinned[0]['files']['rk3588']['size'] == 10
    assert pinned[0]['files']['rk3576'] == catalog[0]['files']['rk3576']
    assert catalog == before  # the input is not changed
    assert f.catalog_problems(pinned) == []
    assert f.pin_catalog(catalog, {}, 'rk3588') == catalog


def test_filters_are_registered():
    assert set(f.FilterModule().filters()) == {
        'catalog_problems', 'environment_problems', 'exec_args_problems', 'systemd_env_value',
        'systemd_exec_arg', 'installed_models', 'pin_catalog'}
