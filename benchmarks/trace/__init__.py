"""%globaltimer traces of the kernels (GPU machine only): patches and scripts, see trace_decode.py."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable

import torch

REPLAYS = 7


def replay_traced(call: Callable[[], None], env_var: str, buf: torch.Tensor, slots: int,
                  summarize: Callable[[torch.Tensor], dict]) -> dict:
    """Capture ``call`` in a CUDA graph while ``env_var`` holds ``buf``'s address (the patched op bakes it
    into the launch), replay it ``REPLAYS`` times with ``buf`` zeroed, and return the median over the
    replays of ``summarize([rows, slots] timestamps, fp64 ns)``."""
    os.environ[env_var] = str(buf.data_ptr())
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()  # outside capture first: lazy allocations and set-up happen here
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
    finally:
        del os.environ[env_var]
    reps = []
    for _ in range(REPLAYS):
        buf.zero_()
        graph.replay()
        torch.cuda.synchronize()
        reps.append(summarize(buf.view(-1, slots).cpu().double()))
    return {k: round(statistics.median(r[k] for r in reps), 2) for k in reps[0]}


def write_rows(path: str, rows: list[dict]) -> None:
    """The sweep's rows as a JSON list at ``path`` (its folder made if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
