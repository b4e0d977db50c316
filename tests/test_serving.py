"""benchmarks.serving.running_server on a stand-in HTTP server (no vLLM, no GPU)."""

import os
import sys
import urllib.request

import pytest

from benchmarks.serving import running_server

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
