"""The training loop, one for every method: batches, the training clock, periodic validation, the metrics log,
checkpoints, stops and the best adapter (the run directory's layout: edgezo.rundir).

A run never leaves a model worse than it started: the start (adapter B = 0, the base model) is the first validated
candidate, and the adapter a run leaves (adapter.gguf, with final_adapter="best") is the best validated one, judged
on what the user reads (rundir.is_better). With rollback on, a validation worse than the best by more than noise
(rundir.regression) or a step that cannot be taken (a non-finite loss) restores the best adapter and halves the
stepper's rate; the event is a line of metrics.jsonl, so --resume and replay (edgezo.replay) stay bit-exact.

The loop receives its parts, as mlx-lm's tuner does: a Stepper (one optimisation step on a batch, and the adapter
it trains) and a validation function. MeZO, FZOO and ConMeZO on llama.cpp (edgezo.steppers), data- and direction-parallel
MeZO (edgezo.distributed.steppers) and torch BP / MeZO (edgezo.reference) are steppers. What happens is reported
to a TrainingEvents object (the progress bar, the trackers of edgezo.report).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .data import Example, batch_indices
from .files import EdgezoError, copy_atomic, current_rss_bytes, peak_rss_bytes
from .objective import Totals
from .rundir import BEST_BY, RunDir, is_better, regression

RECENT_STEPS = 50  # TrainResult.final_loss averages the training loss of this many last steps
ROLLBACK_RATE_FACTOR = 0.5  # a rollback multiplies the stepper's rate by this
MAX_ROLLBACKS = 5  # after this many the rate is 1/32 of the start's: the run ends, its best adapter kept
FINAL_ADAPTERS = ("best", "last")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    batch_size: int = 16
    seed: int = 0
    eval_every: int = 100  # validate every this many steps (and at the start and the end); 0: the start and the end
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    n_valid: int = 500  # validation examples used per evaluation (the first n of the split); 0: all
    max_memory_bytes: int = 0  # stop with a checkpoint when the process RSS exceeds this; 0: no limit
    max_train_seconds: float = 0  # end the run (validated and saved) once training took this long; 0: no limit
    freeze_lora_a: bool = False  # LoRA-FA: perturb and train B only, A stays at its random init (d / (1 + n_in / n_out))
    best_by: str = "valid_loss"  # adapter.best.gguf: lowest valid_loss, highest valid_accuracy or valid_reward
    rollback: bool = False  # on a regression or a failed step: restore the best adapter, multiply the rate by 0.5
    patience: int = 0  # end the run after this many validations in a row without a new best; 0: never
    final_adapter: str = "best"  # adapter.gguf: the best validated adapter (the start included), or the last

    def out_of_time(self, train_seconds: float) -> bool:
        """The training clock (evaluations excluded, resumes included) has reached max_train_seconds."""
        return bool(self.max_train_seconds) and train_seconds >= self.max_train_seconds

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.max_train_seconds < 0:
            raise EdgezoError("steps must be >= 0, batch size >= 1 and the training time limit >= 0")
        if self.best_by not in BEST_BY:
            raise EdgezoError(f"best_by must be one of {sorted(BEST_BY)}, got {self.best_by!r}")
        if self.final_adapter not in FINAL_ADAPTERS or self.patience < 0:
            raise EdgezoError(f"final_adapter must be one of {FINAL_ADAPTERS} and patience >= 0")


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    final_loss: float  # mean training loss over the last min(RECENT_STEPS, steps) steps
    valid: Totals | None
    train_seconds: float  # cumulative wall-clock of training steps over the whole run (resumes included, evaluations excluded)
    peak_rss_bytes: int
    best: dict | None = None  # the evaluation event {step, valid_loss, valid_accuracy, ...} adapter.best.gguf comes from
    best_adapter_path: Path | None = None
    rollbacks: int = 0  # over the whole run (resumes included)
    stop_reason: str | None = None  # why the run ended before config.steps (patience, rollbacks, time), if it did


class TrainingInterrupted(EdgezoError):
    pass


class StepFailed(EdgezoError):
    """A step could not be taken (a non-finite loss, a failing reward): the run stops, its last checkpoint kept."""


class Stepper(Protocol):
    """One method's optimisation step, and the adapter it trains."""

    resumable: bool  # checkpoint() writes state --resume continues from; else a stop keeps only the adapter so far
    # Steppers that roll back (TrainConfig.rollback) also have rate_scale (a float their rate is multiplied by) and
    # restore(path) (take the adapter saved at path).

    def step(self, batch: Sequence[Example], step: int) -> dict:
        """Update the adapter on `batch` (0-based `step`); the step's metrics line ('loss' and 'lr' at least).
        Raises StepFailed, the adapter unchanged, when the step cannot be taken."""

    def save(self, path: Path) -> None:
        """The current adapter as GGUF LoRA."""

    def checkpoint(self, run: RunDir, step: int) -> None:
        """What --resume needs to continue after `step` (nothing for a stepper that does not resume)."""


Validate = Callable[[Sequence[Example], Callable[[int], None]], Totals]  # (examples, on_batch(n)) -> totals


class TrainingEvents:
    """What the loop reports as it goes; each method does nothing unless overridden. `fields` are the metrics line."""

    def preparing(self, done: int, total: int) -> None:
        """A one-off pass before training (the hidden-state table of --prefix-reuse cache) did `done` of `total`."""

    def start(self, step: int, total_steps: int) -> None:
        """Training starts (or resumes) after `step` of `total_steps`."""

    def step(self, fields: dict) -> None:
        pass

    def eval_start(self, step: int, n_examples: int) -> None:
        pass

    def eval_batch(self, n_examples: int) -> None:
        pass

    def evaluated(self, fields: dict) -> None:
        pass

    def rolled_back(self, fields: dict) -> None:
        pass

    def close(self) -> None:
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


def train(stepper: Stepper, validate: Validate, train_set: Sequence[Example], valid_set: Sequence[Example],
          config: TrainConfig, run: RunDir, start_step: int = 0, events: TrainingEvents | None = None) -> TrainResult:
    """Train from `start_step` to `config.steps`. An evaluator whose totals carry `metrics` (edgezo.rewards) logs
    each as valid_<name>."""
    if not train_set:
        raise EdgezoError("the training split is empty")
    if config.rollback and not hasattr(stepper, "restore"):
        raise EdgezoError(f"{type(stepper).__name__} cannot roll back: train it with rollback off")
    events = events or TrainingEvents()
    events.start(start_step, config.steps)
    valid_set = valid_set[: config.n_valid] if config.n_valid else valid_set
    recent_losses: list[float] = []
    valid = None
    logged = [e for e in run.events() if e["step"] <= start_step]
    best = run.best_eval(start_step, config.best_by)
    rollbacks = [e for e in logged if "rollback_to" in e]
    if rollbacks:
        stepper.rate_scale = rollbacks[-1]["rate_scale"]
    # validations since the best, for the patience
    stale = sum(1 for e in logged if "valid_loss" in e and best is not None and e["step"] > best["step"])
    train_seconds = run.train_seconds_at(start_step)
    stop_reason = None
    with open(run.metrics, "a") as log, stop_requests() as stop:

        def write(fields: dict) -> None:
            log.write(json.dumps(fields) + "\n")
            log.flush()

        def roll_back(step: int, why: str) -> None:
            """Take the best adapter back and lower the rate; logged before any checkpoint of `step`."""
            stepper.restore(run.best)
            stepper.rate_scale *= ROLLBACK_RATE_FACTOR
            rollbacks.append(fields := {"step": step, "rollback_to": best["step"], "rate_scale": stepper.rate_scale,
                                        "reason": why, "train_seconds": train_seconds})
            write(fields)
            events.rolled_back(fields)

        def evaluate(step: int) -> Totals:
            nonlocal best, stale
            events.eval_start(step, len(valid_set))
            totals = validate(valid_set, events.eval_batch)
            fields = {"step": step, "valid_loss": totals.loss, "valid_accuracy": totals.accuracy,
                      "valid_loss_se": totals.loss_se, "n_valid": totals.n_examples, "train_seconds": train_seconds,
                      **{f"valid_{name}": value for name, value in getattr(totals, "metrics", {}).items()}}
            # Saved before the log line, so a logged best always has its file.
            if math.isfinite(totals.loss) and is_better(fields, best, config.best_by):
                stepper.save(run.best)
                best, stale = fields, 0
            else:
                stale += 1
            write(fields)
            events.evaluated(fields)
            # at the last step too: a run continued with more --steps must go on as one run that long would
            why = regression(fields, best, config.best_by) if config.rollback else None
            if why:
                roll_back(step, why)
            return totals

        def stopped(why: str, step: int) -> TrainingInterrupted:
            if stepper.resumable:
                stepper.checkpoint(run, step)
                return TrainingInterrupted(f"{why}; checkpoint saved in {run.path}, continue with --resume")
            stepper.save(run.adapter)
            return TrainingInterrupted(f"{why}; the adapter so far is in {run.adapter} (this method does not resume)")

        last_eval = None
        # the start is a candidate: without it "best" could be worse than the base model
        if valid_set and start_step == 0 and (config.eval_every or config.final_adapter == "best"):
            valid, last_eval = evaluate(0), 0
        done = start_step
        for step in range(start_step, config.steps):
            if config.out_of_time(train_seconds):
                stop_reason = f"the training time limit ({config.max_train_seconds:g} s) was reached"
                break
            if len(rollbacks) >= MAX_ROLLBACKS or (config.patience and stale >= config.patience):
                stop_reason = (f"{len(rollbacks)} rollbacks" if len(rollbacks) >= MAX_ROLLBACKS else
                               f"no better validation in {stale} evaluations (patience {config.patience})")
                break
            t0 = time.perf_counter()
            batch = [train_set[i] for i in batch_indices(len(train_set), config.batch_size, config.seed, step)]
            try:
                record, failure = stepper.step(batch, step), None
            except StepFailed as exc:
                if not (config.rollback and best is not None):
                    kept = f"the last good checkpoint ({run.checkpoint}) is kept" if stepper.resumable else "nothing saved"
                    raise EdgezoError(f"{exc}; training stopped, {kept}") from None
                record, failure = None, str(exc)  # the step's slot holds the rollback: its index is spent
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            done = step + 1
            if failure:
                roll_back(done, failure)
            else:
                recent_losses = (recent_losses + [record["loss"]])[-RECENT_STEPS:]
                fields = {"step": done, **record, "seconds": seconds, "train_seconds": train_seconds,
                          "rss_bytes": current_rss_bytes()}
                write(fields)
                events.step(fields)
            if valid_set and config.eval_every and done % config.eval_every == 0 and done < config.steps:
                valid, last_eval = evaluate(done), done  # before the checkpoint: it holds a rollback's adapter
            rss = current_rss_bytes()
            if config.max_memory_bytes and rss > config.max_memory_bytes:
                raise stopped(f"memory budget exceeded at step {done}: RSS {rss / 2**20:.0f} MiB > "
                              f"{config.max_memory_bytes / 2**20:.0f} MiB", done)
            if stop["requested"] and done < config.steps:
                raise stopped(f"stopped at step {done} of {config.steps}", done)
            if stepper.resumable and config.save_every and done % config.save_every == 0 and done < config.steps:
                stepper.checkpoint(run, done)
        if valid_set and last_eval != done:
            valid = evaluate(done)
    stepper.checkpoint(run, done)
    if config.final_adapter == "best" and best is not None:
        stepper.save(run.last)
        copy_atomic(run.best, run.adapter)
    else:
        stepper.save(run.adapter)
    return TrainResult(adapter_path=run.adapter, steps=done,
                       final_loss=float(sum(recent_losses) / len(recent_losses)) if recent_losses else math.nan,
                       valid=valid, train_seconds=train_seconds, peak_rss_bytes=peak_rss_bytes(),
                       best=best, best_adapter_path=run.best if best is not None else None,
                       rollbacks=len(rollbacks), stop_reason=stop_reason)
