"""`edgezo finetune --workers N`: N local rank processes of the same command, as torchrun would start them."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable


from ..files import EdgezoError
from ..rundir import RunDir
from ..trainer import TrainingInterrupted
from .group import DistConfig, Group


# ---- edgezo finetune --workers N: N local ranks of the same command ----------------------------------------------
def launch_local(args: argparse.Namespace, argv: list[str], log: Callable[[str], None]) -> tuple[dict, str]:
    """Start args.workers rank processes on 127.0.0.1, each `edgezo <argv>` (the command's own flags) with --threads
    // N threads (at least 1) and RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set as torchrun sets them; wait for
    them and return rank 0's result. SIGINT / SIGTERM are forwarded as SIGTERM: every rank stops cleanly."""
    from .. import store

    n = args.workers
    Group(DistConfig(args.parallel, args.peer_timeout), 0, n).engine_batch_size(args.batch_size)  # once, not N times
    threads = max(1, (args.threads or os.cpu_count() or 1) // n)
    store.resolve_model(args.model, args.quant, log=log)  # fetch / requantize once, before the ranks look for it
    port = _free_port()
    command = [sys.executable, "-m", "edgezo.cli", *argv, "--threads", str(threads), "--json"]
    log(f"{n} local ranks ({args.parallel}-parallel, {threads} thread(s) each), process group on 127.0.0.1:{port}")
    with tempfile.TemporaryFile("w+") as out:
        procs = []
        for rank in range(n):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen(command, env=env,
                                          stdout=out if rank == 0 else subprocess.DEVNULL, start_new_session=True))
        with _forward_stop_signals(procs):
            codes = [p.wait() for p in procs]
        out.seek(0)
        lines = [line for line in out.read().splitlines() if line.strip()]
    if all(code == 0 for code in codes) and lines:
        result = json.loads(lines[-1])
        result["threads_per_worker"] = threads
        return result, (f"adapter: {result['adapter']}  final loss {result['final_loss']:.4f}  "
                        f"{n} workers, {result['bytes_per_step_per_worker']:.0f} bytes per step per worker, "
                        f"replicas {'identical' if result['replicas_identical'] else 'DIFFER'}")
    causes = [f"rank {r} " + (f"was killed by signal {-c}" if c < 0 else "stopped" if c == 130 else f"failed (exit {c})")
              for r, c in enumerate(codes) if c != 0]
    if any(c not in (0, 130) and c > 0 for c in codes):
        raise EdgezoError("; ".join(causes) + " (the ranks' errors are above)")
    state = RunDir(args.out).state
    where = (f"{args.out} holds the checkpoint of step {json.loads(state.read_text())['step']}" if state.exists()
             else f"{args.out} holds no checkpoint yet")
    raise TrainingInterrupted("; ".join(causes) + f"; {where}, continue with --resume")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _forward_stop_signals(procs: list[subprocess.Popen]):
    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    try:
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handlers, the ranks are still stopped by their own signals
        previous = {}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
