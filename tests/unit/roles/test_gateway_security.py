"""The gateway's security controls (issue 13, docs/security.md), from renders of the roles' own templates.

Templates are rendered by ansible-playbook itself (the real filters, the roles' defaults and vars), then
read as a user of the gateway would meet them: who may use the artifact mirror, which origins it fetches
from, which path a board gets, whether one key can flood the boards. The preflight checks are run the
same way. With the Docker lab's gateway running, every render is also checked with `nginx -t` there.
"""

import json
import os
import re
import shutil
import subprocess
import uuid

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
NGINX_ROLE = os.path.join(REPO, "roles", "gateway_nginx")
PROM_ROLE = os.path.join(REPO, "roles", "gateway_prometheus")
LAB_GATEWAY = "rkllm-lab-gateway"
LAB_LOCK = "/tmp/rkllm-lab.lock"

MIRROR_VARS = {
    "gateway_nginx_mirror_enabled": True,
    "_gateway_nginx_resolver": ["127.0.0.11"],
    "_gateway_nginx_mirror_client_addresses": ["172.18.0.2", "172.18.0.3"],
    "_gateway_nginx_upstreams": [{"name": "b1", "address": "172.18.0.2:52415", "drained": False}],
    "gateway_nginx_api_keys": ["k" * 24],
}


# Added to run_play's environment (conftest.py).
ENV = {"ANSIBLE_ROLES_PATH": os.path.join(REPO, "roles"), "ANSIBLE_FACT_CACHING": "memory"}


def render(run_play, tmp_path, role, templates, extra_vars):
    """Render each of a role's templates with its defaults and vars plus extra_vars; return {name: text}."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    play = f"""
    - hosts: localhost
      gather_facts: false
      vars_files:
        - {role}/defaults/main.yml
        - {role}/vars/main.yml
      tasks:
        - name: Render
          ansible.builtin.template:
            src: {role}/templates/{{{{ item }}}}.j2
            dest: {out}/{{{{ item }}}}
            mode: "0644"
          loop: {json.dumps(templates)}
    """
    res = run_play(tmp_path, play, extra_vars, args=["-c", "local"], cwd=tmp_path, env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    return {t: (out / t).read_text() for t in templates}


def preflight(run_play, tmp_path, role, tasks_from, extra_vars, check=False):
    play = f"""
    - hosts: localhost
      gather_facts: true
      gather_subset: [min]
      tasks:
        - name: Run the checks
          ansible.builtin.include_role:
            name: {role}
            tasks_from: {tasks_from}
    """
    return run_play(tmp_path, play, extra_vars, args=["-c", "local"], check=check, cwd=tmp_path, env=ENV)


def pcre(regex):
    """nginx's PCRE named groups (?<n>...) in Python's spelling."""
    return re.compile(re.sub(r"\(\?<(?=[A-Za-z])", "(?P<", regex))


def server_block(text, marker):
    """The text of the server { } block containing marker."""
    at = text.index(marker)
    start = text.rindex("server {", 0, at)
    depth, i = 0, start
    while True:
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
        i += 1


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, run_play):
    tmp = tmp_path_factory.mktemp("mirror")
    return render(run_play, tmp, NGINX_ROLE, ["rkllm-mirror.conf"], dict(MIRROR_VARS, gateway_nginx_mirror_allow=["10.9.0.0/24"],
                                                                         gateway_nginx_mirror_allowed_origins=["files.pythonhosted.org"]))["rkllm-mirror.conf"]


@pytest.fixture(scope="module")
def mirror_lab(tmp_path_factory, run_play):
    tmp = tmp_path_factory.mktemp("mirror_lab")
    return render(run_play, tmp, NGINX_ROLE, ["rkllm-mirror.conf"], dict(MIRROR_VARS, gateway_nginx_mirror_upstream="http://rkllm-lab-upstream:8000",
                                                                         gateway_nginx_mirror_upstream_allow_http=True))["rkllm-mirror.conf"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, run_play):
    tmp = tmp_path_factory.mktemp("gateway")
    return render(run_play, tmp, NGINX_ROLE, ["nginx.conf", "api-keys.conf", "prometheus-nginx-exporter.default"],
                  dict(MIRROR_VARS, gateway_nginx_prometheus_port=9090, gateway_nginx_prometheus_backend="127.0.0.1:9091",
                       gateway_nginx_prometheus_allow=["172.18.0.1"]))


# --- the artifact mirror -----------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["mirror", "mirror_lab"])
def test_mirror_answers_only_the_boards(fixture, request):
    server = server_block(request.getfixturevalue(fixture), "rkllm_mirror;")
    rules = re.findall(r"^    (allow|deny) ([^;]+);", server, re.M)
    assert rules == [("allow", "127.0.0.1"), ("allow", "::1"), ("allow", "172.18.0.2"), ("allow", "172.18.0.3")] + \
        ([("allow", "10.9.0.0/24")] if fixture == "mirror" else []) + [("deny", "all")]


def test_mirror_serves_get_and_head_only(mirror):
    server = server_block(mirror, "rkllm_mirror;")
    match = re.search(r"if \(\$request_method !~ \^\((?P<m>[A-Z|]+)\)\$\) \{\s+return 405;\s+\}\s+error_page 405 = @rkllm_mirror_method;", server)
    assert match and match.group("m") == "GET|HEAD"
    named = server.split("location @rkllm_mirror_method {")[1].split("}")[0]
    assert 'add_header Allow "GET, HEAD" always;' in named and "return 405" in named


def origin_regex(text):
    found = set(re.findall(r'if \(\$rkllm_mirror_(?:redirect_)?host !~\* "([^"]+)"\)', text))
    assert len(found) == 1, found  # the first fetch and every redirect check the same list
    return re.compile(found.pop(), re.I)


@pytest.mark.parametrize("host,allowed", [
    ("github.com", True), ("codeload.github.com", True), ("objects.githubusercontent.com", True),
    ("release-assets.githubusercontent.com", True), ("huggingface.co", True), ("cdn-lfs-us-1.hf.co", True),
    ("cas-bridge.xethub.hf.co", True), ("cdn-lfs.huggingface.co", True), ("files.pythonhosted.org", True),
    ("evil.example.com", False), ("github.com.evil.example.com", False), ("evilgithub.com", False), ("127.0.0.1", False),
    ("rkllm-lab-gateway", False), ("hf.co.evil.example", False), ("pypi.org", False),
])
def test_mirror_fetches_only_from_allowed_origins(mirror, host, allowed):
    assert bool(origin_regex(mirror).match(host)) is allowed


def host_of(mirror_text, request_uri):
    regex = re.search(r'map \$request_uri \$rkllm_mirror_host \{\s+"~([^"]+)" \$h;', mirror_text).group(1)
    match = pcre(regex).match(request_uri)
    return match.group("h") if match else ""


@pytest.mark.parametrize("uri,host", [
    ("/github.com/airockchip/rknn-llm/raw/release-v1.2.3/x/librkllmrt.so", "github.com"),
    ("/github.com/jfreed-dev/rkllama/info/refs?service=git-upload-pack", "github.com"),
    ("/huggingface.co/api/models/c01zaut/Qwen/tree/main", "huggingface.co"),
    ("/127.0.0.1:9090/api/v1/targets", ""),
    ("/github.com:8443/x", ""),
    ("/github.com/../evil.example.com/x", ""),
    ("/github.com/a/./b", ""),
    ("/github.com/%2e%2e/evil.example.com/x", ""),
    ("/github.com/a%2Fb", ""),
    ("/github.com/a%5c..%5cb", ""),
    ("/github.com/a b", ""),
    ("/github.com", ""),
])
def test_mirror_reads_the_host_only_from_a_plain_uri(mirror, uri, host):
    assert host_of(mirror, uri) == host


@pytest.mark.parametrize("fixture", ["mirror", "mirror_lab"])
def test_mirror_redirects_are_checked_and_https_only(fixture, request):
    text = request.getfixturevalue(fixture)
    block = text[text.index("location @rkllm_mirror_redirect"):]
    assert '"^https://(?<rkllm_rh>' in block
    check = block.index('if ($rkllm_mirror_redirect_host !~*')
    assert "return 502" in block[check:check + 1000]
    assert check < block.index("proxy_pass")
    # The location is never passed on as given.
    assert "proxy_pass $rkllm_mirror_location" not in text
    if fixture == "mirror_lab":
        assert "proxy_pass http://rkllm_mirror_upstream/$rkllm_mirror_redirect_host$rkllm_mirror_redirect_path;" in block


def test_mirror_refetch_is_not_the_clients_to_ask(mirror):
    assert "$http_x_rkllm_refresh;" not in mirror.split("geo $rkllm_mirror_refresh_source")[0]
    assert re.search(r"proxy_cache_bypass \$rkllm_mirror_mutable \$rkllm_mirror_refresh;", mirror)
    geo = re.search(r"geo \$rkllm_mirror_refresh_source \{([^}]*)\}", mirror).group(1)
    assert re.findall(r"^\s+(\S+) 1;", geo, re.M) == ["127.0.0.1", "::1"]


# --- the API ------------------------------------------------------------------------------------------

def test_boards_get_the_normalised_path(gateway):
    conf = gateway["nginx.conf"]
    v1 = conf.split("location /v1/ {")[1].split("\n        }\n")[0]
    # The router picks the pool; both named locations it hands the request to pass $uri, not $request_uri.
    for name in ("@rkllm_pool", "@rkllm_pool_rewritten"):
        block = conf.split("location %s {" % name)[1].split("\n        }\n")[0]
        assert "proxy_pass http://$rkllm_upstream$uri$is_args$args;" in block, name
    assert "$request_uri" not in v1
    assert re.search(r'if \(\$uri !~ "\^/v1/\[A-Za-z0-9\._~:@/-\]\*\$"\) \{\s+return 400', v1)


def test_each_key_is_limited(gateway):
    conf = gateway["nginx.conf"]
    assert "limit_req_zone $rkllm_limit_key zone=rkllm_key_rate:10m rate=10r/s;" in conf
    assert "limit_conn_zone $rkllm_limit_key zone=rkllm_key_conns:10m;" in conf
    v1 = conf.split("location /v1/ {")[1].split("\n        }\n")[0]
    assert "limit_req zone=rkllm_key_rate burst=20 nodelay;" in v1
    assert "limit_conn rkllm_key_conns 32;" in v1
    key_map = re.search(r"map \$rkllm_api_key \$rkllm_limit_key \{([^}]*)\}", conf).group(1)
    assert '"~^key[0-9]+$" $rkllm_api_key;' in key_map and "none $binary_remote_addr;" in key_map


def test_tls_is_forward_secret_without_tickets(tmp_path, run_play):
    conf = render(run_play, tmp_path, NGINX_ROLE, ["nginx.conf"], dict(MIRROR_VARS, gateway_nginx_tls_cert="/etc/ssl/x.pem",
                                                                       gateway_nginx_tls_key="/etc/ssl/x.key"))["nginx.conf"]
    assert "ssl_session_tickets off;" in conf
    ciphers = re.search(r"ssl_ciphers ([^;]+);", conf).group(1).split(":")
    assert ciphers and all(c.startswith("ECDHE-") for c in ciphers)
    assert "listen 443 ssl;" in conf


# --- Prometheus and the nginx exporter -------------------------------------------------------------------

def test_exporter_and_prometheus_listen_on_loopback(gateway, tmp_path, run_play):
    assert "--web.listen-address=127.0.0.1:9113" in gateway["prometheus-nginx-exporter.default"]
    prom = render(run_play, tmp_path, PROM_ROLE, ["prometheus.default"], {})["prometheus.default"]
    assert "--web.listen-address=127.0.0.1:9090 " in prom


def test_prometheus_front_answers_only_the_allow_list(gateway):
    server = server_block(gateway["nginx.conf"], "listen 9090;")
    assert re.findall(r"^        (allow|deny) ([^;]+);", server, re.M) == [
        ("allow", "127.0.0.1"), ("allow", "::1"), ("allow", "172.18.0.1"), ("deny", "all")]
    assert "proxy_pass http://127.0.0.1:9091;" in server


# --- preflight -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,refused", [
    ({}, "gateway_nginx_api_keys_required: false"),
    ({"gateway_nginx_api_keys": ["short-key"]}, "at least 20 characters"),
    ({"gateway_nginx_api_keys": ["x" * 19]}, "at least 20 characters"),
    ({"gateway_nginx_api_keys": ["x" * 20], "gateway_nginx_key_rate": "lots"}, "gateway_nginx_key_rate must be a rate"),
    ({"gateway_nginx_api_keys": ["x" * 20], "gateway_nginx_prometheus_allow": ["0.0.0.0/0; allow all"]}, "gateway_nginx_prometheus_allow"),
    ({"gateway_nginx_api_keys": ["x" * 20]}, None),
    ({"gateway_nginx_api_keys_required": False}, None),
])
def test_gateway_preflight(tmp_path, extra, refused, run_play):
    res = preflight(run_play, tmp_path, "gateway_nginx", "preflight.yml", dict({"gateway_nginx_boards": []}, **extra))
    out = res.stdout + res.stderr
    if refused:
        assert res.returncode != 0 and refused in out, out
        assert "x" * 19 not in out  # keys are never shown
    else:
        assert res.returncode == 0, out


@pytest.mark.parametrize("extra,refused", [
    ({"gateway_nginx_mirror_upstream": "http://mirror.example.lan:8000"}, "gateway_nginx_mirror_upstream_allow_http"),
    ({"gateway_nginx_mirror_allowed_origins": ["evil.example.com/x"]}, "gateway_nginx_mirror_allowed_origins"),
    ({"gateway_nginx_mirror_allow": ["all"]}, "gateway_nginx_mirror_allow"),
    ({"gateway_nginx_mirror_refresh_allow": ["0.0.0.0/0; deny"]}, "gateway_nginx_mirror_refresh_allow"),
])
def test_mirror_preflight(tmp_path, extra, refused, run_play):
    res = preflight(run_play, tmp_path, "gateway_nginx", "mirror_config.yml", dict({"gateway_nginx_mirror_enabled": True}, **extra), check=True)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and refused in out, out


@pytest.mark.parametrize("address,refused", [("0.0.0.0:9090", True), ("192.0.2.2:9090", True), ("127.0.0.1:9091", False)])
def test_prometheus_preflight(tmp_path, address, refused, run_play):
    res = preflight(run_play, tmp_path, "gateway_prometheus", "preflight.yml",
                    {"gateway_prometheus_listen_address": address, "gateway_prometheus_boards": []})
    out = res.stdout + res.stderr
    assert (res.returncode != 0) is refused, out
    if refused:
        assert "gateway_prometheus_listen_open" in out


# --- nginx -t on the lab gateway ---------------------------------------------------------------------------

def lab_gateway_running():
    if not shutil.which("docker"):
        return False
    res = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", LAB_GATEWAY], capture_output=True, text=True, check=False)
    return res.stdout.strip() == "true"


@pytest.mark.skipif(not lab_gateway_running(), reason="the Docker lab's gateway is not running (make lab)")
@pytest.mark.parametrize("variant", ["origins", "lab-upstream", "tls"])
def test_nginx_accepts_the_renders(tmp_path, variant, run_play):
    remote = f"/tmp/rkllm-render-{uuid.uuid4().hex[:8]}"
    evars = dict(MIRROR_VARS, _gateway_nginx_api_keys_file=f"{remote}/api-keys.conf", gateway_nginx_prometheus_port=19999,
                 gateway_nginx_mirror_cache_dir=f"{remote}/cache", gateway_nginx_access_log=f"{remote}/gw.access.log",
                 gateway_nginx_mirror_allowed_origins=["files.pythonhosted.org", "*.example.org"])
    if variant == "lab-upstream":
        evars.update(gateway_nginx_mirror_upstream="http://rkllm-lab-upstream:8000", gateway_nginx_mirror_upstream_allow_http=True)
    if variant == "tls":
        evars.update(gateway_nginx_tls_cert=f"{remote}/c.pem", gateway_nginx_tls_key=f"{remote}/k.pem")
    files = render(run_play, tmp_path, NGINX_ROLE, ["nginx.conf", "api-keys.conf", "rkllm-mirror.conf"], evars)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    # The mirror's file alone, inside a minimal main file, as the role's validate step does.
    (tmp_path / "mirror-main.conf").write_text(f"events {{}}\nhttp {{\ninclude /etc/nginx/mime.types;\ninclude {remote}/rkllm-mirror.conf;\n}}\n")
    script = f"""set -e
    mkdir -p {remote}/cache
    if [ -n "{'tls' if variant == 'tls' else ''}" ]; then
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=t -days 1 -keyout {remote}/k.pem -out {remote}/c.pem 2>/dev/null
    fi
    /usr/sbin/nginx -t -q -c {remote}/mirror-main.conf
    /usr/sbin/nginx -t -q -c {remote}/nginx.conf
    rm -rf {remote}
    """
    with open(LAB_LOCK, "a", encoding="utf-8") as lock:
        import fcntl  # pylint: disable=import-outside-toplevel
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            subprocess.run(["docker", "exec", LAB_GATEWAY, "mkdir", "-p", remote], check=True)
            # docker cp can't write to the container's /tmp (a tmpfs systemd mounts): stream the files in.
            for name in ["nginx.conf", "api-keys.conf", "rkllm-mirror.conf", "mirror-main.conf"]:
                subprocess.run(["docker", "exec", "-i", LAB_GATEWAY, "sh", "-c", f"cat > {remote}/{name}"],
                               input=(tmp_path / name).read_text(), text=True, check=True)
            res = subprocess.run(["docker", "exec", LAB_GATEWAY, "sh", "-c", script], capture_output=True, text=True, check=False)
        finally:
            subprocess.run(["docker", "exec", LAB_GATEWAY, "rm", "-rf", remote], check=False)
            fcntl.flock(lock, fcntl.LOCK_UN)
    assert res.returncode == 0, res.stdout + res.stderr


# A fake upstream (laid out as <host>/<path>, like the lab's) whose answers redirect; the mirror runs in
# a second nginx on the lab gateway (own ports and pid file), which is stopped afterwards.
FAKE_UPSTREAM = """
server {
    listen 127.0.0.1:18999;
    absolute_redirect off;
    location = /github.com/redir-ok { return 302 https://objects.githubusercontent.com/x; }
    location = /github.com/redir-relative { return 302 /target; }
    location = /github.com/redir-elsewhere { return 302 https://evil.example.com/x; }
    location = /github.com/redir-http { return 302 http://objects.githubusercontent.com/x; }
    location = /github.com/redir-chain { return 302 https://objects.githubusercontent.com/chain; }
    location = /objects.githubusercontent.com/chain { return 302 https://evil.example.com/y; }
    location = /objects.githubusercontent.com/x { return 200 "redirected-ok\\n"; }
    location = /github.com/target { return 200 "relative-ok\\n"; }
    location / { return 404; }
}
"""


@pytest.mark.skipif(not lab_gateway_running(), reason="the Docker lab's gateway is not running (make lab)")
def test_mirror_follows_redirects_only_to_allowed_origins(tmp_path, run_play):
    remote = f"/tmp/rkllm-redirects-{uuid.uuid4().hex[:8]}"
    conf = render(run_play, tmp_path, NGINX_ROLE, ["rkllm-mirror.conf"], dict(
        MIRROR_VARS, gateway_nginx_internal_port=18081, gateway_nginx_mirror_upstream="http://127.0.0.1:18999",
        gateway_nginx_mirror_upstream_allow_http=True, gateway_nginx_mirror_cache_dir=f"{remote}/cache",
        gateway_nginx_access_log=f"{remote}/gw.access.log", gateway_nginx_mirror_root=""))["rkllm-mirror.conf"]
    main = (f"pid {remote}/nginx.pid;\nerror_log {remote}/error.log;\nevents {{}}\nhttp {{\ninclude /etc/nginx/mime.types;\n"
            f"include {remote}/rkllm-mirror.conf;\n{FAKE_UPSTREAM}\n}}\n")

    def sh(cmd, data=None):
        return subprocess.run(["docker", "exec", "-i", LAB_GATEWAY, "sh", "-c", cmd], input=data, text=True, capture_output=True, check=False)

    got = {}
    with open(LAB_LOCK, "a", encoding="utf-8") as lock:
        import fcntl  # pylint: disable=import-outside-toplevel
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            sh(f"mkdir -p {remote}/cache")
            sh(f"cat > {remote}/rkllm-mirror.conf", conf)
            sh(f"cat > {remote}/main.conf", main)
            started = sh(f"nginx -c {remote}/main.conf")
            assert started.returncode == 0, started.stderr
            for name in ["redir-ok", "redir-relative", "redir-elsewhere", "redir-http", "redir-chain"]:
                res = sh(f"curl -s -w ' %{{http_code}}' http://127.0.0.1:18081/github.com/{name}")
                body, _sep, code = res.stdout.rpartition(" ")
                got[name] = (code, body)
        finally:
            sh(f"[ -f {remote}/nginx.pid ] && kill $(cat {remote}/nginx.pid); sleep 1; rm -rf {remote}")
            fcntl.flock(lock, fcntl.LOCK_UN)
    # Allowed targets are fetched (through the upstream, as the lab does), relative ones from the same origin.
    assert got["redir-ok"] == ("200", "redirected-ok\n")
    assert got["redir-relative"] == ("200", "relative-ok\n")
    # Another host, plain http, or a second hop elsewhere: refused, naming where it pointed.
    for name, target in [("redir-elsewhere", "https://evil.example.com/x"), ("redir-http", "http://objects.githubusercontent.com/x"),
                         ("redir-chain", "https://evil.example.com/y")]:
        code, body = got[name]
        assert code == "502" and f"redirected to {target}, which is not https to an allowed origin" in body, (name, got[name])
