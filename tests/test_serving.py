"""benchmarks.serving.running_server on a stand-in HTTP server (no vLLM, no GPU)."""

import os
import subprocess
import sys
import urllib.request

import pytest

from benchmarks.serving import running_server, wait_or_stop

# Answers /health with 200 after a short delay (so the wait loop polls at least once), anything else 404.
FAKE_SERVER = r"""
import http.server, sys, time
time.sleep(1)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): print("request", self.path, flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _port() -> int:
    return 20000 + os.getpid() % 20000


def test_waits_for_health_then_stops_the_process_group(tmp_path):
    port = _port()
    log = tmp_path / "logs" / "server.log"
    with running_server([sys.executable, "-c", FAKE_SERVER, str(port)], port, log, timeout_s=30) as base:
        assert base == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            assert r.status == 200
    with pytest.raises(OSError):  # gone once the block exits
        urllib.request.urlopen(base + "/health", timeout=2)
    assert "request /health" in log.read_text()


def test_a_server_that_exits_raises_with_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('bad flag --foo'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"exited with 3:\n.*bad flag --foo"), \
            running_server(cmd, _port() + 1, tmp_path / "server.log", timeout_s=30):
        pass


def test_a_server_that_never_gets_healthy_times_out(tmp_path):
    cmd = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"]
    with pytest.raises(TimeoutError, match="not healthy after 3 s:\nloading"), \
            running_server(cmd, _port() + 2, tmp_path / "server.log", timeout_s=3):
        pass


# A benchmark worker that starts a server and never finishes (benchmarks.run --worker serve at its limit).
STUCK_WORKER = r"""
import sys, time
from benchmarks.serving import running_server, stop_on_sigterm
stop_on_sigterm()
port, log = int(sys.argv[1]), sys.argv[2]
with running_server([sys.executable, "-c", sys.argv[3], str(port)], port, __import__("pathlib").Path(log), 30):
    print("serving", flush=True)
    time.sleep(600)
"""


def test_a_worker_stopped_at_its_limit_stops_its_server(tmp_path):
    """The worker's server runs in its own session, so only the worker's `finally` can stop it: the time
    limit must send SIGTERM (turned into SystemExit), not SIGKILL, or the server keeps the GPU."""
    port = _port() + 3
    proc = subprocess.Popen([sys.executable, "-c", STUCK_WORKER, str(port), str(tmp_path / "s.log"), FAKE_SERVER],
                            stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.stdout.readline().strip() == "serving"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        assert r.status == 200
    assert wait_or_stop(proc, timeout_s=1, grace_s=60) is None
    assert proc.returncode == 128 + 15  # SystemExit from the handler, not a kill
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


def test_wait_or_stop_returns_the_exit_code_of_a_finished_process():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(4)"])
    assert wait_or_stop(proc, timeout_s=30) == 4
