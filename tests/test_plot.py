"""edgezo plot: the runs' own points end up in the figure and the image is written (issue 16, item 3)."""

import json

import pytest

pytest.importorskip("matplotlib")

from edgezo.cli import main  # noqa: E402
from edgezo.plot import plot_runs, read_curves, running_mean  # noqa: E402
from tests.helpers import finetune_args, run_json  # noqa: E402


def lines_by_gid(fig) -> dict:
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}


def test_plot_overlays_the_runs_points_against_steps_and_wall_clock(tiny_gguf, sentiment_dir, tmp_path, capsys):
    runs = [tmp_path / "lr-small", tmp_path / "lr-large"]
    for run, lr in zip(runs, ("0.01", "0.5")):
        result = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, run, 4, "--learning-rate", lr,
                                                "--eval-every", "2"))
        assert result["steps"] == 4

    out = tmp_path / "curves.png"
    reported = run_json(capsys, ["plot", *map(str, runs), "-o", str(out), "--json"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert reported["runs"] == {str(r): {"n_steps": 4, "n_evals": 3} for r in runs}

    fig = plot_runs([read_curves(r) for r in runs])
    lines = lines_by_gid(fig)
    for run in runs:
        log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [e for e in log if "loss" in e]
        evals = [e for e in log if "valid_loss" in e]
        raw = lines[f"{run}:train_loss_raw:step"]
        assert list(raw.get_xdata()) == [e["step"] for e in steps]
        assert list(raw.get_ydata()) == [e["loss"] for e in steps]
        for key in ("valid_loss", "valid_accuracy"):
            for x_key in ("step", "train_seconds"):
                line = lines[f"{run}:{key}:{x_key}"]
                assert list(line.get_xdata()) == [e[x_key] for e in evals]
                assert list(line.get_ydata()) == [e[key] for e in evals]
        assert list(lines[f"{run}:train_loss:train_seconds"].get_xdata()) == [e["train_seconds"] for e in steps]
    # the two runs are distinguishable: one colour each, both in the legend
    assert lines[f"{runs[0]}:valid_loss:step"].get_color() != lines[f"{runs[1]}:valid_loss:step"].get_color()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [str(r) for r in runs]


def test_finetune_ends_by_naming_the_plot_command(tiny_gguf, sentiment_dir, tmp_path, capsys):
    assert main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run2", 1)) == 0
    assert f"curves: edgezo plot {tmp_path / 'run2'} -o {tmp_path / 'run2' / 'curves.png'}" in capsys.readouterr().err


def test_plot_of_a_directory_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "no metrics.jsonl" in err and "Traceback" not in err and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("values, window, expected", [
    ([1.0, 3.0, 5.0, 7.0], 2, [1.0, 2.0, 4.0, 6.0]),  # full windows after the first value
    ([2.0, 4.0], 10, [2.0, 3.0]),  # a window longer than the run: the mean so far
])
def test_running_mean(values, window, expected):
    assert running_mean(values, window) == pytest.approx(expected)
