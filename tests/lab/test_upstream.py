"""The lab upstream: its build (deterministic, pins current) and its server (mirror, git, counters, faults)."""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = REPO / "lab" / "upstream"
PINS_FILE = REPO / "inventories" / "lab" / "group_vars" / "all" / "lab_pins.yml"


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _import("lab_upstream_build", UPSTREAM / "build.py")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
NO_PROXY_ENV = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _manifest(root: Path) -> dict:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        mode = path.lstat().st_mode & 0o777
        out[rel] = (mode, _sha256(path.read_bytes()) if path.is_file() else None)
    return out


def _start_server(root: Path, log: Path):
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-u", str(UPSTREAM / "server.py"), "--root", str(root), "--port", "0", "--bind", "127.0.0.1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = log.read_text()
        if "serving" in text:
            port = int(text.split("http://127.0.0.1:", 1)[1].split()[0])
            return proc, "http://127.0.0.1:%d" % port
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the lab upstream server did not start: " + log.read_text())


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    tree = tmp_path_factory.mktemp("upstream") / "tree"
    result = build.build_tree(tree)
    return tree, result


@pytest.fixture(scope="session")
def pins(built):
    return built[1]["pins"]


@pytest.fixture(scope="session")
def server(built, tmp_path_factory):
    proc, base = _start_server(built[0], tmp_path_factory.mktemp("log") / "server.log")
    yield base
    proc.terminate()
    proc.wait(timeout=10)


def get(url: str, method: str = "GET"):
    request = urllib.request.Request(url, method=method)
    try:
        with OPENER.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def post(url: str):
    return get(url, method="POST")


def mirror(base: str, url: str) -> str:
    """The mirror URL of an upstream URL, as the roles build it from rkllm_mirror_url."""
    return base + "/" + url.split("://", 1)[1]


def raw_status(base: str, path: str) -> int:
    host, port = base.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


# --- the build -----------------------------------------------------------------------------


def test_committed_pins_are_current(built):
    expected = build.render_pins(built[1])
    current = PINS_FILE.read_text() if PINS_FILE.is_file() else ""
    assert current == expected, (
        "%s is stale: the lab upstream now serves other content. Run `%s` and commit the result."
        % (PINS_FILE.relative_to(REPO), build.PINS_COMMAND))


def test_committed_pins_are_valid_yaml_for_the_inventory(built):
    data = yaml.safe_load(build.render_pins(built[1]))
    assert list(data) == ["lab_pins"]
    assert data["lab_pins"] == json.loads(json.dumps(built[1]["pins"]))


def test_two_builds_give_identical_trees(built, tmp_path):
    again = build.build_tree(tmp_path / "again")
    assert again["pins"] == built[1]["pins"]
    first, second = _manifest(built[0]), _manifest(tmp_path / "again")
    assert sorted(first) == sorted(second)
    differing = [path for path in first if first[path] != second[path]]
    assert not differing, "files differ between two builds: %s" % differing


def test_out_refuses_to_replace_a_directory_it_did_not_build(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    assert build.main(["--out", str(precious)]) == 2
    assert (precious / "keep.txt").read_text() == "mine"
    assert "is not a lab upstream tree" in capsys.readouterr().err


def test_out_rebuilds_its_own_tree(tmp_path):
    out = tmp_path / "root"
    assert build.main(["--out", str(out)]) == 0
    (out / "stale-file").write_text("left over")
    assert build.main(["--out", str(out)]) == 0
    assert not (out / "stale-file").exists()
    assert (out / build.MARKER).is_file()


def test_check_pins_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "lab_pins.yml"
    stale.write_text("---\nlab_pins: {}\n")
    assert build.main(["--check-pins", str(stale)]) == 1
    assert build.PINS_COMMAND in capsys.readouterr().err


# --- what the server serves ------------------------------------------------------------------


def test_every_pinned_artifact_is_served_with_its_pinned_identity(server, pins):
    artifacts = []
    for arches in pins["runtime"].values():
        artifacts.extend(arches.values())
    for model in pins["models"].values():
        artifacts.extend(model["tokenizer_files"])
        artifacts.extend(model["files"].values())
    assert len(artifacts) == 4 + 2 * 3 + 4
    for artifact in artifacts:
        status, _headers, body = get(mirror(server, artifact["url"]))
        assert status == 200, artifact["url"]
        assert (_sha256(body), _git_blob(body), len(body)) == (
            artifact["sha256"], artifact["git_blob"], artifact["size"]), artifact["url"]


def test_runtime_libraries_are_elf_objects_for_their_arch(server, pins):
    machines = {"aarch64": 183, "x86_64": 62}
    for version, arches in pins["runtime"].items():
        assert "release-v%s/" % version in arches["aarch64"]["url"]
        for arch, artifact in arches.items():
            _status, headers, body = get(mirror(server, artifact["url"]))
            assert body[:4] == b"\x7fELF"
            assert int.from_bytes(body[18:20], "little") == machines[arch], (version, arch)
            assert headers["Content-Type"] == "application/octet-stream"


def test_model_files_are_lab_models_for_their_platform(server, pins):
    for name, model in pins["models"].items():
        for platform, artifact in model["files"].items():
            _status, _headers, body = get(mirror(server, artifact["url"]))
            magic, header, _rest = body.split(b"\n", 2)
            assert magic == b"RKLLM-LAB-MODEL 1"
            assert json.loads(header) == {"model": name, "platform": platform, "toolkit_version": "1.1.4",
                                          "dtype": "W8A8", "max_context": 4096}
            assert hashlib.sha256(body[:-32]).digest() == body[-32:], artifact["url"]
            assert artifact["file"].endswith(".rkllm") and platform in artifact["file"]


def test_hugging_face_tree_api_publishes_the_lfs_identity(server, pins):
    for model in pins["models"].values():
        for artifact in model["files"].values():
            for suffix in ("", "?recursive=false"):
                status, headers, body = get("%s/huggingface.co/api/models/%s/tree/%s%s"
                                            % (server, artifact["repo"], artifact["revision"], suffix))
                assert status == 200
                assert headers["Content-Type"] == "application/json"
                entries = {entry["path"]: entry for entry in json.loads(body)}
                entry = entries[artifact["file"]]
                assert entry["type"] == "file"
                assert entry["size"] == artifact["size"]
                assert entry["lfs"]["oid"] == artifact["sha256"]
                assert entry["lfs"]["size"] == artifact["size"]
                # As on Hugging Face, the entry's oid is the LFS pointer's blob, not the content's.
                pointer = ("version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n"
                           % (artifact["sha256"], artifact["size"])).encode()
                assert entry["oid"] == _git_blob(pointer)
                assert entry["lfs"]["pointerSize"] == len(pointer)
                assert "lfs" not in entries[".gitattributes"]


def test_hugging_face_tree_api_lists_tokenizer_files_by_git_blob(server, pins):
    for model in pins["models"].values():
        status, _headers, body = get("%s/huggingface.co/api/models/%s/tree/%s"
                                     % (server, model["tokenizer_repo"], model["tokenizer_revision"]))
        assert status == 200
        entries = {entry["path"]: entry for entry in json.loads(body)}
        assert set(entries) == {f["name"] for f in model["tokenizer_files"]}
        for pinned in model["tokenizer_files"]:
            assert entries[pinned["name"]]["oid"] == pinned["git_blob"]
            assert entries[pinned["name"]]["size"] == pinned["size"]
            assert "lfs" not in entries[pinned["name"]]
            _status, _h, data = get(mirror(server, pinned["url"]))
            json.loads(data)


def test_resolve_answers_carry_hugging_face_headers(server, pins):
    artifact = pins["models"]["Qwen2.5-1.5B-Instruct"]["files"]["rk3588"]
    status, headers, _body = get(mirror(server, artifact["url"]), method="HEAD")
    assert status == 200
    assert headers["X-Repo-Commit"] == artifact["revision"]
    assert headers["ETag"] == '"%s"' % artifact["sha256"]
    assert headers["Content-Length"] == str(artifact["size"])


def test_missing_files_are_404(server):
    status, _headers, body = get(server + "/github.com/airockchip/rknn-llm/raw/release-v9.9.9/librkllmrt.so")
    assert status == 404
    assert "not found" in json.loads(body)["error"]


# --- git over the dumb protocol --------------------------------------------------------------


@pytest.mark.parametrize("name,suffix", [("rkllama", ""), ("exo", ".git")])
def test_git_clone_checks_out_every_lab_version(server, pins, tmp_path, name, suffix):
    url = mirror(server, pins[name]["url"]) + suffix
    env = dict(NO_PROXY_ENV, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0")
    checkout = tmp_path / "clone"

    def git(*args):
        return subprocess.run(["git", "-C", str(checkout), *args], env=env, check=True,
                              capture_output=True, text=True).stdout.strip()

    subprocess.run(["git", "clone", "-q", url, str(checkout)], env=env, check=True, capture_output=True, text=True)
    # A plain clone lands on main = v2.
    assert git("rev-parse", "HEAD") == pins[name]["commits"]["v2"]
    assert json.loads((checkout / "lab_build.json").read_text()) == {"version": "v2", "fault": None}
    fault = {"rkllama": "load_fails", "exo": "bad_answers"}[name]
    for version, commit in pins[name]["commits"].items():
        git("checkout", "-q", "lab-" + version)
        assert git("rev-parse", "HEAD") == commit
        expected = {"version": version, "fault": fault if version == "broken" else None}
        assert json.loads((checkout / "lab_build.json").read_text()) == expected
        tracked = git("ls-files").splitlines()
        assert not [f for f in tracked if "__pycache__" in f or f.endswith(".pyc")]
    assert git("log", "--format=%s", "lab-broken") .splitlines() == ["broken", "v2", "v1"]


# --- counters and faults ---------------------------------------------------------------------


def test_counters_count_bytes_per_path(server, pins):
    artifact = pins["runtime"]["1.2.3"]["aarch64"]
    path = "/" + artifact["url"].split("://", 1)[1]
    assert post(server + "/_lab/reset")[0] == 200
    get(server + path)
    get(server + path)
    get(server + path, method="HEAD")
    counters = json.loads(get(server + "/_lab/counters")[2])
    assert counters == {"paths": {path: 2 * artifact["size"]}, "total": 2 * artifact["size"], "requests": 3}
    post(server + "/_lab/reset")
    assert json.loads(get(server + "/_lab/counters")[2]) == {"paths": {}, "total": 0, "requests": 0}


def test_corrupt_serves_wrong_bytes_of_the_same_length_until_healed(server, pins):
    artifact = pins["models"]["DeepSeek-R1-1.5B"]["files"]["rk3576"]
    url = mirror(server, artifact["url"])
    path = "/" + artifact["url"].split("://", 1)[1]
    status, _h, body = post(server + "/_lab/corrupt?path=" + path)
    assert status == 200 and json.loads(body) == {"corrupt": [path]}
    try:
        _s, headers, bad = get(url)
        assert len(bad) == artifact["size"] == int(headers["Content-Length"])
        assert _sha256(bad) != artifact["sha256"]
        assert bad.startswith(b"RKLLM-LAB-MODEL 1\n")  # the header survives; only the identity gives it away
        assert json.loads(get(server + "/_lab/health")[2])["corrupt"] == [path]
    finally:
        assert post(server + "/_lab/heal")[0] == 200
    assert _sha256(get(url)[2]) == artifact["sha256"]


def test_corrupt_applies_to_git_objects_under_either_repo_name(server, pins):
    info_refs = mirror(server, pins["rkllama"]["url"]) + "/info/refs"
    good = get(info_refs)[2]
    post(server + "/_lab/corrupt?path=/github.com/jfreed-dev/rkllama.git/info/refs")
    try:
        assert get(info_refs)[2] != good
    finally:
        post(server + "/_lab/heal?path=/github.com/jfreed-dev/rkllama/info/refs")
    assert get(info_refs)[2] == good


def test_corrupt_of_an_unknown_path_is_404(server):
    status, _h, body = post(server + "/_lab/corrupt?path=/example.com/nothing")
    assert status == 404 and "no file" in json.loads(body)["error"]


def test_directory_traversal_is_refused(server, tmp_path):
    for path in ("/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/github.com/..%2f..%2f..%2fetc/passwd",
                 "/.lab/headers.json"):
        assert raw_status(server, path) in (403, 404), path
    # A link inside the root that points out of it is refused too.
    root = tmp_path / "root"
    root.mkdir()
    (root / "inside").write_text("ok")
    (root / "escape").symlink_to("/etc/hostname")
    proc, base = _start_server(root, tmp_path / "log")
    try:
        assert get(base + "/inside")[2] == b"ok"
        assert raw_status(base, "/escape") == 403
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("in_git", [True, False])
def test_stand_in_caches_and_ignored_files_stay_out_of_the_repos(tmp_path, in_git):
    source = tmp_path / "lab" / "stand-ins" / "rkllama"
    (source / "pkg" / "__pycache__").mkdir(parents=True)
    (source / "server.py").write_text("print('hi')\n")
    (source / "pkg" / "mod.py").write_text("")
    (source / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (source / "lab_build.json").write_text('{"version": "dev"}\n')
    if in_git:
        (tmp_path / ".gitignore").write_text("*.log\n")
        (source / "local.log").write_text("noise")
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, env=NO_PROXY_ENV)
    assert build.source_files(source) == ["pkg/mod.py", "server.py"]
