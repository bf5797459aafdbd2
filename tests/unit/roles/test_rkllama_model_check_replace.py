"""The rkllama role keeps the board's assigned model (issue 14).

A client asked a board for another model and exo loaded it: site.yml must put the assigned model
back (reported as a change) instead of failing the board, and a re-run must change nothing.
roles/rkllama/tasks/check.yml runs here with ansible-playbook against the fake of rkllama's old API
(tests/unit/plugins/module_utils/test_rkllama_api.py), with the role's own defaults.
"""

import importlib.util
import os
import textwrap

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _load_fake():
    path = os.path.join(REPO, "tests", "unit", "plugins", "module_utils", "test_rkllama_api.py")
    spec = importlib.util.spec_from_file_location("rkllama_fake_role_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fake_api = _load_fake()


@pytest.fixture
def fake():
    server = fake_api.FakeRkllama().start()
    yield server
    server.stop()


def run_check(run_play, tmp_path, fake, **role_vars):
    """Run the role's check.yml once; return (returncode, recap line, output)."""
    port = fake.url.rsplit(":", 1)[1]
    play = textwrap.dedent("""\
        - hosts: localhost
          connection: local
          gather_facts: false
          tasks:
            - ansible.builtin.include_role:
                name: rkllm.fleet.rkllama
                tasks_from: check.yml
        """)
    variables = dict(role_vars, rkllama_port=int(port), rkllama_default_model=fake_api.QWEN,
                     rkllama_model_check_timeout=20)
    proc = run_play(tmp_path, play, variables, timeout=180, env={"NO_PROXY": "*"})
    recap = [line for line in proc.stdout.splitlines() if line.startswith("localhost") and "ok=" in line]
    return proc.returncode, (recap[-1] if recap else ""), proc.stdout + proc.stderr


def test_a_board_a_client_switched_gets_its_assigned_model_back_then_changes_nothing(tmp_path, fake, run_play):
    fake.current = fake_api.DEEPSEEK  # what exo loaded for a client's request
    code, recap, out = run_check(run_play, tmp_path, fake)
    assert code == 0, out
    assert fake.current == fake_api.QWEN
    assert "changed=1" in recap, recap
    assert "Unloaded %s and loaded %s" % (fake_api.DEEPSEEK, fake_api.QWEN) in out or fake.posts()[:2] == [
        "/unload_model", "/load_model"], out

    code, recap, out = run_check(run_play, tmp_path, fake)
    assert code == 0, out
    assert "changed=0" in recap, recap
    assert fake.current == fake_api.QWEN


def test_replace_false_leaves_the_other_model_and_fails_naming_it(tmp_path, fake, run_play):
    fake.current = fake_api.DEEPSEEK
    code, _recap, out = run_check(run_play, tmp_path, fake, rkllama_model_check_replace=False)
    assert code != 0
    assert "The NPU holds %s, not %s" % (fake_api.DEEPSEEK, fake_api.QWEN) in out
    assert fake.current == fake_api.DEEPSEEK
