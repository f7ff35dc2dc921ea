"""Training curves of one or more runs from their metrics.jsonl (the `plot` extra: matplotlib).

One figure, two rows of three panels: training loss, validation loss and validation accuracy, against the step
(top) and against cumulative training wall-clock (bottom; evaluations excluded, so runs that validated at different
rates stay comparable). Runs are overlaid, one colour each. MeZO's per-step loss is the loss of one batch at
theta +- eps z and very noisy, so each run's raw step losses are drawn faint with a running mean on top.

Every line carries a gid "<run label>:<panel>:<x>" (raw training loss: "...:train_loss_raw:..."), so a test or
a notebook can find a run's data in the returned Figure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .files import EdgezoError, atomic_path
from .rundir import RunDir

PANELS = (("train_loss", "training loss"), ("valid_loss", "validation loss"), ("valid_accuracy", "validation accuracy"))
X_AXES = (("step", "step"), ("train_seconds", "training wall-clock (s, evaluations excluded)"))
SMOOTH_STEPS = 20  # running-mean window over MeZO's per-batch losses


@dataclass
class RunCurves:
    """The points of one run: step lines (step, loss, train_seconds) and evaluation lines (step, valid_*)."""

    label: str
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def read_curves(run_dir: str | os.PathLike, label: str | None = None) -> RunCurves:
    """A run directory's metrics.jsonl as curves; an error naming the file if it is missing or unreadable."""
    run = RunDir(run_dir)
    if not run.metrics.is_file():
        raise EdgezoError(f"{run_dir}: no metrics.jsonl (not a run directory of finetune / reference-*)")
    curves = RunCurves(label or str(Path(run_dir)))  # the path as the user wrote it: unique among the runs
    for event in run.events():
        if "valid_loss" in event:
            curves.evals.append(event)
        elif "loss" in event:
            curves.steps.append(event)
    if not curves.steps and not curves.evals:
        raise EdgezoError(f"{run.metrics}: no step or evaluation lines yet")
    return curves


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: Sequence[RunCurves], title: str | None = None):
    """A matplotlib Figure of the runs' curves (no pyplot: no global state, no display needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise EdgezoError("plotting needs matplotlib: pip install 'edgezo[plot]' (or pip install matplotlib)") from None
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise EdgezoError(f"a run is named twice ({', '.join(labels)})")
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(len(X_AXES), len(PANELS))
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for row, (x_key, x_label) in enumerate(X_AXES):
        for col, (key, y_label) in enumerate(PANELS):
            ax = axes[row][col]
            for run, colour in zip(runs, colours):
                _draw(ax, run, key, x_key, colour)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def _draw(ax, run: RunCurves, key: str, x_key: str, colour: str) -> None:
    gid = f"{run.label}:{key}:{x_key}"
    if key == "train_loss":
        xs = [e[x_key] for e in run.steps if x_key in e]
        ys = [e["loss"] for e in run.steps if x_key in e]
        if xs:
            ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.7, gid=f"{run.label}:train_loss_raw:{x_key}")
            ax.plot(xs, running_mean(ys, SMOOTH_STEPS), color=colour, label=run.label, gid=gid)
        return
    xs = [e[x_key] for e in run.evals if x_key in e]
    ys = [e[key] for e in run.evals if x_key in e]
    if xs:
        ax.plot(xs, ys, color=colour, marker="o", markersize=3, label=run.label, gid=gid)


def save_plot(run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike, title: str | None = None):
    """Read the runs, plot them and write the image atomically (format from the suffix: .png, .svg, .pdf).
    Returns (figure, curves)."""
    if not run_dirs:
        raise EdgezoError("name at least one run directory")
    curves = [read_curves(d) for d in run_dirs]
    fig = plot_runs(curves, title)
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format=output.suffix.lstrip(".") or "png", dpi=110)
    return fig, curves
