"""What a rank starts from: its own checkpoint or the seed init, caught up by replaying the step log; rank > 0
writes nothing (ReplicaRun)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..adapter import LoraAdapter
from ..data import Example
from ..files import EdgezoError
from ..mezo import MezoConfig, Params, StepRecord, apply_update
from ..rundir import RunDir, flatten, identity


def adapter_sha256(adapter: LoraAdapter, momentum: Params | None = None) -> str:
    """sha256 over the adapter's tensors (names, shapes, float32 bytes, in order): the replica identity; with
    ConMeZO's `momentum`, over it too (a rank's whole optimizer state)."""
    h = hashlib.sha256()
    for name, t in [*adapter.tensors.items(), *(momentum or {}).items()]:
        h.update(f"{name}{t.shape}".encode())
        h.update(np.ascontiguousarray(t, dtype=np.float32).tobytes())
    return h.hexdigest()


# Ranks evaluate together: besides the run's identity they must agree on when (and so how long they run).
COLLECTIVE_SCHEDULE = ("train.steps", "train.eval_every")


def run_digest(config: dict, train_set: Sequence[Example]) -> str:
    """What every rank must share: the run's identity across machines, when it validates, and the training tokens."""
    shared = {**identity(config, across_machines=True), **{k: flatten(config).get(k) for k in COLLECTIVE_SCHEDULE}}
    h = hashlib.sha256(json.dumps(shared, sort_keys=True).encode())
    for ex in train_set:
        h.update(np.asarray(ex.tokens, dtype=np.int64).tobytes())
        h.update(f"|{ex.label}|{getattr(ex, 'target_start', '')}|{getattr(ex, 'target_spans', '')};".encode())
    return h.hexdigest()


# ---- the step log: what a late rank replays --------------------------------------------------------------------
def read_step_log(run: RunDir, first: int, target: int, n_dir: int) -> np.ndarray:
    """Rows (lr, seeds..., projected_grads...) of steps first+1..target from the run's metrics.jsonl."""
    found = {}
    for event in run.events():
        if "loss" in event and first < event["step"] <= target and len(event["seeds"]) == n_dir:
            found[event["step"]] = [event["lr"], *event["seeds"], *event["projected_grads"]]
    missing = [s for s in range(first + 1, target + 1) if s not in found]
    if missing:
        raise EdgezoError(f"{run.metrics}: the step log lacks steps {missing[0]}..{missing[-1]} "
                          f"({len(missing)} of {target - first}), so a rank cannot catch up to step {target}")
    return np.array([found[s] for s in range(first + 1, target + 1)], dtype=np.float64)


def replay(theta: Params, rows: np.ndarray, first: int, mezo: MezoConfig, momentum: Params | None = None) -> None:
    """Apply the logged updates of steps first+1.. to `theta` (and ConMeZO's `momentum`) in order: bit-identical to
    training (float32, same order)."""
    for i, row in enumerate(rows):
        n_dir = (len(row) - 1) // 2
        apply_update(theta, StepRecord(step=first + i, lr=float(row[0]), seeds=[int(s) for s in row[1:1 + n_dir]],
                                       projected_grads=[float(g) for g in row[1 + n_dir:]]), mezo, momentum)


# ---- ranks > 0 -------------------------------------------------------------------------------------------------
def local_state(run: RunDir, config: dict, base, fresh: Callable[[], LoraAdapter]) -> tuple[LoraAdapter, int]:
    """A replica's starting point: the checkpoint in its --out if that holds this run (on one machine: rank 0's),
    else the seed init at step 0; synchronize() brings it to rank 0's step."""
    try:
        if identity(json.loads(run.config.read_text()), across_machines=True) == identity(config, across_machines=True):
            return run.load_checkpoint(base)
    except (OSError, ValueError, EdgezoError):
        pass
    return fresh(), 0


class ReplicaRun(RunDir):
    """What train() needs of a run directory, on ranks > 0: rank 0 owns the real one. Metrics go to /dev/null,
    checkpoints are skipped, and the final adapter goes to a scratch directory (removed by the caller)."""

    def __init__(self):
        super().__init__(tempfile.mkdtemp(prefix="edgezo-replica-"))
        self.metrics = Path(os.devnull)

    def save_checkpoint(self, adapter: LoraAdapter, step: int, optimizer=None) -> None:
        pass

    def train_seconds_at(self, step: int) -> float:
        return 0.0

    def remove(self) -> None:
        self.adapter.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.rmdir()
