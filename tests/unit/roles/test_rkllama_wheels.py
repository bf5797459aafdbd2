"""The rkllama role installs from wheels only (issue 12): roles/rkllama/tasks/wheels.yml.

A Python or platform the pinned constraints have no wheels for is refused once, before anything
changes, naming the package, the Python version and the platform (read from the constraints'
"# rkllm.fleet wheels:" and "no-wheel:" headers that tools/constraints.py writes). Each case runs
the role's own task file with ansible-playbook on this machine.
"""

import os
import platform
import textwrap

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ARCH = platform.machine()

PLAY = textwrap.dedent("""\
    - hosts: localhost
      connection: local
      gather_facts: true
      gather_subset: [min]
      tasks:
        - ansible.builtin.include_role:
            name: rkllama
            tasks_from: wheels.yml
    """)


def check(run_play, tmp_path, version, **role_vars):
    proc = run_play(tmp_path, PLAY, dict(role_vars, _rkllama_python_version={"rc": 0, "stdout": version}), timeout=180,
                    env={"ANSIBLE_ROLES_PATH": os.path.join(REPO, "roles")})
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split())


def test_shipped_pins_accept_a_python_they_have_wheels_for(tmp_path, run_play):
    rc, out = check(run_play, tmp_path, "3.13")
    assert rc == 0, out


def test_shipped_pins_refuse_a_python_without_wheels(tmp_path, run_play):
    rc, out = check(run_play, tmp_path, "3.10")
    assert rc != 0
    assert "dependencies have no wheel for Python 3.10 on linux %s" % ARCH in out
    assert "Nothing was changed" in out


def test_the_refusal_names_the_package_without_a_wheel(tmp_path, run_play):
    constraints = ("# rkllm.fleet wheels: 3.12/%s\n# rkllm.fleet no-wheel: 3.13/%s=numpy==2.0.0\n"
                   "# rkllm.fleet source-only:\nnumpy==2.0.0\n") % (ARCH, ARCH)
    rc, out = check(run_play, tmp_path, "3.13", rkllama_pip_constraints=constraints)
    assert rc != 0
    assert "numpy==2.0.0 has no wheel for Python 3.13 on linux %s" % ARCH in out


def pip_args(run_play, tmp_path, constraints):
    """The extra_args install.yml's pip task renders, with its own vars, for these constraints."""
    import yaml
    with open(os.path.join(REPO, "roles", "rkllama", "tasks", "install.yml")) as f:
        task = [t for t in yaml.safe_load(f) if "ansible.builtin.pip" in t][0]
    play = [{"hosts": "localhost", "connection": "local", "gather_facts": False,
             "vars_files": [os.path.join(REPO, "roles", "rkllama", "vars", "main.yml"),
                            os.path.join(REPO, "roles", "rkllama", "defaults", "main.yml")],
             "tasks": [{"ansible.builtin.copy": {"dest": str(tmp_path / "args.txt"), "mode": "0644",
                                                 "content": task["ansible.builtin.pip"]["extra_args"]},
                        "vars": task["vars"]}]}]
    proc = run_play(tmp_path, yaml.safe_dump(play), {
        "rkllama_pip_constraints": constraints, "role_path": os.path.join(REPO, "roles", "rkllama")}, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (tmp_path / "args.txt").read_text().split()


def test_pip_installs_wheels_only(tmp_path, run_play):
    args = pip_args(run_play, tmp_path, "")
    assert args[0] == "--only-binary=:all:" and not any(a.startswith("--no-binary") for a in args), args
    assert "--constraint" in args


def test_source_only_packages_named_in_the_header_may_build(tmp_path, run_play):
    args = pip_args(run_play, tmp_path, "# rkllm.fleet source-only: nuitka uuid\nuuid==1.30\n")
    assert args[:2] == ["--only-binary=:all:", "--no-binary=nuitka,uuid"], args
