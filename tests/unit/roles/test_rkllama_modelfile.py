"""The rkllama role's Modelfiles (roles/rkllama/templates/Modelfile.j2, issue 11).

The fork loads a Modelfile with load_dotenv(override=True) (server.py:68-84 at 1d8d210), so every
key goes into its process environment and stays there: a key one Modelfile leaves out keeps the
value of the model loaded before. And exo-rkllama gives rkllama 300 s per request, so
MAX_NEW_TOKENS is capped to what the board generates in rkllama_generation_time_limit.
Each case runs the role's own preflight (which works out the cap and reports capped models) and
renders the role's template with ansible-playbook on this machine, for a board tree from
lab/boards.py; the Modelfiles are then loaded one after the other as the fork loads them.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TOKENIZER = {"repo": "Qwen/Qwen2.5-1.5B-Instruct", "revision": "989aa7980e4cf806f80c7fef2b1adb7bc71aa306",
             "files": ["tokenizer.json"]}
FILES = {"rk3588": {"url": "https://example.org/a.rkllm", "sha256": "a" * 64},
         "rk3576": {"url": "https://example.org/b.rkllm", "sha256": "b" * 64}}


def _boards():
    spec = importlib.util.spec_from_file_location("rkllm_lab_boards_modelfile", os.path.join(REPO, "lab", "boards.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(run_play, tmp_path, board, models, **role_vars):
    """Run the preflight and write each model's Modelfile into tmp_path/<name>; return (paths, output)."""
    sysroot = tmp_path / "sys"
    _boards().build(board, str(sysroot))
    play = textwrap.dedent("""\
        - hosts: localhost
          connection: local
          gather_facts: false
          tasks:
            - rkllm.fleet.npu_facts:
                sysroot: {sysroot}
            - ansible.builtin.include_role:
                name: rkllm.fleet.rkllama
                tasks_from: preflight.yml
            - ansible.builtin.template:
                src: "{template}"
                dest: "{out}/{{{{ item.name }}}}"
                mode: "0644"
              vars:
                _file: {{dest: "/models/{{{{ item.name }}}}/{{{{ item.name | lower }}}}.rkllm"}}
              loop: "{{{{ rkllama_models }}}}"
        """).format(sysroot=sysroot, out=tmp_path, template=os.path.join(REPO, "roles", "rkllama", "templates", "Modelfile.j2"))
    variables = dict(role_vars, rkllama_models=models, rkllama_board_models=[m["name"] for m in models],
                     rkllama_default_model=models[0]["name"])
    proc = run_play(tmp_path, play, variables, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {m["name"]: tmp_path / m["name"] for m in models}, " ".join(proc.stdout.split())


def loaded_one_after_the_other(paths):
    """The environment the fork sees after loading each Modelfile in turn (load_dotenv(override=True))."""
    script = textwrap.dedent("""\
        import json, os, sys
        from dotenv import load_dotenv
        seen = []
        for path in sys.argv[1:]:
            load_dotenv(path, override=True)
            seen.append({k: os.getenv(k) for k in ("FROM", "HUGGINGFACE_PATH", "MAX_NEW_TOKENS", "TEMPERATURE")})
        print(json.dumps(seen))
        """)
    env = {k: v for k, v in os.environ.items() if k not in ("FROM", "HUGGINGFACE_PATH", "MAX_NEW_TOKENS", "TEMPERATURE")}
    out = subprocess.run([sys.executable, "-c", script] + [str(p) for p in paths], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)


def model(name, **modelfile):
    entry = {"name": name, "tokenizer": TOKENIZER, "files": FILES}
    if modelfile:
        entry["modelfile"] = modelfile
    return entry


def test_no_key_of_one_model_carries_over_to_the_next(tmp_path, run_play):
    models = [model("DeepSeek-R1-1.5B", TEMPERATURE="0.6", MAX_NEW_TOKENS="1000"), model("Plain")]
    paths, _output = render(run_play, tmp_path, "rock5b", models)
    first, second = loaded_one_after_the_other([paths["DeepSeek-R1-1.5B"], paths["Plain"]])
    assert first == {"FROM": "deepseek-r1-1.5b.rkllm", "HUGGINGFACE_PATH": TOKENIZER["repo"],
                     "MAX_NEW_TOKENS": "1000", "TEMPERATURE": "0.6"}
    # The catalog gives "Plain" no settings: the fork's own defaults are written, not inherited.
    assert second == {"FROM": "plain.rkllm", "HUGGINGFACE_PATH": TOKENIZER["repo"],
                      "MAX_NEW_TOKENS": "2048", "TEMPERATURE": "0.8"}


@pytest.mark.parametrize("board, cap", [("rock5b", 2160), ("rock4d", 1620)])
def test_max_new_tokens_is_capped_to_fit_exos_300_s_and_reported(tmp_path, board, cap, run_play):
    models = [model("Qwen", MAX_NEW_TOKENS="1024"), model("DeepSeek-R1-1.5B", MAX_NEW_TOKENS="8192")]
    paths, output = render(run_play, tmp_path, board, models)
    assert loaded_one_after_the_other([paths["Qwen"]])[0]["MAX_NEW_TOKENS"] == "1024"
    assert loaded_one_after_the_other([paths["DeepSeek-R1-1.5B"]])[0]["MAX_NEW_TOKENS"] == str(cap)
    platform = "rk3588" if board == "rock5b" else "rk3576"
    assert "DeepSeek-R1-1.5B: MAX_NEW_TOKENS 8192 capped to %d on localhost (%s)" % (cap, platform) in output
    assert "Qwen: MAX_NEW_TOKENS" not in output


def test_the_cap_follows_the_operators_speed_and_can_be_turned_off(tmp_path, run_play):
    models = [model("DeepSeek-R1-1.5B", MAX_NEW_TOKENS="8192")]
    paths, _output = render(run_play, tmp_path, "rock5b", models, rkllama_expected_tokens_per_second={"rk3588": 11.5})
    assert loaded_one_after_the_other([paths["DeepSeek-R1-1.5B"]])[0]["MAX_NEW_TOKENS"] == "3105"
    paths, output = render(run_play, tmp_path, "rock5b", models, rkllama_generation_time_limit=0)
    assert loaded_one_after_the_other([paths["DeepSeek-R1-1.5B"]])[0]["MAX_NEW_TOKENS"] == "8192"
    assert "capped to" not in output
