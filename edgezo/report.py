"""Optional experiment trackers for the training loop: TensorBoard and Weights & Biases.

Off unless asked for (`finetune --report-to tensorboard|wandb`) and installed; asking for one that is not installed
is an error naming the package, before training starts. Each reporter is a trainer.TrainingEvents: it receives the
same events as the console progress bar and logs
    per step:        train/loss, train/lr, train/seconds_per_step, train/rss_bytes   (x = step)
    per evaluation:  valid/loss, valid/accuracy                                      (x = step)
"""

from __future__ import annotations

from pathlib import Path

from .files import EdgezoError
from .trainer import TrainingEvents

REPORTERS = ("tensorboard", "wandb")
STEP_SCALARS = {"train/loss": "loss", "train/lr": "lr", "train/seconds_per_step": "seconds", "train/rss_bytes": "rss_bytes"}
EVAL_SCALARS = {"valid/loss": "valid_loss", "valid/accuracy": "valid_accuracy"}


class TensorBoardReporter(TrainingEvents):
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

    def step(self, fields: dict) -> None:
        self._add(fields, STEP_SCALARS)

    def evaluated(self, fields: dict) -> None:
        self._add(fields, EVAL_SCALARS)

    def _add(self, fields: dict, scalars: dict) -> None:
        for tag, key in scalars.items():
            self.writer.add_scalar(tag, fields[key], fields["step"])

    def close(self) -> None:
        self.writer.close()


class WandbReporter(TrainingEvents):
    """A wandb run (online or offline as wandb is configured: WANDB_MODE=offline keeps it local)."""

    def __init__(self, run_dir: Path, project: str | None, config: dict):
        try:
            import wandb
        except ImportError:
            raise EdgezoError("--report-to wandb needs wandb: pip install wandb") from None
        self.run = wandb.init(project=project or "edgezo", name=Path(run_dir).name, dir=str(run_dir), config=config,
                              resume="allow")

    def step(self, fields: dict) -> None:
        self.run.log({tag: fields[key] for tag, key in STEP_SCALARS.items()}, step=fields["step"])

    def evaluated(self, fields: dict) -> None:
        self.run.log({tag: fields[key] for tag, key in EVAL_SCALARS.items()}, step=fields["step"])

    def close(self) -> None:
        self.run.finish()


def make_reporter(kind: str, run_dir: Path, project: str | None = None, config: dict | None = None):
    if kind == "tensorboard":
        return TensorBoardReporter(run_dir)
    if kind == "wandb":
        return WandbReporter(run_dir, project, config or {})
    raise EdgezoError(f"--report-to: unknown reporter {kind!r}; choose from {', '.join(REPORTERS)}")


class Fanout(TrainingEvents):
    """Several TrainingEvents as one (the progress bar first, then the reporters): every event goes to each."""

    def __init__(self, *receivers: TrainingEvents):
        self.receivers = receivers


def _fan_out(name: str):
    def event(self, *args):
        for receiver in self.receivers:
            getattr(receiver, name)(*args)
    return event


for _name, _method in vars(TrainingEvents).items():  # every event, so none is dropped when one is added
    if callable(_method) and not _name.startswith("_"):
        setattr(Fanout, _name, _fan_out(_name))
