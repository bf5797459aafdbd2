"""The runtime role's stage entry point (issue 16): upgrade.yml stages a board while it still serves.

roles/runtime/tasks/stage.yml must download and verify the new library beside the active one and
leave everything the running rkllama uses alone: the `current` link, and the installed versions
(main removes those beyond runtime_keep_versions, which could take the running one). Runs the
entry point with ansible-playbook on this machine against a prefix in a temporary directory, with
the library served from a local HTTP server.
"""

import functools
import hashlib
import http.server
import os
import struct
import textwrap
import threading

import pytest

# ELF machine numbers (the artifact module refuses a library built for another machine).
MACHINES = {"x86_64": 62, "aarch64": 183}


def _elf(machine):
    """A 64-bit little-endian ELF header naming `machine`: all the role looks at."""
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HHI", 3, machine, 1)
    return header + bytes(64 - len(header)) + b"lab runtime 1.2.2\n"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def served_library(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    body = _elf(MACHINES.get(os.uname().machine, 62))
    (root / "librkllmrt.so").write_bytes(body)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d/librkllmrt.so" % server.server_address[1], hashlib.sha256(body).hexdigest()
    server.shutdown()


def run_stage(run_play, tmp_path, url, sha256, tasks_from="stage.yml"):
    prefix = tmp_path / "runtime"
    arch = os.uname().machine
    role_vars = {
        "runtime_version": "1.2.2",
        "runtime_prefix": str(prefix),
        "runtime_keep_versions": 1,
        "runtime_releases_extra": {"1.2.2": {arch: {"url": url, "sha256": sha256}}},
        "rkllm_artifact_dir": "",
        "rkllm_mirror_url": "",
    }
    play = textwrap.dedent("""\
        - hosts: localhost
          connection: local
          # The role reads ansible_facts.architecture (no fact cache here: the installed copy has no ansible.cfg).
          gather_facts: true
          gather_subset: [min]
          tasks:
            - ansible.builtin.include_role:
                name: rkllm.fleet.runtime
                tasks_from: {tasks_from}
        """).format(tasks_from=tasks_from)
    return run_play(tmp_path, play, role_vars)


@pytest.fixture()
def serving_board(tmp_path):
    """A board running runtime 1.2.3, with an older 1.2.1 kept for rollback."""
    prefix = tmp_path / "runtime"
    for version in ("1.2.1", "1.2.3"):
        (prefix / version).mkdir(parents=True)
        (prefix / version / "librkllmrt.so").write_bytes(b"running " + version.encode())
    os.symlink("1.2.3", str(prefix / "current"))
    return prefix


@pytest.mark.skipif(os.geteuid() != 0, reason="the role installs files owned by root")
def test_stage_downloads_beside_the_running_runtime_and_switches_nothing(tmp_path, served_library, serving_board, run_play):
    url, sha256 = served_library
    result = run_stage(run_play, tmp_path, url, sha256)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    staged = serving_board / "1.2.2" / "librkllmrt.so"
    assert hashlib.sha256(staged.read_bytes()).hexdigest() == sha256
    # The running rkllama still finds the library it loaded, and a rollback still has 1.2.1.
    assert os.readlink(str(serving_board / "current")) == "1.2.3"
    assert (serving_board / "1.2.3" / "librkllmrt.so").read_bytes() == b"running 1.2.3"
    assert (serving_board / "1.2.1" / "librkllmrt.so").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the role installs files owned by root")
def test_stage_refuses_a_corrupt_download_and_leaves_the_board_as_it_was(tmp_path, served_library, serving_board, run_play):
    url, _digest = served_library
    result = run_stage(run_play, tmp_path, url, "0" * 64)
    assert result.returncode != 0
    assert "The active runtime was not changed" in result.stdout
    assert os.readlink(str(serving_board / "current")) == "1.2.3"
    assert not (serving_board / "1.2.2").exists()
    assert sorted(os.listdir(str(serving_board))) == ["1.2.1", "1.2.3", "current"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the role installs files owned by root")
def test_install_without_the_stage_entry_point_does_switch(tmp_path, served_library, serving_board, run_play):
    """The control: the same tasks, entered as main enters them, switch and prune (so the test above can fail)."""
    url, sha256 = served_library
    result = run_stage(run_play, tmp_path, url, sha256, tasks_from="install.yml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert os.readlink(str(serving_board / "current")) == "1.2.2"
