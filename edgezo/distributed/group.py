"""The process group of a distributed run: identity, the handshake and sharded validation, over gloo collectives
that count their bytes (the two step strategies: edgezo.distributed.steppers)."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from ..adapter import LoraAdapter
from ..data import Example, Task
from ..files import EdgezoError
from ..mezo import MezoConfig
from ..objective import Totals, evaluate
from ..rundir import RunDir
from ..trainer import TrainingInterrupted
from .catchup import adapter_sha256, read_step_log, replay


MODES = ("data", "direction")


STARTUP_TIMEOUT_S = 600  # rendezvous and handshake: a rank may still be fetching or tokenizing


PHASES = ("setup", "join", "step", "eval", "end")


class PeerLost(TrainingInterrupted):
    """Another rank died or stopped answering; exit code 130 like any interrupt (the run can be resumed)."""


def launched() -> bool:
    """True in a rank process: started by torchrun or by launch_local (both set RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# ---- the exchanges -------------------------------------------------------------------------------------------
class Collective:
    """The only code that talks to gloo: all-gather and broadcast of small numpy arrays, counting payload bytes."""

    def __init__(self, rank: int, world: int, group=None):
        self.rank, self.world, self.group = rank, world, group
        self.sent = dict.fromkeys(PHASES, 0)  # nbytes of the tensors this rank handed to gloo, per phase
        self.largest = 0  # the largest single tensor: shows that no adapter ever crossed the network
        self.phase = "setup"

    def _count(self, nbytes: int) -> None:
        self.sent[self.phase] += nbytes
        self.largest = max(self.largest, nbytes)

    def all_gather(self, values: np.ndarray) -> np.ndarray:
        """[world, *values.shape]: every rank's `values`, in rank order, identical on every rank."""
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(np.array(values, order="C"))  # a copy: gloo wants a writable buffer
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        self._count(tensor.numel() * tensor.element_size())
        with _gloo_errors():
            dist.all_gather(out, tensor, group=self.group)
        return np.stack([o.numpy() for o in out])

    def broadcast(self, values: np.ndarray) -> np.ndarray:
        """Rank 0's `values` on every rank (the others pass an array of the same shape and dtype to fill)."""
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(np.ascontiguousarray(values).copy())
        if self.rank == 0:  # the receivers' buffers carry nothing of theirs
            self._count(tensor.numel() * tensor.element_size())
        with _gloo_errors():
            dist.broadcast(tensor, src=0, group=self.group)
        return tensor.numpy()


@contextlib.contextmanager
def _gloo_errors():
    try:
        yield
    except RuntimeError as exc:  # gloo: "Connection closed by peer", "Timed out waiting ...", DistBackendError
        text = re.sub(r"^\[[^\]]*\] ", "", str(exc).strip())  # drop gloo's [source:line] prefix
        raise PeerLost(text.split(". This is", 1)[0].splitlines()[0][:160]) from None


# ---- one rank's view of the group ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DistConfig:
    mode: str = "data"
    peer_timeout_s: float = 30.0  # a hung rank is given up after this; a dead one is noticed at once

    def __post_init__(self):
        if self.mode not in MODES:
            raise EdgezoError(f"--parallel must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.peer_timeout_s > 0:
            raise EdgezoError(f"--peer-timeout must be > 0 seconds, got {self.peer_timeout_s}")


class Group:
    """This rank, the world, the exchanges, and what rank 0 does when a peer is lost (save a checkpoint)."""

    def __init__(self, config: DistConfig, rank: int, world: int):
        self.config, self.rank, self.world = config, rank, world
        self.collective = Collective(rank, world)
        self.completed = 0  # steps whose update is applied: the checkpoint to save if a peer is lost
        self.steps_run = 0
        self.on_lost: Callable[[int], str] = lambda step: "rank 0 keeps the last checkpoint"

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, config: DistConfig, workers: int = 1) -> Group:
        """Join the process group described by torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError:
            raise EdgezoError(f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r}: "
                              f"expected integers") from None
        if workers > 1 and workers != world:
            raise EdgezoError(f"--workers {workers} launches local ranks itself; under torchrun (WORLD_SIZE={world}) "
                              f"leave it out and size the job with torchrun's --nproc-per-node / --nnodes")
        if not 0 <= rank < world:
            raise EdgezoError(f"RANK={rank} is outside WORLD_SIZE={world}")
        import torch.distributed as dist

        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        try:  # a long timeout for the rendezvous and the handshake; _connect() then sets the short one
            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
        except (RuntimeError, ValueError) as exc:
            raise EdgezoError(f"rank {rank} of {world} could not join the process group at {where} "
                              f"(MASTER_ADDR:MASTER_PORT): {str(exc).splitlines()[0][:200]}") from None
        # Left to interpreter shutdown, gloo's threads can meet destroyed objects and abort (SIGABRT) on the
        # error paths; tear the group down while Python still runs.
        atexit.register(_destroy_process_group)
        return cls(config, rank, world)

    def engine_batch_size(self, batch_size: int) -> int:
        """Sequences one rank decodes at once: a shard of the batch (data) or the whole batch (direction)."""
        if self.config.mode == "direction":
            return batch_size
        if batch_size % self.world:
            raise EdgezoError(f"--batch-size {batch_size} is not divisible by {self.world} workers "
                              f"(data-parallel gives every rank an equal shard of each step's batch)")
        return batch_size // self.world

    def config_dict(self) -> dict:
        return {"mode": self.config.mode, "world_size": self.world}

    def directions_per_step(self, mezo: MezoConfig) -> int:
        return mezo.n_directions * (self.world if self.config.mode == "direction" else 1)

    def exchange(self, values: np.ndarray) -> np.ndarray:
        """all_gather; if a peer is lost, rank 0 saves the checkpoint of the last completed step first."""
        try:
            return self.collective.all_gather(values)
        except PeerLost as exc:
            raise PeerLost(f"lost contact with another rank after step {self.completed} "
                           f"({exc}); {self.on_lost(self.completed)}, continue with --resume") from None

    # ---- start: same configuration and data everywhere, the same adapter without sending it ----
    def synchronize(self, stepper, step: int, digest: str, run: RunDir, mezo: MezoConfig,
                    fresh: Callable[[], LoraAdapter]) -> int:
        """Bring `stepper`'s state (a ZoStepper's adapter, and ConMeZO's momentum) at `step` to rank 0's, in place;
        returns rank 0's step. A rank that is behind, or holds something else, replays rank 0's step log from its
        own state (or from `fresh()`, the seed init at step 0)."""
        try:
            return self._synchronize(stepper, step, digest, run, mezo, fresh)
        except PeerLost as exc:
            raise PeerLost(f"lost contact with another rank before training started ({exc}); start again") from None

    def _synchronize(self, stepper, step, digest, run, mezo, fresh) -> int:
        def state_sha256() -> bytes:
            return bytes.fromhex(adapter_sha256(stepper.adapter, stepper.momentum))

        self.collective.phase = "setup"
        mine = np.frombuffer(bytes.fromhex(digest) + state_sha256() + int(step).to_bytes(8, "little"), dtype=np.uint8)
        got = self.collective.all_gather(mine)
        others = [r for r in range(self.world) if bytes(got[r, :32]) != bytes(got[0, :32])]
        if others:
            raise EdgezoError(f"rank(s) {others} run a different configuration or training data than rank 0 "
                              f"(everything but the model and data paths and --threads must match)")
        steps = [int.from_bytes(bytes(got[r, 64:]), "little") for r in range(self.world)]
        target = steps[0]
        behind = {r: (steps[r] if steps[r] < target else 0) for r in range(1, self.world)
                  if (steps[r], bytes(got[r, 32:64])) != (target, bytes(got[0, 32:64]))}
        if behind:
            self.collective.phase = "join"
            first = min(behind.values())
            log = self._broadcast_log(run, first, target, mezo)
            if self.rank in behind:
                if steps[self.rank] >= target:
                    stepper.reset(fresh())  # ahead of rank 0 or not on its trajectory: start from the seed init
                    step = 0
                replay(stepper.theta, log[step - first:], first=step, mezo=mezo, momentum=stepper.momentum)
            self.collective.phase = "setup"
            check = self.collective.all_gather(np.frombuffer(state_sha256(), dtype=np.uint8))
            wrong = [r for r in range(self.world) if bytes(check[r]) != bytes(check[0])]
            if wrong:
                raise EdgezoError(f"rank(s) {wrong} could not rebuild rank 0's adapter (and ConMeZO's momentum) at step "
                                  f"{target} from the step log (a local checkpoint of another run in --out?)")
        self.completed = target
        self._connect()
        return target

    def _broadcast_log(self, run: RunDir, first: int, target: int, mezo: MezoConfig) -> np.ndarray:
        """Rows (lr, seeds..., projected_grads...) of steps first+1..target from rank 0's metrics.jsonl."""
        n_dir = self.directions_per_step(mezo)
        rows = np.zeros((target - first, 1 + 2 * n_dir), dtype=np.float64)
        ok, problem = np.array([1], dtype=np.int64), ""
        if self.is_root:
            try:
                rows[:] = read_step_log(run, first, target, n_dir)
            except EdgezoError as exc:
                ok[0], problem = 0, str(exc)
        ok = self.collective.broadcast(ok)
        if not ok[0]:
            raise EdgezoError(problem if self.is_root else "rank 0 cannot send the step log (its error is above)")
        return self.collective.broadcast(rows)

    # ---- training ----
    def _connect(self) -> None:
        """Switch to a group with the short --peer-timeout for training: a hung peer is given up within it."""
        import torch.distributed as dist

        with _gloo_errors():
            self.collective.group = dist.new_group(list(range(self.world)), backend="gloo",
                                                   timeout=timedelta(seconds=self.config.peer_timeout_s))

    def evaluate_fn(self, engine, examples: Sequence[Example], task: Task, batch_size: int, on_batch=None) -> Totals:
        """Each rank evaluates a contiguous slice; the totals (4 numbers) are gathered and added in rank order."""
        self.collective.phase = "eval"
        bounds = np.linspace(0, len(examples), self.world + 1).astype(int)
        mine = evaluate(engine, examples[bounds[self.rank]:bounds[self.rank + 1]], task, engine.config.n_seq_max,
                        on_batch=(lambda n: on_batch(n * self.world)) if on_batch else None)
        got = self.exchange(np.array([mine.loss_sum, mine.n_targets, mine.n_correct, mine.n_examples], dtype=np.float64))
        totals = Totals()
        for loss_sum, n_targets, n_correct, n_examples in got:
            totals.add(Totals(float(loss_sum), int(n_targets), int(n_correct), int(n_examples)))
        return totals

    # ---- end ----
    def finish(self, adapter: LoraAdapter) -> dict:
        """Gather every rank's adapter hash and byte counts (end of run, not per-step payload)."""
        self.collective.phase = "end"
        hashes = self.exchange(np.frombuffer(bytes.fromhex(adapter_sha256(adapter)), dtype=np.uint8))
        sent = self.collective.sent
        counts = self.exchange(np.array([sent["step"], self.steps_run, sent["setup"], sent["join"], sent["eval"],
                                         self.collective.largest], dtype=np.float64))
        per_step = [c[0] / c[1] if c[1] else 0.0 for c in counts]
        replicas = [bytes(h).hex() for h in hashes]
        return {"workers": self.world, "parallel": self.config.mode, "rank": self.rank,
                "replica_sha256": replicas, "replicas_identical": len(set(replicas)) == 1,
                "bytes_per_step_per_worker": max(per_step), "bytes_per_step_by_rank": per_step,
                "setup_bytes_per_worker": max(c[2] for c in counts), "join_bytes": max(c[3] for c in counts),
                "eval_bytes_per_worker": max(c[4] for c in counts),
                "largest_payload_bytes": int(max(c[5] for c in counts)), "adapter_bytes": adapter.n_params * 4}


def _destroy_process_group() -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()
