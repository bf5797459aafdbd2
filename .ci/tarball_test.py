#!/usr/bin/env python3
"""The collection as a user gets it: build the tarball, install it, use it (make tarball-test).

1. `ansible-galaxy collection build` from this tree (a working tree, caches and all, as a
   maintainer builds it), then the tarball's file list against what a user needs: everything
   required is there, nothing else is (no lab, Molecule, controller settings, pins or caches).
2. `ansible-galaxy collection install --offline` into a temporary collections path.
3. The unit tests of the installed copy, run there (tests/unit ships in the tarball).
4. As a user with ansible-core and only that collections path (not the collections the
   `ansible` package bundles), no ansible.cfg and a copy of the installed example inventory:
   `ansible-playbook rkllm.fleet.<playbook> --syntax-check` for every playbook, the same through a user's own playbook that imports rkllm.fleet.site and
   rkllm.fleet.upgrade, and a run of the installed playbooks/tasks/board_target.yml from the
   user's directory (it reads the roles' defaults, which must resolve inside the collection,
   not next to the user's playbook).

5. A fresh clone of the committed tree (the third way in): `ansible-playbook -i inventories/mine
   playbooks/<playbook>.yml --syntax-check` with ansible-core only and the checkout's ansible.cfg,
   no `make venv` (rkllm.fleet.* resolves through the committed collections/ link); and
   playbooks/site.yml from another directory without that ansible.cfg (playbooks/collections).

`ansible-test sanity` runs on the same installed tarball in `make sanity` (.ci/sanity.py uses
build_and_install below). Everything happens under a temporary directory outside this tree,
so no ansible.cfg or pytest.ini of the checkout is picked up; it is removed at the end
(--keep leaves it for a look).
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
PLAYBOOKS = ["site", "upgrade", "verify", "benchmark"]
ROLES = ["npu", "runtime", "rkllama", "exo", "gateway_nginx", "gateway_prometheus"]

# What a user needs, plus the tests the way community.general ships them. fnmatch patterns
# ('*' crosses '/'); a tarball member matching none of them fails the test.
ALLOWED = [
    "MANIFEST.json", "FILES.json", "README.md", "LICENSE", "CHANGELOG.rst",
    "meta", "meta/*.yml", "meta/bindep.txt",
    "plugins", "plugins/*",
    "roles", "roles/*",
    "playbooks", "playbooks/*",
    "docs", "docs/*",
    "changelogs", "changelogs/changelog.yaml", "changelogs/config.yaml", "changelogs/fragments",
    "changelogs/fragments/*.yml", "changelogs/fragments/*.yaml",
    "inventories", "inventories/example", "inventories/example/*",
    "tests", "tests/unit", "tests/unit/*", "tests/sanity", "tests/sanity/ignore-*.txt",
    # the alert rules' promtool tests and renderer, which tests/unit/test_alert_rules.py runs
    "tests/prometheus", "tests/prometheus/*",
    # the table of real boards tests/unit builds its device-tree fixtures from (stdlib only)
    "lab", "lab/boards.py",
]
# Unit tests that read files only a checkout has, run by `make unit` there but deselected
# on the installed copy until they make their own fixtures. Remove an entry once its test
# stops needing the checkout; the run prints what it left out.
CHECKOUT_ONLY = {
    "tests/unit/plugins/modules/test_artifact.py":
        "reads the lab's built libraries, lab/runtime/dist/1.2.3/*/librkllmrt.so (only the ELF header matters)",
    "tests/unit/plugins/module_utils/test_artifacts.py::test_elf_machine_of_a_real_library":
        "reads lab/runtime/dist/1.2.3/aarch64/librkllmrt.so",
    "tests/unit/plugins/modules/test_npu_facts.py::test_module_process_on_this_host_never_tracebacks":
        "sets PYTHONPATH to the checkout's .cache/collections instead of keeping sys.path",
    "tests/unit/plugins/modules/test_npu_facts.py::test_module_process_on_the_old_driver_board":
        "sets PYTHONPATH to the checkout's .cache/collections instead of keeping sys.path",
}
# Never in a tarball, wherever they appear.
FORBIDDEN_PARTS = {".pytest_cache", "__pycache__", ".cache", ".venv", ".git", ".state", "molecule", "collections",
                   "ansible.cfg", "pytest.ini", "requirements.txt", "requirements-dev.txt", "_build"}


def required():
    """Members a user (or the shipped tests) can't do without."""
    names = ["MANIFEST.json", "FILES.json", "README.md", "LICENSE", "CHANGELOG.rst", "meta/runtime.yml",
             "changelogs/changelog.yaml", "docs/quickstart.md",
             "inventories/example/hosts.yml", "playbooks/tasks/board_target.yml",
             "tests/unit/conftest.py", "lab/boards.py"]
    names += [f"plugins/modules/{m}.py" for m in ("npu_facts", "model_check", "artifact", "chat_load")]
    names += [f"playbooks/{p}.yml" for p in PLAYBOOKS]
    names += [f"roles/{r}/{f}" for r in ROLES for f in ("meta/main.yml", "meta/argument_specs.yml", "defaults/main.yml")]
    names += [f"tests/sanity/ignore-{v}.txt" for v in tested_ansible_versions()]
    return names


def tested_ansible_versions():
    """The ansible-core minor versions meta/runtime.yml admits, read from its requires_ansible."""
    with open(os.path.join(ROOT, "meta", "runtime.yml"), encoding="utf-8") as f:
        spec = yaml.safe_load(f)["requires_ansible"]
    lower = upper = None
    for part in spec.split(","):
        part = part.strip()
        if part.startswith(">="):
            lower = tuple(int(x) for x in part[2:].split(".")[:2])
        elif part.startswith("<"):
            upper = tuple(int(x) for x in part[1:].split(".")[:2])
    if lower is None or upper is None or lower[0] != upper[0]:
        raise SystemExit(f"meta/runtime.yml: requires_ansible {spec!r} must be '>=2.X.0,<2.Y' (a tested range)")
    return [f"{lower[0]}.{minor}" for minor in range(lower[1], upper[1])]


def run(cmd, **kwargs):
    print("    $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, text=True, capture_output=True, check=False, **kwargs)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout + proc.stderr)
        raise SystemExit(f"tarball test: failed (rc {proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def user_env(collections):
    """An environment like a user's: this collections path only, no ansible.cfg of the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_COLLECTIONS_PATH=collections, ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0",
               ANSIBLE_LOCAL_TEMP=os.path.join(os.path.dirname(collections), "ansible-tmp"),
               PYTHONDONTWRITEBYTECODE="1")
    return env


def build_and_install(work, source=ROOT):
    """Build the tarball from SOURCE (this tree) into WORK and install it under WORK/collections.

    Returns (tarball, installed collection directory).
    """
    with open(os.path.join(source, "galaxy.yml"), encoding="utf-8") as f:
        version = yaml.safe_load(f)["version"]
    env = user_env(os.path.join(work, "collections"))
    run([os.path.join(BIN, "ansible-galaxy"), "collection", "build", "--force", "--output-path", work, source],
        env=env, cwd=work)
    tarball = os.path.join(work, f"rkllm-fleet-{version}.tar.gz")
    run([os.path.join(BIN, "ansible-galaxy"), "collection", "install", "--offline", "--force", "-p",
         os.path.join(work, "collections"), tarball], env=env, cwd=work)
    return tarball, os.path.join(work, "collections", "ansible_collections", "rkllm", "fleet")


def check_members(tarball):
    with tarfile.open(tarball) as tar:
        names = [m.name[2:] if m.name.startswith("./") else m.name for m in tar.getmembers()]
    problems = []
    for name in names:
        parts = set(name.split("/"))
        if parts & FORBIDDEN_PARTS:
            problems.append(f"ships {name} (never in a tarball: {', '.join(sorted(parts & FORBIDDEN_PARTS))})")
        elif not any(fnmatch.fnmatch(name, pattern) for pattern in ALLOWED):
            problems.append(f"ships {name}, which no user needs (add it to galaxy.yml's build_ignore, "
                            "or to ALLOWED in .ci/tarball_test.py if users do need it)")
    problems += [f"lacks {name}" for name in required() if name not in names]
    print(f"    {len(names)} members; {'; '.join(problems) if problems else 'all required, nothing else'}")
    if problems:
        raise SystemExit("tarball test: the tarball is wrong:\n  " + "\n  ".join(problems))


def unit_tests(work, installed):
    env = user_env(os.path.join(work, "collections"))
    env["PYTHONPATH"] = os.path.join(work, "collections")
    deselect = []
    for node, why in CHECKOUT_ONLY.items():
        print(f"    left out (needs the checkout): {node}: {why}")
        deselect += ["--deselect", node]
    out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-ra", "--strict-markers",
               "tests/unit"] + deselect, env=env, cwd=installed)
    print("    " + out.strip().splitlines()[-1])


def as_a_user(work, installed):
    collections = os.path.join(work, "collections")
    env = user_env(collections)
    # Only ansible-core and this collection: not the collections the `ansible` package of this
    # venv bundles in site-packages, which a user with ansible-core alone does not have.
    env["ANSIBLE_COLLECTIONS_SCAN_SYS_PATH"] = "false"
    project = os.path.join(work, "my-fleet")
    os.makedirs(project)
    inventory = os.path.join(project, "inventory")
    shutil.copytree(os.path.join(installed, "inventories", "example"), inventory)
    playbook = [os.path.join(BIN, "ansible-playbook"), "-i", inventory]
    for name in PLAYBOOKS:
        out = run(playbook + [f"rkllm.fleet.{name}", "--syntax-check"], env=env, cwd=project)
        print("    " + out.strip().splitlines()[-1])

    # A user's own playbook that imports ours, before and after plays of its own.
    with open(os.path.join(project, "fleet.yml"), "w", encoding="utf-8") as f:
        f.write("---\n"
                "- name: My own preparation of the boards\n  hosts: boards\n  gather_facts: false\n"
                "  tasks:\n    - name: Say hello\n      ansible.builtin.debug:\n        msg: hello\n\n"
                "- name: Build the fleet\n  ansible.builtin.import_playbook: rkllm.fleet.site\n\n"
                "- name: Roll upgrades through it\n  ansible.builtin.import_playbook: rkllm.fleet.upgrade\n")
    out = run(playbook + ["fleet.yml", "--syntax-check"], env=env, cwd=project)
    print("    " + out.strip().splitlines()[-1])

    # The targets tasks of site.yml and upgrade.yml, run from the user's directory: the role
    # defaults they fall back to must be found in the installed collection.
    with open(os.path.join(installed, "roles", "runtime", "defaults", "main.yml"), encoding="utf-8") as f:
        runtime_default = str(yaml.safe_load(f)["runtime_version"])
    with open(os.path.join(project, "target.yml"), "w", encoding="utf-8") as f:
        f.write("---\n- name: What a board of mine should run\n  hosts: localhost\n  gather_facts: false\n  tasks:\n"
                f"    - name: Work out the target\n      ansible.builtin.import_tasks: {installed}/playbooks/tasks/board_target.yml\n"
                "    - name: Show the runtime it falls back to\n      ansible.builtin.debug:\n"
                "        msg: \"runtime={{ rkllm_board_target.runtime_version }}\"\n")
    out = run(playbook[:1] + ["-i", "localhost,", "-c", "local", "target.yml"], env=env, cwd=project)
    if f"runtime={runtime_default}" not in out:
        sys.stdout.write(out)
        raise SystemExit(f"tarball test: board_target.yml did not fall back to the runtime role's default {runtime_default}")
    print(f"    board_target.yml from {project}: runtime {runtime_default} (the role's default)")


def fresh_checkout(work, source):
    """The third way in: a clone of SOURCE's committed tree, nothing installed but ansible-core."""
    if not os.path.isdir(os.path.join(source, ".git")):
        print(f"    skipped: {source} is not a git checkout")
        return
    clone = os.path.join(work, "checkout")
    run(["git", "clone", "-q", source, clone])
    shutil.copytree(os.path.join(clone, "inventories", "example"), os.path.join(clone, "inventories", "mine"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false", ANSIBLE_NOCOLOR="1", PYTHONDONTWRITEBYTECODE="1")
    for name in PLAYBOOKS:
        out = run([os.path.join(BIN, "ansible-playbook"), "-i", "inventories/mine", f"playbooks/{name}.yml",
                   "--syntax-check"], env=env, cwd=clone)
        print("    " + out.strip().splitlines()[-1])
    # From another directory, without the checkout's ansible.cfg: the playbooks' adjacent
    # collections/ (a committed link) still resolves rkllm.fleet.
    out = run([os.path.join(BIN, "ansible-playbook"), "-i", os.path.join(clone, "inventories", "mine"),
               os.path.join(clone, "playbooks", "site.yml"), "--syntax-check"], env=env, cwd=work)
    print("    from another directory: " + out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--source", default=ROOT, help="the tree to build (default: this one, as it is)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="rkllm-fleet-tarball-")
    try:
        print("==> tarball: build and install", flush=True)
        tarball, installed = build_and_install(work, os.path.abspath(args.source))
        print("==> tarball: contents", flush=True)
        check_members(tarball)
        print("==> tarball: unit tests of the installed copy", flush=True)
        unit_tests(work, installed)
        print("==> tarball: as a user (installed collection, own playbook, no ansible.cfg)", flush=True)
        as_a_user(work, installed)
        print("==> a fresh checkout (git clone of the committed tree, ansible.cfg, no make venv)", flush=True)
        fresh_checkout(work, os.path.abspath(args.source))
        print(f"==> tarball test passed: {os.path.basename(tarball)}")
    finally:
        if args.keep:
            print(f"    kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
