"""Build the lab upstream's content tree and the lab pins.

The lab upstream is a site mirror of the internet: the file for ``https://HOST/PATH``
lives at ``<tree>/HOST/PATH``.  This script lays out everything the lab fetches from
"the internet" (RKLLM runtime libraries, the rkllama and exo-rkllama stand-ins as git
repositories, lab models, tokenizer files, Hugging Face API answers) and writes the
identities of all of it to ``inventories/lab/group_vars/all/lab_pins.yml``.

The build is deterministic: the same inputs give a byte-identical tree and the same git
commit ids on any machine (fixed authors, dates and time zone, no signing, sorted inputs,
an isolated git configuration, single-threaded packing).

    python3 lab/upstream/build.py --out DIR            # the tree the upstream image serves
    python3 lab/upstream/build.py --pins FILE          # regenerate the committed pins
    python3 lab/upstream/build.py --check-pins FILE    # exit 1 when FILE is stale

Python 3 standard library and the ``git`` command only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PINS_PATH = "inventories/lab/group_vars/all/lab_pins.yml"
PINS_COMMAND = "python3 lab/upstream/build.py --pins " + PINS_PATH

UPSTREAM_URL = "http://rkllm-lab-upstream:8000"

# Marker that identifies a tree this script built (so --out never deletes anything else),
# and the per-path response headers the server adds (Hugging Face's resolve headers).
META_DIR = ".lab"
MARKER = META_DIR + "/tree.json"
HEADERS_INDEX = META_DIR + "/headers.json"

# --- RKLLM runtime ------------------------------------------------------------------------

RUNTIME_VERSIONS = ("1.2.2", "1.2.3")
RUNTIME_ARCHES = ("aarch64", "x86_64")
RUNTIME_DIST = "lab/runtime/dist/{version}/{arch}/librkllmrt.so"
RUNTIME_URL = ("https://github.com/airockchip/rknn-llm/raw/release-v{version}"
               "/rkllm-runtime/Linux/librkllm_api/{arch}/librkllmrt.so")
_ELF_MACHINE = {"aarch64": 183, "x86_64": 62}

# --- rkllama and exo stand-ins ----------------------------------------------------------

GIT_IDENTITY = ("rkllm lab", "lab@rkllm.invalid")
# name -> (stand-in source dir, repository URL, fault of the "broken" commit)
GIT_REPOS = {
    "rkllama": ("lab/stand-ins/rkllama", "https://github.com/jfreed-dev/rkllama", "load_fails"),
    "exo": ("lab/stand-ins/exo", "https://github.com/jfreed-dev/exo-rkllama", "bad_answers"),
}
# The three lab versions, oldest first: (version, commit date).  main points at v2; broken is
# a child of v2 reachable through its tag only, so a plain clone checks out v2.
GIT_VERSIONS = (
    ("v1", "2025-12-01T10:00:00+00:00"),
    ("v2", "2025-12-08T10:00:00+00:00"),
    ("broken", "2025-12-15T10:00:00+00:00"),
)
GIT_DEFAULT_VERSION = "v2"
GIT_BRANCH = "main"
GIT_TAG_PREFIX = "lab-"
# Never part of a stand-in's repository: caches and editor droppings.
EXCLUDED_NAMES = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".git", ".venv",
                  "venv", ".tox", ".DS_Store", "lab_build.json"}
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".swp", "~", ".orig", ".rej")

# --- Models -------------------------------------------------------------------------------

# Lab model file format (parsed by the stand-in rkllama):
#   line 1  RKLLM-LAB-MODEL 1
#   line 2  {"model": ..., "platform": ..., "toolkit_version": ..., "dtype": ..., "max_context": ...}
#   filler  deterministic bytes
#   last 32 bytes  SHA-256 of everything before them
MODEL_MAGIC = b"RKLLM-LAB-MODEL 1\n"
MODEL_FILLER_BYTES = 256 * 1024
MODEL_TOOLKIT = "1.1.4"
MODEL_DTYPE = "W8A8"
MODEL_MAX_CONTEXT = 4096
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"

# catalog name -> tokenizer repo, {platform: (Hugging Face repo, .rkllm file name)}.
# Repo and file names follow the public conversions: c01zaut's RK3588 1.1.4 builds
# (<model>-<platform>-w8a8-opt-<n>-hybrid-ratio-<r>.rkllm) and datakurre's DeepSeek-R1 1.1.4 build.
# The rk3576 repos follow the same convention; no public 1.1.4 rk3576 build of these was found.
MODELS = {
    "Qwen2.5-1.5B-Instruct": {
        "tokenizer_repo": "Qwen/Qwen2.5-1.5B-Instruct",
        "files": {
            "rk3588": ("c01zaut/Qwen2.5-1.5B-Instruct-RK3588-1.1.4",
                       "Qwen2.5-1.5B-Instruct-rk3588-w8a8-opt-1-hybrid-ratio-1.0.rkllm"),
            "rk3576": ("c01zaut/Qwen2.5-1.5B-Instruct-RK3576-1.1.4",
                       "Qwen2.5-1.5B-Instruct-rk3576-w8a8-opt-1-hybrid-ratio-1.0.rkllm"),
        },
    },
    "DeepSeek-R1-1.5B": {
        "tokenizer_repo": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        "files": {
            "rk3588": ("datakurre/DeepSeek-R1-Distill-Qwen-1.5B-rk3588-1.1.4",
                       "DeepSeek-R1-Distill-Qwen-1.5B-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm"),
            "rk3576": ("datakurre/DeepSeek-R1-Distill-Qwen-1.5B-rk3576-1.1.4",
                       "DeepSeek-R1-Distill-Qwen-1.5B-rk3576-w8a8-opt-0-hybrid-ratio-0.0.rkllm"),
        },
    },
}
HF_LAST_MODIFIED = "2025-12-01T10:00:00.000Z"

# Per tokenizer repo: special tokens and the few config values the files carry.
TOKENIZERS = {
    "Qwen/Qwen2.5-1.5B-Instruct": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>",
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072,
        "chat_template": ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
        "config": {"bos_token_id": 151643, "eos_token_id": 151645, "max_position_embeddings": 32768,
                   "tie_word_embeddings": True},
    },
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": {
        "special": ["<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
                    "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>", "<think>", "</think>"],
        "bos": "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "eos": "<\uff5cend\u2581of\u2581sentence\uff5c>",
        "pad": "<\uff5cend\u2581of\u2581sentence\uff5c>",
        "tokenizer_class": "LlamaTokenizerFast", "model_max_length": 16384,
        "chat_template": ("{{ bos_token }}{% for message in messages %}"
                          "{% if message['role'] == 'user' %}<\uff5cUser\uff5c>{{ message['content'] }}"
                          "{% else %}<\uff5cAssistant\uff5c>{{ message['content'] }}"
                          "<\uff5cend\u2581of\u2581sentence\uff5c>{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}<\uff5cAssistant\uff5c><think>\n{% endif %}"),
        "config": {"bos_token_id": 151646, "eos_token_id": 151643, "max_position_embeddings": 131072,
                   "tie_word_embeddings": False},
    },
}
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


class BuildError(Exception):
    """A problem with the inputs, reported as one sentence."""


# --- identities ---------------------------------------------------------------------------

def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_id(data: bytes) -> str:
    """Git's blob id: SHA-1 of ``blob <size>\\0`` followed by the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def identity(data: bytes) -> dict:
    return {"sha256": sha256_hex(data), "git_blob": git_blob_id(data), "size": len(data)}


def lab_revision(repo: str) -> str:
    """A fixed 40-hex Hugging Face commit id for a lab repo (same on every build)."""
    return hashlib.sha1(("rkllm-lab huggingface revision " + repo).encode()).hexdigest()


def hf_path(url: str) -> str:
    """Tree path of an ``https://host/path`` URL."""
    scheme, separator, rest = url.partition("://")
    if scheme != "https" or not separator or not rest:
        raise ValueError("not an https URL: " + url)
    return rest


# --- content ------------------------------------------------------------------------------

def deterministic_bytes(seed: str, size: int) -> bytes:
    out = bytearray()
    counter = 0
    base = hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        out += hashlib.sha256(base + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def model_file(model: str, platform: str) -> bytes:
    header = {"model": model, "platform": platform, "toolkit_version": MODEL_TOOLKIT,
              "dtype": MODEL_DTYPE, "max_context": MODEL_MAX_CONTEXT}
    body = (MODEL_MAGIC + json.dumps(header).encode() + b"\n"
            + deterministic_bytes("rkllm-lab model %s %s" % (model, platform), MODEL_FILLER_BYTES))
    return body + hashlib.sha256(body).digest()


def placeholder_runtime(version: str, arch: str) -> bytes:
    """An ELF64 header naming the right machine, then a note saying this is no library."""
    header = bytearray(64)
    header[0:4] = b"\x7fELF"
    header[4] = 2  # ELFCLASS64
    header[5] = 1  # little endian
    header[6] = 1  # EV_CURRENT
    header[16:18] = (3).to_bytes(2, "little")  # ET_DYN
    header[18:20] = _ELF_MACHINE[arch].to_bytes(2, "little")
    header[20:24] = (1).to_bytes(4, "little")
    header[52:54] = (64).to_bytes(2, "little")
    note = ("RKLLM-LAB-PLACEHOLDER librkllmrt.so version %s arch %s: the lab runtime library was "
            "not built (%s is missing)\n" % (version, arch, RUNTIME_DIST.format(version=version, arch=arch)))
    return bytes(header) + note.encode()


def _byte_level_alphabet() -> list:
    """The 256 printable characters byte-level BPE tokenizers use for the 256 byte values."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    chars = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def tokenizer_files(repo: str) -> dict:
    """Small but well-formed tokenizer.json, tokenizer_config.json and config.json for a repo."""
    spec = TOKENIZERS[repo]
    vocab = {char: index for index, char in enumerate(_byte_level_alphabet())}
    added = []
    for offset, token in enumerate(spec["special"]):
        added.append({"id": len(vocab) + offset, "content": token, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }
    tokenizer_config = {
        "add_bos_token": spec["bos"] is not None,
        "add_eos_token": False,
        "bos_token": spec["bos"],
        "chat_template": spec["chat_template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": spec["eos"],
        "model_max_length": spec["model_max_length"],
        "pad_token": spec["pad"],
        "tokenizer_class": spec["tokenizer_class"],
        "unk_token": None,
    }
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "vocab_size": 151936,
    }
    config.update(spec["config"])
    return {
        "config.json": _json_bytes(config),
        "tokenizer.json": _json_bytes(tokenizer),
        "tokenizer_config.json": _json_bytes(tokenizer_config),
    }


def model_repo_extras(repo: str, model: str, platform: str) -> dict:
    gitattributes = ("*.bin filter=lfs diff=lfs merge=lfs -text\n"
                     "*.rkllm filter=lfs diff=lfs merge=lfs -text\n"
                     "*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    readme = ("---\nlicense: apache-2.0\nlibrary_name: rkllm\ntags:\n- rkllm\n- %s\n---\n\n"
              "# %s\n\n%s converted with RKLLM toolkit %s for %s (%s). Lab copy: the .rkllm file is a lab "
              "model that only the lab's rkllama stand-in loads.\n"
              % (platform, repo.split("/", 1)[1], model, MODEL_TOOLKIT, platform.upper(), MODEL_DTYPE))
    return {".gitattributes": gitattributes.encode(), "README.md": readme.encode()}


def hf_tree_entries(files: dict) -> list:
    """The Hugging Face tree API answer for a flat repo: LFS only for .rkllm files."""
    entries = []
    for name in sorted(files):
        data = files[name]
        if name.endswith(".rkllm"):
            pointer = LFS_POINTER.format(sha256=sha256_hex(data), size=len(data)).encode()
            entries.append({"type": "file", "oid": git_blob_id(pointer), "size": len(data),
                            "lfs": {"oid": sha256_hex(data), "size": len(data), "pointerSize": len(pointer)},
                            "path": name})
        else:
            entries.append({"type": "file", "oid": git_blob_id(data), "size": len(data), "path": name})
    return entries


def hf_model_info(repo: str, revision: str, files: dict) -> dict:
    org = repo.split("/", 1)[0]
    return {"_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo, "author": org,
            "sha": revision, "lastModified": HF_LAST_MODIFIED, "private": False, "disabled": False,
            "gated": False, "tags": [], "siblings": [{"rfilename": name} for name in sorted(files)]}


# --- git ----------------------------------------------------------------------------------

def _git_env(home: Path) -> dict:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TZ": "UTC",
        "LC_ALL": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": GIT_IDENTITY[0],
        "GIT_AUTHOR_EMAIL": GIT_IDENTITY[1],
        "GIT_COMMITTER_NAME": GIT_IDENTITY[0],
        "GIT_COMMITTER_EMAIL": GIT_IDENTITY[1],
    }
    return env


def _git(env: dict, *args: str, cwd: Path | None = None) -> str:
    cmd = ["git", "-c", "core.fileMode=true", "-c", "core.autocrlf=false", "-c", "commit.gpgSign=false",
           "-c", "tag.gpgSign=false", "-c", "init.defaultBranch=" + GIT_BRANCH, "-c", "pack.threads=1",
           "-c", "repack.writeBitmaps=false", "-c", "pack.writeReverseIndex=false", "-c", "gc.auto=0",
           "-c", "core.hooksPath=" + os.devnull] + list(args)
    try:
        result = subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise BuildError("git is not installed: install it (apt-get install git) and run the build again") from exc
    except subprocess.CalledProcessError as exc:
        raise BuildError("%s failed: %s" % (" ".join(args[:2]), exc.stderr.strip())) from exc
    return result.stdout.strip()


def _excluded(rel: str) -> bool:
    parts = rel.split("/")
    return (any(p in EXCLUDED_NAMES or p.endswith(".egg-info") for p in parts)
            or parts[-1].endswith(EXCLUDED_SUFFIXES))


def source_files(source: Path) -> list:
    """Relative paths of a stand-in's files, sorted, without caches or build droppings.

    In a git checkout these are the files git would commit (tracked, or untracked and not
    ignored), so a developer's local leftovers never make the pins differ from CI's.
    """
    try:
        listed = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard", "--full-name", "--", "."],
                                check=True, capture_output=True).stdout
        top = subprocess.run(["git", "-C", str(source), "rev-parse", "--show-toplevel"],
                             check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return _walk_files(source)
    found = set()
    for name in listed.decode("utf-8", "surrogateescape").split("\0"):
        if not name:
            continue
        path = Path(top, name)
        if path.is_symlink() or not path.is_file():
            continue
        rel = path.resolve().relative_to(source.resolve()).as_posix()
        if not _excluded(rel):
            found.add(rel)
    return sorted(found)


def _walk_files(source: Path) -> list:
    found = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not _excluded(d))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(source).as_posix()
            if not _excluded(rel) and not path.is_symlink() and path.is_file():
                found.append(rel)
    return sorted(found)


def build_git_repo(name: str, source: Path, bare: Path, work: Path, env: dict) -> dict:
    """Create the bare repo with commits v1, v2, broken and tags lab-*; return {version: commit}."""
    _source_dir, _url, fault = GIT_REPOS[name]
    files = source_files(source) if source.is_dir() else []
    placeholder = not files
    bare.mkdir(parents=True)
    _git(env, "init", "--quiet", "--bare", "--template=", str(bare))
    tree_dir = work / name
    tree_dir.mkdir(parents=True)
    if placeholder:
        (tree_dir / "README.md").write_text(
            "Placeholder: %s did not exist when the lab upstream was built.\n" % GIT_REPOS[name][0])
    for rel in files:
        dest = tree_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, dest)
        dest.chmod(0o755 if (source / rel).stat().st_mode & 0o111 else 0o644)
    index = work / (name + ".index")
    genv = dict(env, GIT_DIR=str(bare), GIT_WORK_TREE=str(tree_dir), GIT_INDEX_FILE=str(index))
    commits = {}
    parent = None
    for version, date in GIT_VERSIONS:
        build_info = {"version": version, "fault": fault if version == "broken" else None}
        (tree_dir / "lab_build.json").write_text(json.dumps(build_info) + "\n")
        (tree_dir / "lab_build.json").chmod(0o644)
        _git(genv, "add", "--all", "--force", ".", cwd=tree_dir)
        tree = _git(genv, "write-tree")
        cenv = dict(genv, GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date)
        args = ["commit-tree", tree, "-m", version]
        if parent:
            args += ["-p", parent]
        parent = _git(cenv, *args)
        commits[version] = parent
        _git(genv, "update-ref", "refs/tags/" + GIT_TAG_PREFIX + version, parent)
    _git(genv, "update-ref", "refs/heads/" + GIT_BRANCH, commits[GIT_DEFAULT_VERSION])
    _git(genv, "symbolic-ref", "HEAD", "refs/heads/" + GIT_BRANCH)
    _git(genv, "pack-refs", "--all")
    _git(genv, "repack", "-a", "-d", "-q", "--no-write-bitmap-index")
    _git(genv, "prune-packed")
    _git(genv, "update-server-info")
    # Only what a dumb-protocol client reads, nothing that records when or where it was built.
    for leftover in ("index", "logs", "hooks", "description", "info/exclude", "COMMIT_EDITMSG", "ORIG_HEAD"):
        path = bare / leftover
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    index.unlink(missing_ok=True)
    return {"commits": commits, "placeholder": placeholder}


# --- tree ---------------------------------------------------------------------------------

def _write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


def build_tree(out: Path, repo_root: Path = REPO_ROOT) -> dict:
    """Lay out the whole upstream under ``out`` (must not exist); return the pins."""
    out.mkdir(parents=True)
    headers = {}
    placeholders = []
    pins = {"upstream_url": UPSTREAM_URL, "runtime": {}}

    for version in RUNTIME_VERSIONS:
        pins["runtime"][version] = {}
        for arch in RUNTIME_ARCHES:
            dist = repo_root / RUNTIME_DIST.format(version=version, arch=arch)
            if dist.is_file():
                data = dist.read_bytes()
            else:
                data = placeholder_runtime(version, arch)
                placeholders.append(dist.relative_to(repo_root).as_posix())
            url = RUNTIME_URL.format(version=version, arch=arch)
            _write(out, hf_path(url), data)
            pins["runtime"][version][arch] = dict(url=url, **identity(data))

    with tempfile.TemporaryDirectory(prefix="rkllm-lab-git-") as tmp:
        env = _git_env(Path(tmp))
        for name in sorted(GIT_REPOS):
            source_dir, url, _fault = GIT_REPOS[name]
            bare = out / (hf_path(url) + ".git")
            result = build_git_repo(name, repo_root / source_dir, bare, Path(tmp) / "work", env)
            if result["placeholder"]:
                placeholders.append(source_dir)
            pins[name] = {"url": url, "commits": result["commits"]}

    pins["models"] = {}
    done_tokenizers = {}
    for model in sorted(MODELS):
        spec = MODELS[model]
        tok_repo = spec["tokenizer_repo"]
        tok_rev = lab_revision(tok_repo)
        tok_files = tokenizer_files(tok_repo)
        if tok_repo not in done_tokenizers:
            _publish_hf_repo(out, headers, tok_repo, tok_rev, tok_files)
            done_tokenizers[tok_repo] = True
        entry = {
            "tokenizer_repo": tok_repo,
            "tokenizer_revision": tok_rev,
            "tokenizer_files": [
                dict(name=name, url="https://huggingface.co/%s/resolve/%s/%s" % (tok_repo, tok_rev, name),
                     **identity(tok_files[name]))
                for name in TOKENIZER_FILES
            ],
            "files": {},
        }
        for platform in sorted(spec["files"]):
            repo, filename = spec["files"][platform]
            revision = lab_revision(repo)
            data = model_file(model, platform)
            files = model_repo_extras(repo, model, platform)
            files[filename] = data
            _publish_hf_repo(out, headers, repo, revision, files)
            entry["files"][platform] = dict(
                repo=repo, revision=revision, file=filename,
                url="https://huggingface.co/%s/resolve/%s/%s" % (repo, revision, filename), **identity(data))
        pins["models"][model] = entry

    _normalise_modes(out)
    _write(out, HEADERS_INDEX, (json.dumps(headers, indent=1, sort_keys=True) + "\n").encode())
    _write(out, MARKER, (json.dumps({"built_by": "lab/upstream/build.py", "placeholders": placeholders},
                                    indent=1) + "\n").encode())
    return {"pins": pins, "placeholders": placeholders}


def _normalise_modes(root: Path) -> None:
    """World-readable, owner-writable, whatever the umask or git chose (the server may run as anyone)."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def _publish_hf_repo(out: Path, headers: dict, repo: str, revision: str, files: dict) -> None:
    """Files at resolve/<revision>/, the tree API answer and the model info for one revision."""
    for name in sorted(files):
        data = files[name]
        rel = "huggingface.co/%s/resolve/%s/%s" % (repo, revision, name)
        _write(out, rel, data)
        if name.endswith(".rkllm"):
            etag = sha256_hex(data)
            headers["/" + rel] = {"X-Repo-Commit": revision, "ETag": '"%s"' % etag,
                                  "X-Linked-Etag": '"%s"' % etag, "X-Linked-Size": str(len(data))}
        else:
            headers["/" + rel] = {"X-Repo-Commit": revision, "ETag": '"%s"' % git_blob_id(data)}
    tree = json.dumps(hf_tree_entries(files), separators=(",", ":")).encode()
    _write(out, "huggingface.co/api/models/%s/tree/%s" % (repo, revision), tree)
    info = json.dumps(hf_model_info(repo, revision, files), separators=(",", ":")).encode()
    _write(out, "huggingface.co/api/models/%s/revision/%s" % (repo, revision), info)


# --- pins file ----------------------------------------------------------------------------

YAML_MAX_LINE = 160


def _yaml_scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def _yaml_lines(value, indent: int) -> list:
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append("%s%s:" % (pad, _yaml_key(key)))
                lines.extend(_yaml_lines(item, indent + 2))
            else:
                line = "%s%s: %s" % (pad, _yaml_key(key), _yaml_empty(item))
                if len(line) > YAML_MAX_LINE:
                    # A long URL goes alone on the next line, where yamllint allows a non-breakable word.
                    lines.append("%s%s:" % (pad, _yaml_key(key)))
                    line = "%s  %s" % (pad, _yaml_empty(item))
                lines.append(line)
    else:
        for item in value:
            sub = _yaml_lines(item, indent + 2)
            lines.append(pad + "- " + sub[0].lstrip())
            lines.extend(sub[1:])
    return lines


def _yaml_key(key: str) -> str:
    plain = key.replace("_", "").replace("-", "").isalnum() and key[0].isalpha()
    return key if plain else json.dumps(key)


def _yaml_empty(value) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _yaml_scalar(value)


def render_pins(result: dict) -> str:
    header = [
        "---",
        "# Identities of everything the lab upstream serves (rkllm-lab-upstream).",
        "# Generated by `%s`; do not edit." % PINS_COMMAND,
        "# Regenerate after changing lab/stand-ins, lab/runtime/dist or lab/upstream/build.py;",
        "# tests/lab/test_upstream.py fails while this file is stale.",
    ]
    if result["placeholders"]:
        header.append("# Built with placeholders for missing inputs: " + ", ".join(result["placeholders"]))
    return "\n".join(header + _yaml_lines({"lab_pins": result["pins"]}, 0)) + "\n"


def build_in_temp(repo_root: Path = REPO_ROOT) -> dict:
    """Build a throw-away tree and return the build result (pins and placeholders)."""
    with tempfile.TemporaryDirectory(prefix="rkllm-lab-upstream-") as tmp:
        return build_tree(Path(tmp) / "tree", repo_root)


def install_tree(out: Path, repo_root: Path = REPO_ROOT) -> dict:
    """Build into a fresh sibling directory, then replace ``out`` (only if it is a lab tree)."""
    out = out.resolve()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise BuildError("%s exists and is not a lab upstream tree (no %s): choose an empty or new directory"
                         % (out, MARKER))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".building-", dir=out.parent))
    try:
        result = build_tree(staging / "tree", repo_root)
        if out.exists():
            shutil.rmtree(out)
        (staging / "tree").rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the lab upstream's content tree and the lab pins.")
    parser.add_argument("--out", type=Path, help="directory to (re)create with the served tree")
    parser.add_argument("--pins", type=Path, help="write the lab pins YAML here (e.g. %s)" % PINS_PATH)
    parser.add_argument("--check-pins", type=Path, metavar="FILE",
                        help="exit 1 when FILE differs from what the build produces now")
    args = parser.parse_args(argv)
    if not (args.out or args.pins or args.check_pins):
        parser.error("give --out DIR, --pins FILE or --check-pins FILE")
    try:
        result = install_tree(args.out) if args.out else build_in_temp()
    except BuildError as exc:
        print("build.py: " + str(exc), file=sys.stderr)
        return 2
    text = render_pins(result)
    for item in result["placeholders"]:
        print("build.py: warning: %s is missing; the upstream serves a placeholder for it" % item, file=sys.stderr)
    if args.out:
        print("built %s" % args.out)
    if args.pins:
        args.pins.parent.mkdir(parents=True, exist_ok=True)
        args.pins.write_text(text)
        print("wrote %s" % args.pins)
    if args.check_pins:
        current = args.check_pins.read_text() if args.check_pins.is_file() else ""
        if current != text:
            print("%s is stale: run `%s` and commit it" % (args.check_pins, PINS_COMMAND), file=sys.stderr)
            return 1
        print("%s is current" % args.check_pins)
    return 0


if __name__ == "__main__":
    sys.exit(main())
