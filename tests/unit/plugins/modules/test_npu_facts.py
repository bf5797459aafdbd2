"""rkllm.fleet.npu_facts run as a module: main() with patched arguments, and as Ansible runs it."""

import json
import os
import subprocess
import sys

import pytest

from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

from ansible_collections.rkllm.fleet.plugins.modules import npu_facts

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
KEYS = {"present", "soc", "platform", "board", "compatible", "npu_cores", "driver", "driver_version",
        "device", "devfreq", "supported", "problems"}


class Exit(Exception):
    pass


class Fail(Exception):
    pass


@pytest.fixture
def run_main(monkeypatch):
    """Run npu_facts.main() with ARGS; return ("exit" or "fail", the result it reported)."""
    def exit_json(self, **kwargs):
        kwargs["warnings"] = list(getattr(self, "_rkllm_warnings", []))
        raise Exit(kwargs)

    def fail_json(self, **kwargs):
        raise Fail(kwargs)

    def warn(self, text):
        self.__dict__.setdefault("_rkllm_warnings", []).append(text)

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
    monkeypatch.setattr(basic.AnsibleModule, "warn", warn)

    def run(args):
        with patch_module_args(args):
            try:
                npu_facts.main()
            except Exit as exc:
                return "exit", exc.args[0]
            except Fail as exc:
                return "fail", exc.args[0]
        raise AssertionError("npu_facts.main() returned without exit_json or fail_json")
    return run


@pytest.mark.parametrize("check_mode", [False, True])
def test_main_returns_the_rknpu_fact_unchanged(board_tree, run_main, check_mode):
    root = board_tree("rock5b")
    before = sorted(os.walk(root))
    outcome, result = run_main({"sysroot": root, "_ansible_check_mode": check_mode})
    assert outcome == "exit" and result["changed"] is False
    facts = result["ansible_facts"]["rknpu"]
    assert set(facts) == KEYS
    assert facts["supported"] is True and facts["platform"] == "rk3588" and facts["device"] == "/dev/dri/renderD129"
    assert sorted(os.walk(root)) == before


def test_main_applies_min_driver_version(board_tree, run_main):
    outcome, result = run_main({"sysroot": board_tree("rock5b"), "min_driver_version": "0.9.10"})
    facts = result["ansible_facts"]["rknpu"]
    assert outcome == "exit" and facts["supported"] is False
    assert facts["problems"] == [
        "The NPU driver is 0.9.8 but the RKLLM runtime needs 0.9.10 or newer; the driver is built into the kernel, "
        "so flash a newer board image or vendor kernel."]


def test_main_rejects_a_min_driver_version_that_is_not_a_version(board_tree, run_main):
    outcome, result = run_main({"sysroot": board_tree("rock5b"), "min_driver_version": "latest"})
    assert outcome == "fail" and "min_driver_version" in result["msg"] and "0.9.8" in result["msg"]


def test_main_turns_notes_into_warnings(board_tree, run_main):
    root = board_tree("rock5b")
    with open(os.path.join(root, "sys/firmware/devicetree/base/model"), "wb") as handle:
        handle.write(b"\xff\xfe")
    outcome, result = run_main({"sysroot": root})
    assert outcome == "exit" and result["ansible_facts"]["rknpu"]["board"] is None
    assert len(result["warnings"]) == 1 and "model" in result["warnings"][0]


def test_main_on_a_host_without_npu_succeeds(tmp_path, run_main):
    outcome, result = run_main({"sysroot": str(tmp_path)})
    assert outcome == "exit" and result["changed"] is False
    facts = result["ansible_facts"]["rknpu"]
    assert facts["present"] is False and facts["supported"] is False and len(facts["problems"]) == 1


def run_module_file(args):
    """Run the module file the way a target runs it: a Python process reading an args file."""
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, ".cache", "collections"))
    proc = subprocess.run([sys.executable, "-c", "import sys; from ansible_collections.rkllm.fleet.plugins.modules "
                           "import npu_facts; npu_facts.main()", json.dumps({"ANSIBLE_MODULE_ARGS": args})],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_module_process_on_this_host_never_tracebacks():
    result = run_module_file({})
    assert result["changed"] is False and "failed" not in result
    facts = result["ansible_facts"]["rknpu"]
    assert set(facts) == KEYS and isinstance(facts["problems"], list)


def test_module_process_on_the_old_driver_board(board_tree):
    result = run_module_file({"sysroot": board_tree("rk3588-old-driver")})
    facts = result["ansible_facts"]["rknpu"]
    assert result["changed"] is False
    assert facts["driver_version"] == "0.9.6" and facts["supported"] is False and "0.9.6" in facts["problems"][0]


@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, ".venv", "bin", "ansible")), reason="needs the project's .venv")
def test_ansible_runs_it_in_check_mode(board_tree, tmp_path):
    """The collection path end to end: ansible packs the module with its module_utils and runs it."""
    root = board_tree("rock4d")
    ansible = os.path.join(REPO, ".venv", "bin", "ansible")
    config = tmp_path / "ansible.cfg"
    config.write_text("[defaults]\ncollections_path = %s\nstdout_callback = ansible.builtin.json\n"
                      % os.path.join(REPO, ".cache", "collections"))
    env = dict(os.environ, ANSIBLE_CONFIG=str(config), ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    proc = subprocess.run([ansible, "localhost", "-i", "localhost,", "-c", "local", "--check",
                           "-m", "rkllm.fleet.npu_facts", "-a", json.dumps({"sysroot": root})],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    task = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    assert task["changed"] is False
    facts = task["ansible_facts"]["rknpu"]
    assert (facts["soc"], facts["platform"], facts["npu_cores"], facts["supported"]) == ("rk3576", "rk3576", 2, True)
