"""The exo role's idle entry point (issue 16): upgrade.yml's wait for a drained board's last requests.

upgrade.yml takes a board out of the gateway's rotation, runs the switch's steps that restart nothing,
then waits with roles/exo/tasks/idle.yml until the board's own exo reports exo_requests_in_progress 0,
and only then restarts. A wait that returned early would cut a client's generation; one that never
returned would keep the board drained. Runs the entry point with ansible-playbook on this machine
against a local HTTP server that answers /metrics as exo's does (REFERENCE.md: the gauge
exo_requests_in_progress).
"""

import http.server
import socket
import textwrap
import threading
import time

METRICS = textwrap.dedent("""\
    # HELP exo_requests_in_progress Number of requests currently being processed
    # TYPE exo_requests_in_progress gauge
    exo_requests_in_progress {busy}
    # HELP exo_requests_total Total requests
    # TYPE exo_requests_total counter
    exo_requests_total{{model="qwen2.5-1.5b-instruct-rkllm",status="200"}} 12
    """)


class FakeExo:
    """/metrics reports `busy` requests in progress until `busy_for` seconds after the first look."""

    def __init__(self, busy, busy_for):
        self.busy, self.busy_for, self.first_look, self.looks = busy, busy_for, None, []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                now = time.monotonic()
                if fake.first_look is None:
                    fake.first_look = now
                fake.looks.append(now)
                busy = fake.busy if now - fake.first_look < fake.busy_for else 0
                body = METRICS.format(busy=busy).encode()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def run_idle(run_play, tmp_path, port, timeout=30):
    play = textwrap.dedent("""\
        - hosts: localhost
          connection: local
          gather_facts: false
          tasks:
            - ansible.builtin.include_role:
                name: rkllm.fleet.exo
                tasks_from: idle.yml
        """)
    return run_play(tmp_path, play, {"exo_api_port": port, "exo_idle_timeout": timeout, "exo_idle_poll_interval": 1})


def test_waits_until_the_last_request_ends(tmp_path, run_play):
    with FakeExo(busy=2, busy_for=3.5) as exo:
        result = run_idle(run_play, tmp_path, exo.port)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    # It looked again, a second apart, until the gauge read 0: not before the requests ended.
    assert exo.looks[-1] - exo.first_look >= 3.5
    assert len(exo.looks) >= 3
    assert "RETRYING" in result.stdout


def test_an_idle_board_is_not_kept_waiting(tmp_path, run_play):
    with FakeExo(busy=0, busy_for=0) as exo:
        result = run_idle(run_play, tmp_path, exo.port)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert len(exo.looks) == 1


def test_a_board_still_busy_at_the_timeout_fails_naming_the_count(tmp_path, run_play):
    with FakeExo(busy=3, busy_for=3600) as exo:
        result = run_idle(run_play, tmp_path, exo.port, timeout=2)
    assert result.returncode != 0
    assert "still had 3.0 request(s) in progress after 2 s" in result.stdout
    assert "exo_idle_timeout" in result.stdout


def test_an_exo_that_does_not_answer_counts_as_idle(tmp_path, run_play):
    """A stopped exo serves nothing: the switch goes on instead of waiting out the timeout."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_idle(run_play, tmp_path, port, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "RETRYING" not in result.stdout
