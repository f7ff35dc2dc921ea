"""The MeZO training loop: steps, periodic validation, the metrics log, atomic checkpoints and exact resume
(the run directory's layout: edgezo.rundir).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapter import LoraAdapter
from .data import Example, Task, batch_indices
from .files import EdgezoError, current_rss_bytes, peak_rss_bytes
from .mezo import MezoConfig, NonFiniteLoss, StepRecord, zo_step
from .objective import Totals, evaluate, loss_function
from .rewards import RewardError
from .rundir import BEST_BY, RunDir, is_better

Event = dict
Callback = Callable[[Event], None]
StepFn = Callable[[dict, Sequence[Example], int], StepRecord]
ObjectiveFn = Callable[..., Callable]  # (engine, batch, task) -> the step's loss function of the parameters


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    batch_size: int = 16
    seed: int = 0
    eval_every: int = 100  # validate every this many steps (and at the start and the end); 0: only at the end
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    n_valid: int = 500  # validation examples used per evaluation (the first n of the split); 0: all
    max_memory_bytes: int = 0  # stop with a checkpoint when the process RSS exceeds this; 0: no limit
    max_train_seconds: float = 0  # end the run (validated and saved) once training took this long; 0: no limit
    freeze_lora_a: bool = False  # LoRA-FA: perturb and train B only, A stays at its random init (d / (1 + n_in / n_out))
    best_by: str = "valid_loss"  # adapter.best.gguf: lowest valid_loss, or highest valid_reward (reward objectives)

    def out_of_time(self, train_seconds: float) -> bool:
        """The training clock (evaluations excluded, resumes included) has reached max_train_seconds."""
        return bool(self.max_train_seconds) and train_seconds >= self.max_train_seconds

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.max_train_seconds < 0:
            raise EdgezoError("steps must be >= 0, batch size >= 1 and the training time limit >= 0")
        if self.best_by not in BEST_BY:
            raise EdgezoError(f"best_by must be one of {sorted(BEST_BY)}, got {self.best_by!r}")


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    final_loss: float  # mean training loss (L+ and L-) over the last min(50, steps) steps
    valid: Totals | None
    train_seconds: float  # cumulative wall-clock of training steps over the whole run (resumes included, evaluations excluded)
    peak_rss_bytes: int
    best: dict | None = None  # the evaluation event {step, valid_loss, valid_accuracy, ...} adapter.best.gguf comes from
    best_adapter_path: Path | None = None


class TrainingInterrupted(EdgezoError):
    pass


@contextlib.contextmanager
def stop_requests():
    """SIGINT / SIGTERM set a flag that the loop checks between steps, so a stop always lands on a consistent
    (adapter, step) pair; a second SIGINT interrupts at once. A no-op outside the main thread."""
    flag = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["requested"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["requested"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def trainable_tensors(adapter: LoraAdapter, freeze_lora_a: bool) -> dict:
    """The adapter tensors the optimizer perturbs and updates (all, or only the .lora_b ones for LoRA-FA)."""
    return {name: t for name, t in adapter.tensors.items() if not (freeze_lora_a and name.endswith(".lora_a"))}


def train(engine, adapter: LoraAdapter, task: Task, train_set: Sequence[Example], valid_set: Sequence[Example],
          mezo: MezoConfig, config: TrainConfig, run: RunDir, start_step: int = 0,
          callback: Callback = lambda event: None, step_fn: StepFn | None = None,
          evaluate_fn: Callable = evaluate, objective: ObjectiveFn | None = None) -> TrainResult:
    """Train `adapter` in place from `start_step` to `config.steps`; the engine must hold it with set_adapter().

    `objective(engine, batch, task)` gives the function of the parameters MeZO minimises on a batch (default
    objective.loss_function; edgezo.rewards gives a negated reward). `step_fn(theta, batch, step) -> StepRecord`
    replaces the MeZO step on the whole batch and `evaluate_fn` (same signature as objective.evaluate) the
    validation: edgezo.distributed plugs its exchanges in here. An evaluator whose totals carry `metrics`
    (edgezo.rewards) logs each as valid_<name>."""
    if not train_set:
        raise EdgezoError("the training split is empty")
    valid_set = valid_set[: config.n_valid] if config.n_valid else valid_set
    theta = trainable_tensors(adapter, config.freeze_lora_a)  # the same arrays: updates land in adapter.tensors
    recent_losses: list[float] = []
    valid = None
    best = run.best_eval(start_step, config.best_by)
    train_seconds = run.train_seconds_at(start_step)
    with open(run.metrics, "a") as log, stop_requests() as stop:

        def validate(step: int) -> Totals:
            nonlocal best
            engine.update_adapter(adapter.tensors)
            callback({"kind": "eval_start", "step": step, "n": len(valid_set)})
            totals = evaluate_fn(engine, valid_set, task, config.batch_size,
                                 on_batch=lambda n: callback({"kind": "eval_batch", "n": n}))
            event = {"step": step, "valid_loss": totals.loss, "valid_accuracy": totals.accuracy,
                     "n_valid": totals.n_examples, "train_seconds": train_seconds,
                     **{f"valid_{name}": value for name, value in getattr(totals, "metrics", {}).items()}}
            # Best by validation loss (or the reward a reward objective maximises), not accuracy: defined for every
            # data format, and 500 examples tie often on accuracy. Saved before the log line, so a logged best
            # always has its file.
            if is_better(event, best, config.best_by):
                run.save_best(adapter)
                best = event
            log.write(json.dumps(event) + "\n")
            log.flush()
            callback({"kind": "eval", **event})
            return totals

        if valid_set and start_step == 0 and config.eval_every:
            valid = validate(0)
        done = start_step
        for step in range(start_step, config.steps):
            if config.out_of_time(train_seconds):
                break
            t0 = time.perf_counter()
            batch = [train_set[i] for i in batch_indices(len(train_set), config.batch_size, config.seed, step)]
            try:
                if step_fn is None:
                    loss = (objective or loss_function)(engine, batch, task)
                    # frozen tensors (LoRA-FA's A) come from the adapter, the trained ones from the estimator
                    record = zo_step(theta, lambda params: loss(collections.ChainMap(params, adapter.tensors)),
                                     mezo, config.seed, step, config.steps)
                else:
                    record = step_fn(theta, batch, step)
            except (NonFiniteLoss, RewardError) as exc:
                raise EdgezoError(f"{exc}; training stopped, the last good checkpoint ({run.checkpoint}) is kept") from None
            if not all(np.isfinite(t).all() for t in theta.values()):
                raise EdgezoError(f"step {step + 1}: the update made the adapter non-finite (learning rate too high?); "
                                  f"training stopped, the last good checkpoint ({run.checkpoint}) is kept")
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            recent_losses = (recent_losses + [record.loss])[-50:]
            event = {"step": step + 1, "loss": record.loss, "lr": record.lr, "seeds": record.seeds,
                     "projected_grads": record.projected_grads, "losses_plus": record.losses_plus,
                     "losses_minus": record.losses_minus, "seconds": seconds, "train_seconds": train_seconds,
                     "rss_bytes": current_rss_bytes()}
            if record.loss_center is not None:
                event["loss_0"] = record.loss_center
            log.write(json.dumps(event) + "\n")
            log.flush()
            callback({"kind": "step", **event})
            done = step + 1
            if config.max_memory_bytes and event["rss_bytes"] > config.max_memory_bytes:
                run.save_checkpoint(adapter, done)
                raise TrainingInterrupted(
                    f"memory budget exceeded at step {done}: RSS {event['rss_bytes'] / 2**20:.0f} MiB > "
                    f"{config.max_memory_bytes / 2**20:.0f} MiB; checkpoint saved in {run.path}, continue with --resume")
            if stop["requested"] and done < config.steps:
                run.save_checkpoint(adapter, done)
                raise TrainingInterrupted(f"stopped at step {done} of {config.steps}; checkpoint saved in {run.path}, "
                                          f"continue with --resume")
            if config.save_every and done % config.save_every == 0 and done < config.steps:
                run.save_checkpoint(adapter, done)
            if valid_set and config.eval_every and done % config.eval_every == 0 and done < config.steps:
                valid = validate(done)
        if valid_set:
            valid = validate(done)
    run.save_checkpoint(adapter, done)
    adapter.save(run.adapter)
    return TrainResult(adapter_path=run.adapter, steps=done,
                       final_loss=float(sum(recent_losses) / len(recent_losses)) if recent_losses else math.nan,
                       valid=valid, train_seconds=train_seconds, peak_rss_bytes=peak_rss_bytes(),
                       best=best, best_adapter_path=run.best if best is not None else None)
