"""Optional experiment trackers for the training callback: TensorBoard and Weights & Biases.

Off unless asked for (`finetune --report-to tensorboard|wandb`) and installed; asking for one that is not installed
is an error naming the package, before training starts. Each reporter is a training callback (trainer.Callback):
it receives the same events as the console progress bar and logs
    per step:        train/loss, train/lr, train/seconds_per_step, train/rss_bytes   (x = step)
    per evaluation:  valid/loss, valid/accuracy                                      (x = step)
"""

from __future__ import annotations

from pathlib import Path

from .files import EdgezoError

REPORTERS = ("tensorboard", "wandb")


class TensorBoardReporter:
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`). tensorboardX writes them without
    torch; torch.utils.tensorboard is used if tensorboardX is missing and torch is there."""

    def __init__(self, run_dir: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise EdgezoError("--report-to tensorboard needs tensorboardX: pip install 'edgezo[tensorboard]'") from None
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(str(self.log_dir))

    def __call__(self, event: dict) -> None:
        for tag, value in _scalars(event):
            self.writer.add_scalar(tag, value, event["step"])

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A wandb run (online or offline as wandb is configured: WANDB_MODE=offline keeps it local)."""

    def __init__(self, run_dir: Path, project: str | None, config: dict):
        try:
            import wandb
        except ImportError:
            raise EdgezoError("--report-to wandb needs wandb: pip install wandb") from None
        self.run = wandb.init(project=project or "edgezo", name=Path(run_dir).name, dir=str(run_dir), config=config,
                              resume="allow")

    def __call__(self, event: dict) -> None:
        scalars = dict(_scalars(event))
        if scalars:
            self.run.log(scalars, step=event["step"])

    def close(self) -> None:
        self.run.finish()


def _scalars(event: dict):
    if event.get("kind") == "step":
        yield from (("train/loss", event["loss"]), ("train/lr", event["lr"]),
                    ("train/seconds_per_step", event["seconds"]), ("train/rss_bytes", event["rss_bytes"]))
    elif event.get("kind") == "eval":
        yield from (("valid/loss", event["valid_loss"]), ("valid/accuracy", event["valid_accuracy"]))


def make_reporter(kind: str, run_dir: Path, project: str | None = None, config: dict | None = None):
    if kind == "tensorboard":
        return TensorBoardReporter(run_dir)
    if kind == "wandb":
        return WandbReporter(run_dir, project, config or {})
    raise EdgezoError(f"--report-to: unknown reporter {kind!r}; choose from {', '.join(REPORTERS)}")


class Callbacks:
    """Several training callbacks as one (the progress bar first, then the reporters)."""

    def __init__(self, *callbacks):
        self.callbacks = [c for c in callbacks if c is not None]

    def __call__(self, event: dict) -> None:
        for callback in self.callbacks:
            callback(event)

    def close(self) -> None:
        for callback in self.callbacks:
            if hasattr(callback, "close"):
                callback.close()
