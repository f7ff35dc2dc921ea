"""The Python API: `edgezo.finetune(...)` and `edgezo.evaluate(...)` for notebooks and scripts.

Each call runs exactly the code of the CLI command (the same parser defaults, the same cmd_* function), so a
notebook run and `edgezo finetune` with the same options write the same run directory. Keyword arguments are the
long flag names with underscores (`learning_rate=1e-3` for --learning-rate); lists are accepted where a flag takes
a comma-separated list (`targets=["attn_q", "attn_v"]`) and a dict for `label_words`. Errors raise EdgezoError
(a stop by SIGINT or a memory budget: TrainingInterrupted) instead of exiting; progress goes to stderr.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path

from .files import EdgezoError


@dataclass(frozen=True)
class FinetuneResult:
    """What `edgezo finetune --json` reports, as attributes; paths are Paths."""

    adapter: Path
    run_dir: Path
    steps: int
    final_loss: float  # mean training loss of the last min(50, steps) steps
    seconds: float  # wall-clock of the whole call
    train_seconds: float  # training steps only (evaluations excluded), over the whole run
    peak_rss_bytes: int
    valid_accuracy: float | None = None  # at the last step (None without a validation split)
    valid_loss: float | None = None
    best_adapter: Path | None = None  # adapter.best.gguf: the best validation (adapter is a copy of it; docs/finetune.md)
    best_step: int | None = None
    best_valid_loss: float | None = None
    best_valid_accuracy: float | None = None
    best_valid_reward: float | None = None  # --objective with a reward only
    rollbacks: int = 0  # restores of the best adapter at a lower rate (--rollback, on with the auto rate)
    stop_reason: str | None = None  # why the run ended before --steps (patience, rollbacks, time limit), if it did

    def metrics(self) -> list[dict]:
        """The run's metrics.jsonl: one dict per step and per evaluation."""
        from .rundir import RunDir

        return RunDir(self.run_dir).events()

    def plot(self, output: str | Path | None = None):
        """Training curves (the plot extra); written to `output` (default RUN/curves.png). Returns the Figure."""
        from .plot import save_plot

        fig, _ = save_plot([self.run_dir], output or self.run_dir / "curves.png")
        return fig


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # classification accuracy, or token accuracy for text / completion / chat data
    loss: float
    n_examples: int
    split: str
    model: Path
    adapter: Path | None
    seconds: float
    # prompt/completion and chat data: means over greedy generations (exact_match; a `reward`; on the tool-calls
    # data json_valid, name_accuracy, argument_accuracy, tool_call_reward)
    generation: dict[str, float] = field(default_factory=dict)


EVAL_FIELDS = {f.name for f in fields(EvalResult)} | {"peak_rss_bytes"}  # eval --json's keys other than generation's


def _command_args(command: str, options: dict) -> argparse.Namespace:
    """The command's parsed defaults with `options` set on top, checked against its flags."""
    from .cli import build_parser, subcommand_parser

    parser = build_parser()
    sub = subcommand_parser(parser, command)
    known = {a.dest for a in sub._actions} - {"help", "config", "json"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"{command}() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"the options are the long flag names of `edgezo {command}`: {', '.join(sorted(known))}")
    missing = [a.dest for a in sub._actions if a.required and a.dest not in options]
    if missing:
        raise TypeError(f"{command}() missing required option(s) {', '.join(missing)}")
    args = parser.parse_args([command])  # every default exactly as the CLI has it
    for key, value in options.items():
        if key == "label_words" and isinstance(value, dict):
            value = ",".join(f"{label}={word}" for label, word in value.items())
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif isinstance(value, Path):
            value = str(value)
        setattr(args, key, value)
    args.json = True
    return args


def finetune(**options) -> FinetuneResult:
    """Train a LoRA adapter with MeZO, as `edgezo finetune` with these options (README: Python API).

    >>> run = edgezo.finetune(model="smollm2-135m", data="movie-reviews", steps=200, out="runs/nb")  # doctest: +SKIP
    """
    from .cli import cmd_finetune

    summary, _ = cmd_finetune(_command_args("finetune", options))
    names = {f.name for f in fields(FinetuneResult)}
    kept = {k: v for k, v in summary.items() if k in names}
    for key in ("adapter", "run_dir", "best_adapter"):
        if kept.get(key) is not None:
            kept[key] = Path(kept[key])
    if kept.get("adapter") is None:
        raise EdgezoError("this process is not rank 0 of a distributed run: rank 0 holds the result")
    return FinetuneResult(**kept)


def evaluate(**options) -> EvalResult:
    """Accuracy and loss of a base model or an adapter (`adapter="runs/nb"`, `"runs/nb:best"`), as `edgezo eval`."""
    from .cli import cmd_eval

    result, _ = cmd_eval(_command_args("eval", options))
    return EvalResult(accuracy=result["accuracy"], loss=result["loss"], n_examples=result["n_examples"],
                      split=result["split"], model=Path(result["model"]),
                      adapter=Path(result["adapter"]) if result["adapter"] else None, seconds=result["seconds"],
                      generation={k: v for k, v in result.items() if k not in EVAL_FIELDS})
