"""The exo role's choice of Python (roles/exo/tasks/python.yml, issue 12).

The real fork pins numpy==2.0.0, which has no wheel for Python 3.13; the role must never build a
venv on 3.13 for that commit: it picks a Python the shipped constraints have wheels for, or the
python-build-standalone build, or fails once, before anything changes, naming the package, the
Python version and the platform. Each case runs the role's own tasks with ansible-playbook on this
machine, with stand-in interpreters (scripts that print a version) as the board's Pythons.
"""

import json
import os
import platform
import textwrap

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ARCH = platform.machine()
EXO_COMMIT = "0c831d39a0c42772aa68df9bacd6af8c8bd3cd84"


@pytest.fixture()
def board(tmp_path):
    """Stand-in interpreters: each prints its version the way python.yml asks for it."""
    for version in ("3.11", "3.12", "3.13"):
        script = tmp_path / ("py" + version.replace(".", ""))
        script.write_text("#!/bin/sh\necho %s\n" % version)
        script.chmod(0o755)
    return tmp_path


def choose(run_play, board, **role_vars):
    out = board / "choice.json"
    play = textwrap.dedent("""\
        - hosts: localhost
          connection: local
          gather_facts: true
          gather_subset: [min]
          tasks:
            - ansible.builtin.include_role:
                name: exo
                tasks_from: python.yml
            - ansible.builtin.copy:
                dest: {out}
                mode: "0644"
                content: "{{{{ {{'python': _exo_python, 'version': _exo_python_version,
                                'download': _exo_python_download, 'source_only': _exo_source_only}} | to_json }}}}"
        """).format(out=out)
    proc = run_play(board, play, role_vars, timeout=180,
                    env={"ANSIBLE_ROLES_PATH": os.path.join(REPO, "roles"), "ANSIBLE_FACT_CACHING": "memory"})
    if proc.returncode != 0:
        return None, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_python_313_is_refused_for_the_pinned_commit_naming_numpy(board, run_play):
    choice, output = choose(run_play, board, exo_python=str(board / "py313"))
    assert choice is None, "the role chose %s for exo %s on Python 3.13" % (choice, EXO_COMMIT)
    message = " ".join(output.split())
    assert "numpy==2.0.0 has no wheel for Python 3.13 on linux %s" % ARCH in message
    assert "Nothing was changed" in message


def test_a_debian_13_board_gets_the_python_build_not_its_313(board, run_play):
    choice, output = choose(run_play, board, exo_python_candidates=[str(board / "py313"), str(board / "py311")])
    assert choice is not None, output
    assert choice["download"] is True
    assert choice["python"] == "/opt/rkllm/exo/%s/python/bin/python3" % EXO_COMMIT
    assert choice["version"].startswith("3.12.")
    assert choice["source_only"] == ["nuitka", "uuid"]


def test_a_board_with_312_uses_it(board, run_play):
    choice, output = choose(run_play, board, exo_python_candidates=[str(board / "py313"), str(board / "py312")])
    assert choice == {"python": str(board / "py312"), "version": "3.12", "download": False,
                      "source_only": ["nuitka", "uuid"]}, output


def test_without_download_a_debian_12_or_13_board_fails_once_naming_each_python(board, run_play):
    choice, output = choose(run_play, board, exo_python_download=False,
                            exo_python_candidates=[str(board / "py313"), str(board / "py311")])
    assert choice is None
    message = " ".join(output.split())
    assert "numpy==2.0.0 has no wheel for Python 3.13 on linux %s" % ARCH in message
    assert message.count("FAILED!") == 1


def test_constraints_without_a_wheels_line_take_any_python_312_or_newer(board, run_play):
    choice, output = choose(run_play, board, exo_pip_constraints="# no header\nrequests==2.32.3\n",
                            exo_python_candidates=[str(board / "py311"), str(board / "py313")])
    assert choice is not None, output
    assert (choice["python"], choice["download"]) == (str(board / "py313"), False)


def test_a_commit_without_constraints_is_refused(board, run_play):
    choice, output = choose(run_play, board, exo_version="1" * 40, exo_python_candidates=[str(board / "py312")])
    assert choice is None
    assert "No pinned dependency constraints are known for exo commit " + "1" * 40 in " ".join(output.split())
