"""Shared fixture of the role tests: run a play with ansible-playbook on this machine.

The role tests run a role's entry point (or a task file, or a template) on localhost with the
ansible-playbook of this Python's venv, with the checkout's ansible.cfg. In the installed tarball
(.ci/tarball_test.py) that file does not exist and ansible-playbook runs with its own defaults and
the ANSIBLE_COLLECTIONS_PATH the tarball test sets.
"""

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
PLAYBOOK_BIN = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")


def _run_play(workdir, play, extra_vars=None, inventory="localhost,", args=(), check=False, timeout=300,
              cwd=REPO, env=None):
    """Write PLAY (YAML text) and EXTRA_VARS (a dict, passed with -e @file) into WORKDIR and run them.

    ansible_python_interpreter defaults to this Python. INVENTORY is passed to -i, ARGS are
    appended to the command line (with --check if CHECK), ENV adds to the environment (on top of
    os.environ, the checkout's ansible.cfg, no colour and the default stdout callback, which the
    tests read). Returns the subprocess.CompletedProcess (text stdout and stderr).
    """
    name = uuid.uuid4().hex[:8]
    book = os.path.join(str(workdir), f"play-{name}.yml")
    with open(book, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(play))
    evars = os.path.join(str(workdir), f"vars-{name}.json")
    with open(evars, "w", encoding="utf-8") as f:
        json.dump(dict({"ansible_python_interpreter": sys.executable}, **(extra_vars or {})), f)
    run_env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_STDOUT_CALLBACK="ansible.builtin.default")
    run_env.update(env or {})
    cmd = [PLAYBOOK_BIN, "-i", str(inventory), book, "-e", "@" + evars] + list(args) + (["--check"] if check else [])
    return subprocess.run(cmd, cwd=str(cwd), env=run_env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def run_play():
    """The function that runs a play: run_play(workdir, play, extra_vars, inventory=, args=, check=, timeout=, cwd=, env=).

    Session-scoped, so module-scoped fixtures (a fleet rendered once) can use it too.
    """
    return _run_play
