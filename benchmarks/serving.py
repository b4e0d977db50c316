"""Start an HTTP server process (``vllm serve``), wait until ``/health`` answers, stop it and its children;
and stop a benchmark worker at its time limit so that such a server goes with it.

Shared by ``benchmarks/run.py --suite serve`` and the ``serve`` case of ``tests/e2e/gpu_e2e.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@contextlib.contextmanager
def running_server(cmd: list[str], port: int, log_path: Path, timeout_s: float = 300) -> Iterator[str]:
    """Run ``cmd`` (which must listen on 127.0.0.1:``port``) with its output in ``log_path``; yields the base
    URL once ``/health`` returns 200. Raises with the log's tail if the process exits or is not healthy
    within ``timeout_s``. On exit the whole process group gets SIGTERM, then SIGKILL after 60 s (``vllm
    serve`` starts engine-core and worker processes)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{_tail(log_path)}")
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise TimeoutError(f"server not healthy after {timeout_s:.0f} s:\n{_tail(log_path)}")
                time.sleep(2)
            yield base
        finally:
            # The group may already be gone (the server exited on its own): that must not mask the error above.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def stop_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so that ``finally`` blocks run (``running_server`` stops its server).

    Python's default SIGTERM action ends the process at once; a ``vllm serve`` started in its own session
    then outlives the worker and keeps its GPU memory (H100, 2026-11-23: the next format's server found
    5 of 79 GiB free and refused to start)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def wait_or_stop(proc: subprocess.Popen, timeout_s: float, grace_s: float = 90) -> int | None:
    """Wait for ``proc``; at ``timeout_s`` send SIGTERM (see :func:`stop_on_sigterm`), then SIGKILL after
    ``grace_s``. Returns the exit code, or None when it had to be stopped."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return None
