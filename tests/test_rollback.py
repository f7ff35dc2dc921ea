"""The step-size rule and the rollbacks, on a quadratic whose curvature is known (no engine).

L(B) = 1/2 sum_i h_i (B_i - B*_i)^2 on a LoRA B tensor: MeZO's central difference is exact on it, so the projected
gradient is z . grad L and what a rate does follows from h alone.
"""

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from edgezo.adapter import LoraAdapter, LoraConfig
from edgezo.mezo import AUTO, AutoRate, MezoConfig, zo_step
from edgezo.objective import Totals
from edgezo.replay import replay_events
from edgezo.rundir import RunDir, is_better, regression
from edgezo.steppers import ZoStepper
from edgezo.trainer import MAX_ROLLBACKS, ROLLBACK_RATE_FACTOR, TrainConfig, train

D = 64
A_NAME, B_NAME = "blk.0.attn_k.weight.lora_a", "blk.0.attn_k.weight.lora_b"
TARGET = (np.random.default_rng(0).standard_normal((D, 1)) * 0.02).astype(np.float32)
TRAIN_SET = list(range(32))  # the quadratic ignores its batches


def curvature(scale: float) -> np.ndarray:
    return (scale * np.linspace(0.5, 2.0, D)).astype(np.float32).reshape(D, 1)


def quadratic(h: np.ndarray):
    return lambda params: 0.5 * float(np.sum(h * (params[B_NAME] - TARGET) ** 2))


def start_adapter() -> LoraAdapter:
    tensors = {A_NAME: np.ones((1, 8), np.float32), B_NAME: np.zeros((D, 1), np.float32)}
    return LoraAdapter(LoraConfig(rank=1, alpha=1.0), "llama", tensors)


class QuadraticStepper(ZoStepper):
    """MeZO on the quadratic through ZoStepper: its rate, rollbacks and checkpoints are the engine stepper's."""

    def __init__(self, adapter: LoraAdapter, mezo: MezoConfig, total_steps: int, h: np.ndarray):
        super().__init__(adapter, mezo, run_seed=0, total_steps=total_steps, freeze_lora_a=True)
        self.loss = quadratic(h)

    def estimate(self, batch, step):
        return zo_step(self.theta, self.loss, self.mezo, self.run_seed, step, self.total_steps, self.momentum,
                       rate=self.step_rate)


def validation(stepper: QuadraticStepper):
    def validate(examples, on_batch):
        return Totals(loss_sum=stepper.loss(stepper.theta), n_targets=1, n_examples=1)

    return validate


def run_quadratic(path, learning_rate, steps: int, h: np.ndarray, start_step: int = 0, **train_options):
    run = RunDir(path)
    run.create()
    mezo = MezoConfig(learning_rate=learning_rate)
    adapter = start_adapter()
    if start_step:
        adapter, start_step = run.load_checkpoint(None)
        run.truncate_metrics(start_step)
    stepper = QuadraticStepper(adapter, mezo, steps, h)
    if start_step:
        stepper.resume(run)
    config = TrainConfig(steps=steps, batch_size=4, eval_every=10, save_every=10, **train_options)
    result = train(stepper, validation(stepper), TRAIN_SET, [0], config, run, start_step=start_step)
    return run, stepper, result


@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e2, 1e4])
def test_the_auto_rate_needs_no_tuning_across_six_orders_of_curvature(scale):
    h = curvature(scale)
    loss = quadratic(h)
    ends = {}
    for lr in (AUTO, 1e-3):
        mezo = MezoConfig(learning_rate=lr)
        theta = {B_NAME: np.zeros((D, 1), np.float32)}
        rate = AutoRate(mezo, 400) if mezo.auto else None
        start = loss(theta)
        with np.errstate(over="ignore", invalid="ignore"):
            for step in range(400):
                record = zo_step(theta, loss, mezo, 0, step, 400, rate=rate)
                if rate:
                    rate.observe(record.projected_grads)
        ends[lr] = loss(theta) / start
    assert ends[AUTO] < 0.1  # the same defaults at every scale
    if scale <= 1e-2:
        assert ends[1e-3] > 0.9  # a fixed rate barely moves where the curvature is low...
    if scale >= 1e2:
        assert not ends[1e-3] < 1  # ...and diverges where it is high


def test_the_auto_rate_follows_its_formula():
    mezo = MezoConfig(learning_rate=AUTO, auto_window=3, auto_clip=1.5)
    rate = AutoRate(mezo, 100, history=[[1.0], [-1.0], [1.0], [1.0]])  # the window keeps the last 3
    record = type("R", (), {"projected_grads": [1.5], "step": 5})()
    sigma = math.sqrt((1 + 1 + 1 + 1.5**2) / 4)
    assert rate(record) == pytest.approx(mezo.auto_step * mezo.eps / sigma)
    record.projected_grads = [10.0]  # clipped: |g| counts as auto_clip * sigma
    sigma = math.sqrt((3 + 100) / 4)
    assert rate(record) == pytest.approx(mezo.auto_step * mezo.eps / sigma * 1.5 * sigma / 10.0)
    no_clip = AutoRate(replace(mezo, auto_clip=0.0), 100, history=[[1.0], [-1.0], [1.0], [1.0]])
    assert no_clip(record) == pytest.approx(mezo.auto_step * mezo.eps / sigma)  # --auto-clip 0: the outlier counts


def test_the_auto_flags_reach_the_optimizer():
    from edgezo.cli.parser import build_parser
    from edgezo.session import FinetuneSpec, mezo_config

    args = build_parser().parse_args(["finetune", "--auto-step", "0.3", "--auto-clip", "0"])
    config = mezo_config(FinetuneSpec.from_options(args))
    assert (config.learning_rate, config.auto_step, config.auto_clip) == (AUTO, 0.3, 0.0)


def test_a_diverging_rate_is_rolled_back_and_the_run_never_ends_worse_than_it_started(tmp_path):
    h = curvature(1e2)
    run, stepper, result = run_quadratic(tmp_path / "run", 1e-2, 60, h, rollback=True, best_by="valid_loss")
    events = run.events()
    rollbacks = [e for e in events if "rollback_to" in e]
    assert rollbacks and result.rollbacks == len(rollbacks)
    assert [e["rate_scale"] for e in rollbacks] == [ROLLBACK_RATE_FACTOR ** (i + 1) for i in range(len(rollbacks))]
    start = quadratic(h)({B_NAME: np.zeros((D, 1), np.float32)})
    final = quadratic(h)(LoraAdapter.load(run.adapter).tensors)
    assert final <= start
    assert final == pytest.approx(result.best["valid_loss"])
    # each rollback restored the adapter of the best validation: the next step starts from it
    lines = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    for i, line in enumerate(lines):
        if "rollback_to" in line and i + 1 < len(lines) and "lr" in lines[i + 1]:
            assert lines[i + 1]["lr"] == pytest.approx(1e-2 * line["rate_scale"])


def test_without_rollback_the_same_run_diverges(tmp_path):
    h = curvature(1e2)
    with np.errstate(over="ignore", invalid="ignore"):
        run, _, result = run_quadratic(tmp_path / "run", 1e-2, 30, h, best_by="valid_loss")
    last = quadratic(h)(LoraAdapter.load(run.last).tensors)
    assert not last < 10 * result.best["valid_loss"]  # the last adapter is far worse; adapter.gguf is the best
    assert quadratic(h)(LoraAdapter.load(run.adapter).tensors) == pytest.approx(result.best["valid_loss"])


def test_replay_with_rollbacks_in_the_log_is_bit_exact(tmp_path):
    h = curvature(1e2)
    run, stepper, _ = run_quadratic(tmp_path / "run", 1e-2, 60, h, rollback=True, best_by="valid_loss")
    assert any("rollback_to" in e for e in run.events())
    theta = {B_NAME: np.zeros((D, 1), np.float32)}
    replay_events(theta, run.events(), MezoConfig(learning_rate=1e-2))
    np.testing.assert_array_equal(theta[B_NAME], LoraAdapter.load(run.last).tensors[B_NAME])


@pytest.mark.parametrize("learning_rate", [AUTO, 1e-2])
def test_resume_with_rollbacks_in_the_log_is_bit_exact(tmp_path, learning_rate):
    h = curvature(1e2)
    full, _, _ = run_quadratic(tmp_path / "full", learning_rate, 60, h, rollback=True, best_by="valid_loss")
    part, _, _ = run_quadratic(tmp_path / "part", learning_rate, 40, h, rollback=True, best_by="valid_loss")
    if learning_rate != AUTO:
        assert any("rollback_to" in e for e in part.events())  # the checkpoint comes after rollbacks
    # the best of the killed part of a run must not leak: the checkpoint's best is restored on --resume
    resumed, _, _ = run_quadratic(tmp_path / "part", learning_rate, 60, h, start_step=40, rollback=True,
                                  best_by="valid_loss")
    for name in ("adapter.gguf", "adapter.last.gguf", "adapter.best.gguf"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "part" / name).read_bytes(), name
    drop = ("seconds", "train_seconds", "rss_bytes")
    strip = lambda events: [{k: v for k, v in e.items() if k not in drop} for e in events]  # noqa: E731
    assert strip(full.events()) == strip(resumed.events())


def test_rollbacks_are_bounded(tmp_path):
    h = curvature(1e4)
    with np.errstate(over="ignore", invalid="ignore"):
        run, _, result = run_quadratic(tmp_path / "run", 1.0, 200, h, rollback=True, best_by="valid_loss")
    assert result.rollbacks == MAX_ROLLBACKS and result.steps < 200 and "rollbacks" in result.stop_reason


def test_patience_ends_a_run_that_stopped_improving(tmp_path):
    h = curvature(1e-2)  # a fixed rate of 1e-9 makes no measurable progress
    run, _, result = run_quadratic(tmp_path / "run", 1e-9, 200, h, patience=2, best_by="valid_loss")
    assert result.steps == 20 and "patience 2" in result.stop_reason


def test_better_is_judged_on_accuracy_with_the_loss_breaking_ties():
    best = {"step": 0, "valid_accuracy": 0.80, "valid_loss": 0.50, "n_valid": 500}
    assert not is_better({"valid_accuracy": 0.78, "valid_loss": 0.40}, best, "valid_accuracy")  # loss fell, accuracy too
    assert is_better({"valid_accuracy": 0.80, "valid_loss": 0.49}, best, "valid_accuracy")
    assert is_better({"valid_accuracy": 0.81, "valid_loss": 0.60}, best, "valid_accuracy")
    se = math.sqrt(0.8 * 0.2 / 500)
    assert regression({"step": 5, "valid_accuracy": 0.80 - 1.9 * se, "valid_loss": 0.5}, best, "valid_accuracy") is None
    assert regression({"step": 5, "valid_accuracy": 0.80 - 2.1 * se, "valid_loss": 0.5}, best, "valid_accuracy")
    assert regression({"step": 5, "valid_accuracy": 0.9, "valid_loss": math.nan}, best, "valid_accuracy")


def test_a_fixed_rate_trains_exactly_as_before_the_auto_rate(tmp_path):
    """An explicit rate (no rollback) through the stepper and the loop is the plain MeZO step of before, bit for bit:
    the rate hook returns the schedule's rate untouched, and choosing the best adapter does not touch training."""
    h = curvature(1.0)
    run, stepper, _ = run_quadratic(tmp_path / "run", 1e-3, 40, h, best_by="valid_loss")
    theta = {B_NAME: np.zeros((D, 1), np.float32)}
    for step in range(40):
        zo_step(theta, quadratic(h), MezoConfig(learning_rate=1e-3), 0, step, 40)  # no rate hook: the old path
    np.testing.assert_array_equal(theta[B_NAME], LoraAdapter.load(run.last).tensors[B_NAME])
    assert {e["lr"] for e in run.events() if "lr" in e} == {1e-3}
    assert not any("rollback_to" in e for e in run.events())
