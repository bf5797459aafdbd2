"""playbooks/tasks/model_assignment.yml: rkllm_model_pools becomes each board's rkllama_default_model (issue 14).

Three boards built by lab/boards.py (two RK3588, one RK3576) run on this machine with a local
connection; the task file runs after npu_facts as in site.yml, and a later play reads every board's
rkllama_default_model through hostvars, as the gateway does.
"""

import importlib.util
import json
import os
import sys
import textwrap

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
QWEN, DEEPSEEK = "Qwen2.5-1.5B-Instruct", "DeepSeek-R1-1.5B"
BOARDS = (("b-opi5", "orangepi5-vendor"), ("b-rock5b", "rock5b"), ("b-rock4d", "rock4d"))


def _boards():
    spec = importlib.util.spec_from_file_location("rkllm_lab_boards_assignment", os.path.join(REPO, "lab", "boards.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The task file finds the role defaults relative to itself: run the copy in the checkout's playbooks/.
PLAY = textwrap.dedent("""\
    - hosts: boards
      gather_facts: false
      tasks:
        - rkllm.fleet.npu_facts:
            sysroot: "{{{{ rkllm_sysroot }}}}"
        - ansible.builtin.import_tasks: {tasks}
        - ansible.builtin.debug:
            msg: provisioning {{{{ inventory_hostname }}}}
    - hosts: localhost
      gather_facts: false
      tasks:
        - ansible.builtin.debug:
            msg: "SPREAD {{{{ dict(groups['boards'] | zip(groups['boards'] | map('extract', hostvars, 'rkllama_default_model')))
                  | to_json }}}}"
    """).format(tasks=os.path.join(REPO, "playbooks", "tasks", "model_assignment.yml"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    boards = _boards()
    hosts = {}
    for name, kind in BOARDS:
        boards.build(kind, str(tmp / name))
        hosts[name] = {"rkllm_sysroot": str(tmp / name), "rkllama_default_model": QWEN}
    inventory = {"all": {"vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
                         "children": {"boards": {"hosts": hosts}}}}
    (tmp / "hosts.yml").write_text(json.dumps(inventory))
    (tmp / "tasks").mkdir()
    return tmp


def run(run_play, fleet, pools, *args):
    proc = run_play(fleet, PLAY, {} if pools is None else {"rkllm_model_pools": pools}, inventory=fleet / "hosts.yml",
                    args=args)
    out = proc.stdout + proc.stderr
    spread = None
    for line in out.splitlines():
        if '"msg": "SPREAD ' in line:
            spread = json.loads(json.loads("{" + line.strip() + "}")["msg"][len("SPREAD "):])
    return proc.returncode, spread, " ".join(out.split())


@pytest.mark.parametrize("pools", [None, {}], ids=["unset", "empty"])
def test_no_pools_keeps_the_inventorys_assignment(fleet, pools, run_play):
    code, spread, out = run(run_play, fleet, pools)
    assert code == 0, out
    assert spread == {"b-opi5": QWEN, "b-rock5b": QWEN, "b-rock4d": QWEN}


def test_pools_assign_every_board_whatever_the_limit(fleet, run_play):
    code, spread, out = run(run_play, fleet, {QWEN: 2, DEEPSEEK: 1})
    assert code == 0, out
    assert spread == {"b-opi5": DEEPSEEK, "b-rock5b": QWEN, "b-rock4d": QWEN}
    # Limited to the RK3576 board: the others' platforms are read, the spread is the same.
    code, limited, out = run(run_play, fleet, {QWEN: 2, DEEPSEEK: 1}, "--limit", "b-rock4d,localhost")
    assert code == 0, out
    assert limited == spread


def test_a_spread_that_does_not_fit_fails_every_board_before_anything_else(fleet, run_play):
    code, spread, out = run(run_play, fleet, {DEEPSEEK: 3})
    assert code != 0
    assert "asks for 3 boards serving DeepSeek-R1-1.5B, but only 2 can run it (b-opi5, b-rock5b)" in out
    assert "b-rock4d (rk3576)" in out
    assert "provisioning" not in out and spread is None
