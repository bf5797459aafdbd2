"""rkllama_hf_token (issue 15): sent to Hugging Face only, by tasks that never log it.

The header selection is rendered by ansible-playbook with the role's own vars/main.yml and the same
expression roles/rkllama/tasks/models.yml uses (read from that file); the tasks that carry the token
are read from the task files.
"""

import os
import textwrap

import pytest
import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ROLE = os.path.join(REPO, "roles", "rkllama")
TOKEN = "hf_s3cretTokenValue0123456789"


def tasks(name):
    with open(os.path.join(ROLE, "tasks", name)) as f:
        return yaml.safe_load(f)


def carrying():
    out = []
    for name in ("catalog.yml", "models.yml"):
        for task in tasks(name):
            args = task.get("rkllm.fleet.artifact") or task.get("ansible.builtin.uri")
            if args is not None:  # every request these files make goes to a catalog origin
                out.append((name, task))
    return out


def test_every_task_that_carries_the_token_is_no_log():
    found = carrying()
    assert len(found) == 3, [t["name"] for n, t in found]
    for name, task in found:
        args = task.get("rkllm.fleet.artifact") or task.get("ansible.builtin.uri")
        assert "_rkllama_hf_auth" in str(args.get("headers", "")), (name, task["name"], "sends no token")
        assert task.get("no_log") == "{{ _rkllama_hf_auth | length > 0 }}", (name, task["name"])


@pytest.mark.parametrize("url,sent", [
    ("https://huggingface.co/org/m/resolve/0123/model.rkllm", True),
    ("https://cdn-lfs.hf.co/repos/x", True),
    ("https://github.com/huggingface.co/model.rkllm", False),
    ("https://huggingface.co.example.net/model.rkllm", False),
    ("https://evilhf.co/model.rkllm", False),
    ("file:///var/cache/rkllm/model.rkllm", False),
])
def test_the_token_goes_to_hugging_face_hosts_only(tmp_path, url, sent, run_play):
    download = [t for n, t in carrying() if n == "models.yml"][0]
    expression = download["rkllm.fleet.artifact"]["headers"]
    play = textwrap.dedent("""\
        - hosts: localhost
          connection: local
          gather_facts: false
          vars_files: [{vars}]
          vars:
            item: {{url: "{url}"}}
          tasks:
            - ansible.builtin.copy:
                dest: {out}
                content: "{{{{ headers | to_json }}}}"
                mode: "0644"
              vars:
                headers: {expr}
        """).format(vars=os.path.join(ROLE, "vars", "main.yml"), url=url, out=tmp_path / "h.json",
                    expr=yaml.safe_dump(expression, default_style='"').strip())
    proc = run_play(tmp_path, play, {"rkllama_hf_token": TOKEN, "role_path": ROLE}, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    headers = (tmp_path / "h.json").read_text()
    assert (("Bearer " + TOKEN) in headers) is sent, headers


@pytest.mark.parametrize("token,ok", [("", True), (TOKEN, True), ("hf_abc\nX-Evil: 1", False), ("hf abc", False)])
def test_preflight_refuses_a_token_that_is_not_one_header_value(tmp_path, token, ok, run_play):
    check = [t for t in tasks("preflight.yml") if t["name"] == "Check the Hugging Face token"][0]
    play = [{"hosts": "localhost", "connection": "local", "gather_facts": False, "tasks": [check]}]
    proc = run_play(tmp_path, yaml.safe_dump(play), {"rkllama_hf_token": token}, timeout=180)
    assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr
    if token:
        assert token not in proc.stdout + proc.stderr, "the token was logged"
