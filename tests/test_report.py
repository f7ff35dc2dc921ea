"""--report-to (issue 16, item 3): TensorBoard scalars are the run's own metrics; a missing tracker is a clear error."""

import importlib.util
import json

import pytest

from edgezo.cli import main
from tests.helpers import finetune_args, run_json


def test_tensorboard_gets_the_runs_losses_and_accuracy(tiny_gguf, sentiment_dir, tmp_path, capsys):
    pytest.importorskip("tensorboardX")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, run, 4, "--report-to", "tensorboard"))
    events = accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(s.step, s.value) for s in events.Scalars("train/loss")]
    assert [step for step, _ in losses] == [e["step"] for e in log if "loss" in e]
    assert [v for _, v in losses] == pytest.approx([e["loss"] for e in log if "loss" in e], rel=1e-6)
    accuracy = [(s.step, s.value) for s in events.Scalars("valid/accuracy")]
    assert accuracy == [(e["step"], pytest.approx(e["valid_accuracy"])) for e in log if "valid_loss" in e]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_asking_for_a_tracker_that_is_not_installed_is_a_clear_error(tiny_gguf, sentiment_dir, tmp_path, capsys):
    assert main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 2, "--report-to", "wandb")) == 1
    err = capsys.readouterr().err
    assert "--report-to wandb needs wandb" in err and "Traceback" not in err


def test_fanout_passes_every_training_event_to_each_receiver():
    from edgezo.report import Fanout
    from edgezo.trainer import TrainingEvents

    events = [name for name, method in vars(TrainingEvents).items() if callable(method) and not name.startswith("_")]

    class Recorder(TrainingEvents):
        def __init__(self):
            self.calls = []

    for name in events:
        setattr(Recorder, name, lambda self, *args, name=name: self.calls.append(name))
    receivers = Recorder(), Recorder()
    fanout = Fanout(*receivers)
    for name in events:
        getattr(fanout, name)(*[0] * (getattr(TrainingEvents, name).__code__.co_argcount - 1))
    assert {"start", "rolled_back", "preparing", "close"} <= set(events)
    assert receivers[0].calls == receivers[1].calls == events
