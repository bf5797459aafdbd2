"""The fleet's contract, checked on the boards and the gateway themselves (pytest-testinfra).

Run against any inventory the collection provisions:

    pytest tests/acceptance --ansible-inventory=inventories/mine [--hosts=ansible://boards,ansible://gateway]
           [--gateway-url=https://gateway.example.net] [--api-key=...]

Hosts are reached the way Ansible reaches them (testinfra's ansible backend: ssh, docker, local).
Each test is parametrised by board (or gateway) so a failure names the host, and each assertion
message says what was expected and what was found. Nothing here changes a host, except the board
test that proves a client stream is read to its end (it sends one short completion).
"""

import json
import os
import shlex

import pytest
import testinfra
from testinfra.utils.ansible_runner import AnsibleRunner

STATE_FILE = "/etc/rkllm/fleet-state.json"


def pytest_addoption(parser):
    group = parser.getgroup("rkllm.fleet acceptance")
    group.addoption("--gateway-url", default=os.environ.get("RKLLM_GATEWAY_URL"),
                    help="the gateway's OpenAI-compatible endpoint as clients use it (default: http://<gateway>:80)")
    group.addoption("--api-key", default=os.environ.get("RKLLM_API_KEY"),
                    help="an API key of the gateway (default: the inventory's gateway_nginx_api_keys[0])")


def _inventory(config):
    inventory = config.getoption("ansible_inventory", None)
    if not inventory:
        raise pytest.UsageError("tests/acceptance needs --ansible-inventory=INVENTORY (the one site.yml ran with)")
    return inventory


class Fleet:
    """The inventory's boards and gateway, and a testinfra host for each."""

    def __init__(self, config):
        self.inventory = _inventory(config)
        self.runner = AnsibleRunner(self.inventory)
        wanted = None
        hosts_opt = config.getoption("hosts", None)
        if hosts_opt:
            wanted = set()
            specs = hosts_opt if isinstance(hosts_opt, str) else ",".join(hosts_opt)
            for spec in specs.split(","):
                spec = spec.strip()
                wanted.update(self.runner.get_hosts(spec[len("ansible://"):] if spec.startswith("ansible://") else spec))
        self.boards = [h for h in self.runner.get_hosts("boards") if wanted is None or h in wanted]
        self.gateways = [h for h in self.runner.get_hosts("gateway") if wanted is None or h in wanted]
        self.all_boards = self.runner.get_hosts("boards")
        self.all_gateways = self.runner.get_hosts("gateway")
        self._hosts = {}

    def host(self, name):
        if name not in self._hosts:
            self._hosts[name] = testinfra.get_host(f"ansible://{name}", ansible_inventory=self.inventory)
        return self._hosts[name]

    def var(self, name, var):
        """A variable as the inventory renders it for this host (None when the inventory doesn't set it)."""
        value = self.host(name).ansible("ansible.builtin.debug", f"var={var}", check=False)
        found = value.get(var)
        if found is None or (isinstance(found, str) and (found.startswith("VARIABLE IS NOT DEFINED")
                                                         or (found.startswith("<< error") and "is undefined" in found))):
            return None
        return found


def pytest_configure(config):
    config.addinivalue_line("markers", "board: a check of one board")
    config.addinivalue_line("markers", "gateway: a check of the gateway")


def pytest_generate_tests(metafunc):
    if "board" in metafunc.fixturenames or "gateway" in metafunc.fixturenames:
        fleet = _fleet(metafunc.config)
        if "board" in metafunc.fixturenames:
            metafunc.parametrize("board", fleet.boards, ids=fleet.boards)
        if "gateway" in metafunc.fixturenames:
            metafunc.parametrize("gateway", fleet.gateways, ids=fleet.gateways)


def _fleet(config):
    if not hasattr(config, "_rkllm_fleet"):
        config._rkllm_fleet = Fleet(config)  # pylint: disable=protected-access
    return config._rkllm_fleet  # pylint: disable=protected-access


@pytest.fixture(scope="session")
def fleet(request):
    return _fleet(request.config)


@pytest.fixture(scope="session")
def state_of(fleet):
    cache = {}

    def read(board):
        if board not in cache:
            f = fleet.host(board).file(STATE_FILE)
            assert f.exists, f"{board}: {STATE_FILE} is missing: site.yml never finished on this board"
            cache[board] = json.loads(f.content_string)
        return cache[board]
    return read


def connects(host, address, port, timeout=3):
    """Whether `host` opens a TCP connection to address:port (its own view of the network)."""
    code = ("import socket,sys\n"
            "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])).close()\n"
            "except OSError:\n sys.exit(1)\n")
    return host.run(f"python3 -c {shlex.quote(code)} {shlex.quote(address)} {port} {timeout}").rc == 0


def http(host, url, method="GET", headers=None, body=None, timeout=30):
    """An HTTP request made from `host` itself: (status, body text). Status 0 = no answer."""
    code = (
        "import json,sys,urllib.request,urllib.error\n"
        "a=json.loads(sys.argv[1])\n"
        "r=urllib.request.Request(a['url'],data=a['body'].encode() if a['body'] is not None else None,"
        "headers=a['headers'],method=a['method'])\n"
        "try:\n with urllib.request.urlopen(r,timeout=a['timeout']) as x: print(x.status); print(x.read().decode('utf-8','replace'))\n"
        "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode('utf-8','replace'))\n"
        "except OSError as e:\n print(0); print(e)\n")
    args = json.dumps({"url": url, "method": method, "headers": headers or {},
                       "body": json.dumps(body) if body is not None else None, "timeout": timeout})
    out = host.run(f"python3 -c {shlex.quote(code)} {shlex.quote(args)}").stdout
    status, _, text = out.partition("\n")
    return int(status or 0), text
