"""MeZO, FZOO and ConMeZO on an engine as steppers of the training loop (edgezo.trainer), and the engine's validation.

The optimizer (edgezo.mezo) sees only a function from parameters to a loss; here that function is the objective on
one batch through the engine, which holds the adapter (Engine.set_adapter) and receives each perturbation.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import numpy as np

from .adapter import LoraAdapter
from .data import Example, Task
from .files import EdgezoError
from .mezo import AutoRate, Estimator, MezoConfig, NonFiniteLoss, StepRecord, initial_momentum, zo_step
from .objective import Totals, evaluate, loss_function
from .rewards import RewardError
from .rundir import RunDir
from .trainer import StepFailed

ObjectiveFn = Callable[..., Callable]  # (engine, batch, task) -> the step's loss function of the parameters


def trainable_tensors(adapter: LoraAdapter, freeze_lora_a: bool) -> dict:
    """The adapter tensors the optimizer perturbs and updates (all, or only the .lora_b ones for LoRA-FA)."""
    return {name: t for name, t in adapter.tensors.items() if not (freeze_lora_a and name.endswith(".lora_a"))}


def step_fields(record: StepRecord) -> dict:
    """A step's metrics line (without the loop's clock fields): what replays it, and its losses."""
    fields = {"loss": record.loss, "lr": record.lr, "seeds": record.seeds, "projected_grads": record.projected_grads,
              "losses_plus": record.losses_plus, "losses_minus": record.losses_minus}
    if record.loss_center is not None:
        fields["loss_0"] = record.loss_center
    return fields


class ZoStepper:
    """The adapter, trained in place by the configured zeroth-order estimator (edgezo.mezo).

    Subclasses change only how a step's record is estimated (edgezo.distributed.steppers); the update, its
    checks and the checkpoints are here."""

    resumable = True

    def __init__(self, adapter: LoraAdapter, mezo: MezoConfig, run_seed: int, total_steps: int,
                 freeze_lora_a: bool = False):
        self.adapter, self.mezo, self.run_seed, self.total_steps = adapter, mezo, run_seed, total_steps
        self.theta = trainable_tensors(adapter, freeze_lora_a)  # the same arrays: updates land in adapter.tensors
        # ConMeZO's state, checkpointed with the adapter; None for the stateless estimators
        self.momentum = initial_momentum(self.theta) if mezo.estimator is Estimator.CONMEZO else None
        self.auto_rate = AutoRate(mezo, total_steps) if mezo.auto else None
        self.rate_scale = 1.0  # lowered by the training loop's rollbacks (edgezo.trainer)

    def step_rate(self, record: StepRecord) -> float:
        """The rate a step applies: AutoRate's or the schedule's (record.lr), times the rollbacks' scale."""
        lr = self.auto_rate(record) if self.auto_rate else record.lr
        return lr * self.rate_scale  # times 1.0 (no rollback yet) is exact: a fixed rate stays bit for bit

    def reset(self, adapter: LoraAdapter) -> None:
        """Start again from `adapter` (the seed init), in place: theta's arrays are the ones the caller holds."""
        for name, t in adapter.tensors.items():
            self.adapter.tensors[name][...] = t
        if self.momentum is not None:
            self.momentum = initial_momentum(self.theta)

    def resume(self, run: RunDir) -> None:
        """Take the optimizer state saved with the run's last checkpoint (the adapter is loaded by the caller) and
        AutoRate's window from the step log (truncated to the checkpoint)."""
        if self.auto_rate is not None:
            grads = [e["projected_grads"] for e in run.events() if "projected_grads" in e]
            self.auto_rate = AutoRate(self.mezo, self.total_steps, grads[-self.mezo.auto_window:])
        if self.momentum is not None:
            saved = run.load_optimizer_state()
            if saved.keys() != self.momentum.keys() or any(saved[k].shape != m.shape for k, m in self.momentum.items()):
                raise EdgezoError(f"{run.path}: the checkpoint's momentum does not fit this adapter")
            self.momentum = {name: saved[name].astype(np.float32) for name in self.momentum}

    def estimate(self, batch: Sequence[Example], step: int) -> StepRecord:
        """Estimate and apply one step to self.theta (mezo.zo_step's contract)."""
        raise NotImplementedError

    def step(self, batch: Sequence[Example], step: int) -> dict:
        try:
            record = self.estimate(batch, step)
        except (NonFiniteLoss, RewardError) as exc:
            raise StepFailed(str(exc)) from None
        if not all(np.isfinite(t).all() for t in self.theta.values()):
            raise StepFailed(f"step {step + 1}: the update made the adapter non-finite (learning rate too high?)")
        if self.auto_rate is not None:
            self.auto_rate.observe(record.projected_grads)
        return step_fields(record)

    def restore(self, path) -> None:
        """Roll back to the adapter saved at `path` (the best so far); ConMeZO's momentum starts again from zero."""
        saved = LoraAdapter.load(path).tensors
        for name, t in self.theta.items():
            t[...] = saved[name]
        if self.momentum is not None:
            self.momentum = initial_momentum(self.theta)

    def save(self, path) -> None:
        self.adapter.save(path)

    def checkpoint(self, run: RunDir, step: int) -> None:
        run.save_checkpoint(self.adapter, step, optimizer=self.momentum)


class EngineStepper(ZoStepper):
    """Every evaluation of a step on this process's engine: `objective(engine, batch, task)` is the step's loss
    (default objective.loss_function; edgezo.rewards gives a negated reward)."""

    def __init__(self, engine, task: Task, adapter: LoraAdapter, mezo: MezoConfig, run_seed: int, total_steps: int,
                 freeze_lora_a: bool = False, objective: ObjectiveFn | None = None):
        super().__init__(adapter, mezo, run_seed, total_steps, freeze_lora_a)
        self.engine, self.task, self.objective = engine, task, objective

    def estimate(self, batch: Sequence[Example], step: int) -> StepRecord:
        loss = (self.objective or loss_function)(self.engine, batch, self.task)
        # frozen tensors (LoRA-FA's A) come from the adapter, the trained ones from the estimator
        return zo_step(self.theta, lambda params: loss(collections.ChainMap(params, self.adapter.tensors)),
                       self.mezo, self.run_seed, step, self.total_steps, self.momentum, rate=self.step_rate)


def engine_validation(engine, adapter: LoraAdapter, task: Task, batch_size: int, evaluate_fn: Callable = evaluate):
    """The loop's validate(examples, on_batch): the adapter as it is now, through `evaluate_fn` (same signature as
    objective.evaluate; edgezo.rewards and edgezo.distributed give their own)."""

    def validate(examples: Sequence[Example], on_batch: Callable[[int], None]) -> Totals:
        engine.update_adapter(adapter.tensors)
        return evaluate_fn(engine, examples, task, batch_size, on_batch=on_batch)

    return validate
