"""The rkllama and exo unit templates, rendered as Ansible renders them, then read back the way systemd reads them.

A value from the inventory (``*_environment``, ``exo_extra_args``) must reach the service exactly as
given (a ``%`` included) and can never add a line to the unit; the Hugging Face cache root seeds is not
writable by the service.
"""

import os

import jinja2
import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.rkllm.fleet.plugins.filter import inputs

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))

RKLLAMA_VARS = {
    "ansible_managed": "Ansible managed",
    "rkllama_version": "1d8d210ae34cf960b688183bdfe256e0b8043cab",
    "rkllama_firewall_enabled": True,
    "rkllama_user": "rkllama",
    "rkllama_device_groups": ["render", "video"],
    "_rkllama_current": "/opt/rkllm/rkllama/current",
    "rkllama_port": 8080,
    "rkllama_home": "/var/lib/rkllama",
    "_rkllama_hf_home": "/var/lib/rkllama/.cache/huggingface",
    "_rkllama_dir": "/var/lib/rkllama/RKLLAMA",
    "rkllama_nofile_limit": 102400,
    "rkllama_npu_device": "/dev/dri/renderD129",
    "rkllama_ip_address_allow": ["localhost"],
    "rkllama_environment": {},
}

EXO_VARS = {
    "ansible_managed": "Ansible managed",
    "exo_version": "0c831d39a0c42772aa68df9bacd6af8c8bd3cd84",
    "exo_firewall_enabled": True,
    "exo_user": "exo",
    "exo_home": "/var/lib/exo",
    "_exo_current": "/opt/rkllm/exo/current",
    "_exo_topology_file": "/etc/exo-rkllm/topology.json",
    "inventory_hostname": "board1",
    "exo_node_port": 50051,
    "exo_api_port": 52415,
    "exo_response_timeout": 900,
    "exo_max_generate_tokens": 10000,
    "exo_default_model": "qwen2.5-1.5b-instruct-rkllm",
    "exo_rkllama_host": "127.0.0.1",
    "exo_rkllama_port": 8080,
    "exo_hf_hub_cache": "/var/lib/rkllama/.cache/huggingface/hub",
    "exo_environment": {},
    "exo_extra_args": [],
}


def render(template, variables):
    """Render like ansible.builtin.template: trim_blocks, strict undefined, the collection's filters by FQCN."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(os.path.dirname(template)),
        trim_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    for name, fn in inputs.FilterModule().filters().items():
        env.filters["rkllm.fleet." + name] = fn
    return env.get_template(os.path.basename(template)).render(**variables)


def unit_lines(text):
    """Logical lines of a unit file: comments dropped, backslash continuations joined (systemd's reader)."""
    out, current = [], ""
    for raw in text.split("\n"):
        if not current and raw.lstrip().startswith(("#", ";")):
            continue
        if raw.endswith("\\"):
            current += raw[:-1] + " "
            continue
        current += raw
        if current.strip():
            out.append(current.strip())
        current = ""
    return out


def resolve_specifiers(word):
    """systemd expands %-specifiers in these settings; %% is a literal %, an unknown one is an error."""
    out, i = "", 0
    while i < len(word):
        if word[i] != "%":
            out += word[i]
            i += 1
            continue
        spec = word[i + 1:i + 2]
        if spec == "%":
            out += "%"
        elif spec and spec in "hnuU":  # a few real specifiers (home, node, user...)
            out += "<%" + spec + ">"
        else:
            raise ValueError("bad specifier %" + spec + " in " + word)
        i += 2
    return out


def words(value):
    """Split a setting's value into words as systemd's extract_first_word does (quotes, C escapes)."""
    out, cur, quote, i, have = [], "", None, 0, False
    while i < len(value):
        c = value[i]
        if quote:
            if c == "\\" and i + 1 < len(value):
                cur += {"n": "\n", "t": "\t"}.get(value[i + 1], value[i + 1])
                i += 2
                continue
            if c == quote:
                quote = None
            else:
                cur += c
        elif c in "\"'":
            quote, have = c, True
        elif c.isspace():
            if cur or have:
                out.append(cur)
            cur, have = "", False
        else:
            cur += c
        i += 1
    if cur or have:
        out.append(cur)
    return out


def settings(text, key):
    return [line.split("=", 1)[1] for line in unit_lines(text) if line.split("=", 1)[0] == key]


def environment(text):
    env = {}
    for value in settings(text, "Environment"):
        for word in words(value):
            k, v = resolve_specifiers(word).split("=", 1)
            env[k] = v
    return env


RKLLAMA = os.path.join(ROOT, "roles", "rkllama", "templates", "rkllama.service.j2")
EXO = os.path.join(ROOT, "roles", "exo", "templates", "exo-rkllm.service.j2")


@pytest.mark.parametrize("template,base,var", [
    (RKLLAMA, RKLLAMA_VARS, "rkllama_environment"),
    (EXO, EXO_VARS, "exo_environment"),
])
def test_environment_values_reach_the_service_unchanged(template, base, var):
    wanted = {"PERCENT": "50%", "SPEC": "%h-literal", "QUOTED": 'say "hi" \\ there', "SPACES": "a b  c", "NUM": 3}
    text = render(template, dict(base, **{var: wanted}))
    env = environment(text)
    for k, v in wanted.items():
        assert env[k] == str(v), (k, text)


@pytest.mark.parametrize("template,base,var", [
    (RKLLAMA, RKLLAMA_VARS, "rkllama_environment"),
    (EXO, EXO_VARS, "exo_environment"),
])
def test_a_newline_in_an_environment_value_can_not_add_a_directive(template, base, var):
    evil = {"X": "1\nExecStartPre=+/bin/sh -c 'id > /tmp/pwned'"}
    with pytest.raises(AnsibleFilterError, match="control character"):
        render(template, dict(base, **{var: evil}))
    # ... and preflight refuses it before any template is written, naming the variable.
    problems = inputs.environment_problems(evil, var)
    assert problems and problems[0].startswith(var + ".X value ")


def test_exo_extra_args_are_single_quoted_arguments():
    args = ["--default-model", "qwen2.5-1.5b-instruct-rkllm", "--x=$HOME", "--y=50%", 'q"uote']
    text = render(EXO, dict(EXO_VARS, exo_extra_args=args))
    (execstart,) = settings(text, "ExecStart")
    argv = [resolve_specifiers(w).replace("$$", "$") for w in words(execstart)]
    assert argv[-len(args):] == args
    assert argv[:3] == ["/opt/rkllm/exo/current/venv/bin/python", "-m", "exo.main"]


def test_exo_extra_args_with_a_newline_can_not_add_a_directive():
    with pytest.raises(AnsibleFilterError, match="control character"):
        render(EXO, dict(EXO_VARS, exo_extra_args=["--a\nExecStartPre=+/bin/sh"]))


def test_the_hugging_face_cache_is_not_writable_by_rkllama():
    text = render(RKLLAMA, RKLLAMA_VARS)
    (rw,) = settings(text, "ReadWritePaths")
    assert words(rw) == ["/var/lib/rkllama/RKLLAMA"]
    assert settings(text, "ProtectSystem") == ["strict"]
    # The cache still is where transformers and exo look for it.
    assert environment(text)["HF_HOME"] == "/var/lib/rkllama/.cache/huggingface"


def _tasks(path):
    import yaml
    with open(os.path.join(ROOT, path)) as fh:
        return yaml.safe_load(fh) or []


@pytest.mark.parametrize("path", ["roles/rkllama/tasks/install.yml", "roles/rkllama/tasks/models.yml"])
def test_root_never_follows_a_link_where_it_makes_directories(path):
    """ansible.builtin.file follows links by default: a directory the service swapped for a link to
    /etc/systemd/system would be handed to the service user. Every such task must say follow: false."""
    service_paths = ("rkllama_home", "_rkllama_dir", "_rkllama_models_dir", "_rkllama_hf", "_rkllama_cache")
    checked = 0
    for task in _tasks(path):
        args = task.get("ansible.builtin.file")
        if args and args.get("state") == "directory" and any(p in str(task) for p in service_paths):
            assert args.get("follow") is False, task["name"]
            checked += 1
    assert checked > 0


def test_root_owns_everything_it_writes_in_the_hugging_face_cache():
    """The seeded cache is root's: no task of models.yml hands a path to the service user."""
    for task in _tasks("roles/rkllama/tasks/models.yml"):
        for module in ("ansible.builtin.file", "ansible.builtin.copy", "rkllm.fleet.artifact", "ansible.builtin.template"):
            args = task.get(module)
            if args:
                assert args.get("owner") == "root", (task["name"], args.get("owner"))
    names = [t["name"] for t in _tasks("roles/rkllama/tasks/models.yml")]
    # The link check runs before the first task that changes the cache.
    assert names.index("Refuse links planted in the Hugging Face cache") < names.index(
        "Create the Hugging Face cache directories, root's and read-only for the service")
