"""The untimed parts of bench/: statistics, the fresh-process runner, ratios, table rendering and the block of
docs/benchmarks.md.

Nothing here measures speed; the benchmarks themselves are run by hand (bench/README.md).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

from bench import budget_experiment, budget_legacy  # noqa: E402
from bench import busy  # noqa: E402
from bench import common  # noqa: E402
from bench import compare  # noqa: E402
from bench import estimators  # noqa: E402
from bench import fleet  # noqa: E402
from bench import generative  # noqa: E402
from bench import gradient_noise  # noqa: E402
from bench import intents_data  # noqa: E402
from bench import kernels  # noqa: E402
from bench import layer_gradients  # noqa: E402
from bench import mezo_step  # noqa: E402
from bench import prefix_reuse  # noqa: E402
from bench import report  # noqa: E402
from bench import throughput  # noqa: E402
from bench import time_to_accuracy  # noqa: E402
from bench import wire_bytes  # noqa: E402

MACHINE = {"cpu": "Test CPU", "cores": 2, "ram_bytes": 8 * 2**30, "versions": {"llama_cpp_python": "0.3.36"},
           "load_average": [3.5, 1.0, 0.5]}


# ---- common ---------------------------------------------------------------------------------------------------
def test_summary_median_min_max():
    assert common.summary([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert common.summary([5.0])["median"] == 5.0
    with pytest.raises(ValueError):
        common.summary([])


def test_timed_skips_warmup_calls():
    calls = []
    times = common.timed(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_last_json_takes_the_last_non_empty_line():
    assert common.last_json('progress\n{"a": 1}\n{"b": 2}\n\n') == {"b": 2}
    with pytest.raises(common.ChildFailed):
        common.last_json("\n \n")


def test_run_fresh_reports_the_child_peak_rss_and_output():
    # The child touches 200 MiB; ru_maxrss from wait4 must see it (and not the parent's own RSS).
    code = "b = bytearray(200 * 2**20); print('noise'); print('{\"ok\": true}')"
    done = common.run_fresh([sys.executable, "-c", code])
    assert done["returncode"] == 0
    assert common.last_json(done["stdout"]) == {"ok": True}
    assert 200 * 2**20 < done["peak_rss_bytes"] < 600 * 2**20
    small = common.run_fresh([sys.executable, "-c", "pass"])
    assert small["peak_rss_bytes"] < done["peak_rss_bytes"] - 150 * 2**20


def test_run_fresh_does_not_inherit_the_parents_high_water_mark():
    # Regression: ru_maxrss survives fork and exec, so with torch loaded in pytest `python -c pass` reported 427 MiB.
    held = bytearray(300 * 2**20)
    held[::4096] = b"\x01" * len(held[::4096])  # touch every page: this process's high-water mark is now >= 300 MiB
    small = common.run_fresh([sys.executable, "-c", "pass"])
    assert small["returncode"] == 0
    assert small["peak_rss_bytes"] < 100 * 2**20


def test_run_fresh_keeps_the_exit_status_of_a_killed_child():
    done = common.run_fresh([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert done["returncode"] == -9


def test_run_fresh_leaves_ctrl_c_to_the_command_from_its_start():
    # Regression: the launcher ignores SIGINT and the command inherited that, so a Ctrl-C before the trainer set its
    # handler was lost and the command trained on as an orphan.
    done = common.run_fresh([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT))"])
    assert "default_int_handler" in done["stdout"]


def test_run_json_names_the_failing_child():
    with pytest.raises(common.ChildFailed, match="(?s)the child.*exit 3.*boom"):
        common.run_json([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], "the child")


def test_results_files_round_trip(tmp_path):
    assert common.latest_result("x", tmp_path) is None
    common.append_result("x", {"n": 1}, tmp_path)
    common.append_result("x", {"n": 2}, tmp_path)
    assert common.latest_result("x", tmp_path) == {"n": 2}
    assert len((tmp_path / "x.jsonl").read_text().splitlines()) == 2


def test_table_and_spread():
    assert common.table(["a", "b"], [[1, None]]) == "| a | b |\n|---|---|\n| 1 |  |\n"
    assert common.spread({"median": 0.5, "min": 0.25, "max": 1.0}, 2) == "0.50 (0.25-1.00)"


# ---- ratios and splits ----------------------------------------------------------------------------------------
def compare_result() -> dict:
    def row(label, rss, step):
        return {"label": label, "peak_rss_bytes": rss, "step_seconds": {"median": step, "min": step, "max": step, "n": 3},
                "steps_per_s": 1 / step, "tokens_per_s": 500 / step}

    rows = {"mezo_q4_0": row("edgezo MeZO, llama.cpp Q4_0", 300 * 2**20, 0.5),
            "torch_mezo": row("torch MeZO, f32", 1500 * 2**20, 1.0),
            "torch_bp": row("torch BP + AdamW, f32", 3000 * 2**20, 3.0)}
    return {"benchmark": "compare", **compare.ratios(rows), "targets": compare.TARGETS, "rows": rows,
            "model": "smollm2-135m", "batch_size": 16, "mean_tokens_per_step": 500.0, "mean_longest_per_step": 50.0,
            "lora": {"rank": 16, "alpha": 32.0, "targets": ["attn_k", "attn_v"]}, "seed": 0, "threads": 2, "steps": 8,
            "warmup_steps": 2, "machine": MACHINE, "time": "2026-01-01T00:00:00Z", "note": "measured under load"}


def test_compare_ratios_use_the_runs_of_the_same_result():
    result = compare_result()
    assert result["rss_torch_bp_over_mezo_q4_0"] == pytest.approx(10.0)
    assert result["step_torch_mezo_over_mezo_q4_0"] == pytest.approx(2.0)
    assert result["rss_torch_bp_ckpt_over_mezo_q4_0"] is None  # not run: no ratio, not an error
    text = compare.render(result)
    assert "| `rss_torch_bp_over_mezo_q4_0` | 10.00 | >= 5 |" in text
    assert "3000 MiB" in text and "measured under load" in text


def test_compare_rejects_unknown_configs():
    with pytest.raises(SystemExit):
        compare.parse_args(["--configs", "mezo_q4_0,nope"])
    assert compare.parse_args(["--quick"]).steps == 8


def test_mezo_step_split_adds_up_to_the_remainder():
    parts = [{"step": 0.70, "decode": 0.64, "z_generation": 0.015, "adapter_upload": 0.001, "host_loss": 0.0002,
              "update": 0.008}] * 3
    mezo = {"step": {"median": 0.68}, "forward": {"median": 0.30}, "instrumented": parts}
    split = mezo_step.split(mezo)
    assert split["remainder_seconds"] == pytest.approx(0.08)
    assert split["parts_seconds"]["lora_in_graph"] == pytest.approx(0.04)
    assert sum(split["parts_seconds"].values()) == pytest.approx(split["remainder_seconds"])


def test_throughput_ratio_is_the_median_of_adjacent_pairs_not_of_pooled_figures():
    # The machine drifts (1 s -> 2 s per repetition); within each adjacent pair edgezo is 2 % slower.
    bare_s, edgezo_s = [1.0, 2.0, 1.5], [1.0 / 0.98, 2.0 / 0.98, 1.5 / 0.98]
    row = {"bare": {"token_hash": "abc", "gen_tokens": 31}, "edgezo": {"token_hash": "abc", "gen_tokens": 31},
           "pp_pairs": throughput.paired(bare_s, edgezo_s), "gen_pairs": throughput.paired(bare_s, edgezo_s)}
    r = throughput.compare_sides(row)
    assert r["pp_edgezo_over_bare"]["median"] == pytest.approx(0.98) and r["pp_edgezo_over_bare"]["n"] == 3
    assert r["gen_edgezo_over_bare"]["max"] == pytest.approx(0.98)
    assert r["same_tokens"] and r["same_gen_length"]
    no_gen = throughput.compare_sides({**row, "gen_pairs": None, "bare": {"token_hash": "x"},
                                       "edgezo": {"token_hash": "y"}})
    assert no_gen["gen_edgezo_over_bare"] is None and not no_gen["same_tokens"]
    assert throughput.ratio_cell(r, "pp_edgezo_over_bare") == "0.980 (0.980-0.980)"
    assert throughput.rates([2.0, 4.0, 1.0], 100)["median"] == pytest.approx(50.0)


def test_throughput_sides_alternate_which_goes_first_and_drop_the_warmup():
    calls = []
    sides = {"bare": "b", "edgezo": "e"}
    out = throughput.alternate(sides, lambda side: calls.append(side) or len(calls), warmup=1, repeats=3)
    assert calls == ["b", "e", "e", "b", "b", "e", "e", "b"]
    assert out == {"bare": [4, 5, 8], "edgezo": [3, 6, 7]}


def test_wire_bytes_per_step_is_the_difference_of_two_runs():
    def link(tx, rx):
        return {"tx_bytes": tx, "rx_bytes": rx, "tx_packets": tx // 100, "rx_packets": rx // 100}

    short, long = {"steps": 5, "link": link(10_500, 9_500)}, {"steps": 25, "link": link(14_500, 13_500)}
    assert wire_bytes.per_step(short, long) == {"tx_bytes": 200, "rx_bytes": 200, "tx_packets": 2, "rx_packets": 2}
    result = {"modes": [{"parallel": "data", "runs": [short, long], "per_step": wire_bytes.per_step(short, long),
                         "payload_bytes_per_step_per_worker": 16, "adapter_bytes": 2_949_120,
                         "replicas_identical": True}], "steps": [5, 25], "model": "m", "quant": "q4_0",
              "machine": MACHINE, "time": "t"}
    table = wire_bytes.render(result)
    assert "| data | 16 | 200 | 200 | 2.0 / 2.0 | 18.0 kB | 2.95 MB | yes |" in table  # fixed: 20000 - 5 x 400


def test_fleet_projection_follows_the_stated_model():
    f, z, u = {16: 0.9, 8: 0.5, 1: 0.06}, 0.01, 0.02
    assert fleet.data_parallel_step_s(f, z, u, 16, 2, 0.005) == pytest.approx(2 * 0.5 + 2 * 0.01 + 0.02 + 0.005)
    assert fleet.direction_parallel_step_s(f, z, u, 16, 4, 0.005) == pytest.approx(1.8 + 0.02 + 4 * 0.02 + 3 * 0.005)
    with pytest.raises(ValueError, match="16/4"):
        fleet.data_parallel_step_s(f, z, u, 16, 4, 0.0)  # f(4) was not measured


# ---- the first budget experiment's lines (issue 33's harness: tests/test_budget_experiment.py) ----------------------
MiB = 2**20
PREDICTIONS = {"small": {"mezo": 330 * MiB, "bp": 2400 * MiB, "bp-quant": 2300 * MiB, "bp-ckpt": 1600 * MiB,
                         "bp-quant-ckpt": 1500 * MiB},
               "large": {"mezo": 500 * MiB, "bp": 2900 * MiB, "bp-quant": 2700 * MiB, "bp-ckpt": 2100 * MiB,
                         "bp-quant-ckpt": 2000 * MiB}}


def budget_run(name: str, model: str, curve: list[tuple[float, float, int]], **extra) -> dict:
    return {"name": name, "model": model, "steps": curve[-1][2], "median_step_seconds": 1.0,
            "train_seconds": curve[-1][0], "peak_rss_bytes": 500 * MiB, "valid_curve": curve,
            "final_valid_accuracy": curve[-1][1], "test_accuracy": 0.85, "n_test": 1000, **extra}


def test_budget_experiment_reports_when_mezo_overtakes_for_good_and_who_wins():
    bp = budget_run("bp-quant-ckpt", "small", [(0, 0.79, 0), (100, 0.86, 50), (200, 0.84, 100)], test_accuracy=0.87)
    mezo = budget_run("mezo", "large", [(0, 0.5, 0), (60, 0.85, 100), (120, 0.83, 200), (180, 0.845, 300)],
                      resumed_from_step=200)
    assert budget_legacy.overtakes(mezo, bp) == 180  # not 60: it fell below 0.84 again at 120 s
    assert budget_legacy.overtakes(bp, mezo) is None  # BP ends at 0.84, below MeZO's final 0.845
    assert budget_legacy.overtakes(budget_run("flat", "x", [(0, 0.5, 0), (9, 0.6, 9)]), bp) is None
    zero = {m: {"valid": {"accuracy": 0.8, "n_examples": 200}, "test": {"accuracy": 0.81, "n_examples": 1000}}
            for m in ("small", "large")}
    result = {"budget_bytes": 1750 * MiB, "predictions": PREDICTIONS, "threads": 2, "bp_variant": "bp-quant-ckpt",
              "mezo_learning_rates": {"large": 1e-4}, "runs": [bp, mezo], "minutes": 30, "mezo_model": "large",
              "zero_shot": zero, "refusals": {"bp": "error: predicted 2900 MiB exceeds the memory budget"},
              "machine": MACHINE, "time": "2026-11-30T00:00:00Z"}
    text = budget_experiment.render(result)
    assert "from 3.0 min of training on" in text and "mezo from step 200" in text
    assert "**BP wins on the test split**" in text and "(-2.0 points)" in text
    assert "1500 MiB fits" in text and "2000 MiB |" in text and "exceeds the memory budget" in text
    assert "0.810 (1000)" in text  # the zero-shot table
    assert "mezo on large 0.810 -> 0.850 (+4.0 points)" in text  # what training added


# ---- time to accuracy -----------------------------------------------------------------------------------------
def write_run(directory: Path, evals: list[tuple[int, float, float]]) -> Path:
    directory.mkdir(parents=True)
    lines = []
    for step, seconds, accuracy in evals:
        lines.append({"step": step, "loss": 0.5, "seconds": 1.0, "train_seconds": seconds})
        lines.append({"step": step, "valid_loss": 1 - accuracy, "valid_accuracy": accuracy, "n_valid": 500,
                      "train_seconds": seconds})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return directory


def test_time_to_accuracy_reads_eval_lines_and_finds_first_crossing(tmp_path):
    run = write_run(tmp_path / "mezo", [(0, 0.0, 0.79), (100, 80.0, 0.81), (200, 160.0, 0.80), (300, 240.0, 0.83)])
    curve = time_to_accuracy.read_curve(run)
    assert [e["step"] for e in curve] == [0, 100, 200, 300]
    assert time_to_accuracy.time_to(curve, 0.80) == 80.0  # the first evaluation at or above, not the last
    assert time_to_accuracy.time_to(curve, 0.90) is None
    s = time_to_accuracy.summarise({"mezo": curve}, [0.8, 0.9])["mezo"]
    assert s["final_accuracy"] == 0.83 and s["best_accuracy"] == 0.83 and s["train_seconds"] == 240.0


def test_time_to_accuracy_refuses_logs_without_train_seconds(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "valid_accuracy": 0.8}) + "\n")
    with pytest.raises(SystemExit, match="train_seconds"):
        time_to_accuracy.read_curve(tmp_path)
    with pytest.raises(SystemExit, match="no such metrics log"):
        time_to_accuracy.read_curve(tmp_path / "missing")


def test_time_to_accuracy_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    curve = time_to_accuracy.read_curve(write_run(tmp_path / "r", [(0, 0.0, 0.7), (10, 5.0, 0.8)]))
    time_to_accuracy.plot({"mezo": curve, "bp": curve}, tmp_path / "p.png", "title")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- report ---------------------------------------------------------------------------------------------------
DOC_TEXT = (f"# project\n\nintro\n\n## Benchmarks\n\nhand-written text\n\n{report.BEGIN}\nold table\n"
            f"{report.END}\n\n## Status\nkept\n")


def test_replace_block_changes_only_the_text_between_the_markers():
    new = report.replace_block(DOC_TEXT, "| new | table |\n")
    assert new.startswith("# project\n\nintro\n\n## Benchmarks\n\nhand-written text\n\n" + report.BEGIN)
    assert new.endswith(report.END + "\n\n## Status\nkept\n")
    assert "old table" not in new and "| new | table |" in new
    assert report.replace_block(new, "| new | table |\n") == new  # idempotent


@pytest.mark.parametrize("text", ["no markers", f"{report.END}\n{report.BEGIN}",
                                  f"{report.BEGIN}{report.BEGIN}{report.END}", f"{report.BEGIN} only"])
def test_replace_block_refuses_missing_duplicated_or_reversed_markers(text):
    with pytest.raises(report.ReportError):
        report.replace_block(text, "x")


def test_report_renders_the_latest_result_and_marks_missing_ones(tmp_path):
    old = {**compare_result(), "rss_torch_bp_over_mezo_q4_0": 1.0}
    common.append_result("compare", old, tmp_path)
    common.append_result("compare", compare_result(), tmp_path)
    block = report.build_block(tmp_path)
    assert "| `rss_torch_bp_over_mezo_q4_0` | 10.00 | >= 5 |" in block  # the latest line, not the first
    assert "Not measured yet: `python -m bench.throughput`" in block
    assert block.count("### ") == len(report.SECTIONS)


def test_report_names_an_outdated_result_line(tmp_path):
    common.append_result("mezo_step", {"benchmark": "mezo_step", "step_over_two_forwards": 1.0}, tmp_path)
    with pytest.raises(report.ReportError, match="mezo_step.jsonl.*rerun"):
        report.build_block(tmp_path)


def test_report_command_rewrites_the_doc_and_check_detects_drift(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(DOC_TEXT)
    common.append_result("compare", compare_result(), tmp_path)
    assert report.main(["--doc", str(doc), "--results", str(tmp_path), "--check"]) == 1
    assert doc.read_text() == DOC_TEXT  # --check writes nothing
    assert report.main(["--doc", str(doc), "--results", str(tmp_path)]) == 0
    assert "10.00" in doc.read_text() and doc.read_text().endswith("## Status\nkept\n")
    assert report.main(["--doc", str(doc), "--results", str(tmp_path), "--check"]) == 0


def test_report_writes_docs_benchmarks_with_plots_linked_from_docs():
    """The block moved from README.md to docs/benchmarks.md (issue 31): the default target is that page, and the
    plots it links resolve from docs/."""
    assert report.DOC == common.ROOT / "docs" / "benchmarks.md"
    images = [kwargs["image"] for _, _, kwargs in report.SECTIONS if "image" in kwargs]
    assert images and all((report.DOC.parent / image).resolve().is_file() for image in images)


def test_estimators_times_thresholds_against_bp_and_best_by_budget():
    mezo = {"name": "mezo", "command": "edgezo finetune ", "steps": 40, "points": [
        {"step": 0, "train_seconds": 0.0, "valid_accuracy": 0.79, "valid_loss": 0.5},
        {"step": 20, "train_seconds": 50.0, "valid_accuracy": 0.821, "valid_loss": 0.45},
        {"step": 40, "train_seconds": 130.0, "valid_accuracy": 0.845, "valid_loss": 0.4}]}
    bp = {"name": "bp", "command": "edgezo reference-bp ", "steps": 10, "points": [
        {"step": 0, "train_seconds": 0.0, "valid_accuracy": 0.79, "valid_loss": 0.5},
        {"step": 5, "train_seconds": 10.0, "valid_accuracy": 0.848, "valid_loss": 0.35}]}
    reviews = estimators.TASKS["movie-reviews"].thresholds
    summary = estimators.summarize([mezo, bp], reviews)
    assert summary["mezo"]["steps_to"] == {"0.80": 20, "0.82": 20, "0.84": 40, "0.86": None}
    assert summary["mezo"]["time_over_bp"]["0.84"] == pytest.approx(13.0)
    assert summary["mezo"]["best_by"] == {"60": 0.821, "120": 0.821, "300": None}  # 300 s: the run was shorter
    text = estimators.render({"runs": [mezo, bp], "summary": summary, "machine": MACHINE, "time": "t"})
    assert "| mezo |" in text and "40 / 130 s" in text and "13.0" in text
    mezo["step_seconds"] = {"median": 1.5, "min": 1.4, "max": 1.6, "n": 9}  # timing runs on a quiet machine
    bp["step_seconds"] = {"median": 2.0, "min": 1.9, "max": 2.2, "n": 9}
    timed = estimators.summarize([mezo, bp], reviews)
    assert timed["mezo"]["projected_time_to"]["0.84"] == pytest.approx(60.0)  # 40 steps x 1.5 s
    assert timed["mezo"]["time_over_bp"]["0.84"] == pytest.approx(6.0)  # over BP's 5 steps x 2.0 s


def test_estimators_sets_seed_runs_beside_their_seed_0_run():
    def run(name, losses):
        return {"name": name, "points": [{"step": step, "train_seconds": step * 1.5, "valid_accuracy": 0.9 - loss,
                                          "valid_loss": loss} for step, loss in zip((0, 100, 200, 300), losses)]}

    runs = [run("mezo", (0.48, 0.45, 0.44, 0.30)), run("bp", (0.48, 0.3, 0.3, 0.3)), run("mezo-seed1", (0.48, 0.40, 0.46, 0.4))]
    assert {b: list(s) for b, s in estimators.seed_groups(runs).items()} == {"mezo": [0, 1]}
    text = estimators.render_seeds(runs, 0.46)
    assert "| mezo | 0 | 0.4500 | 0.4400 | 0.4400 | 0.460 | 200 |" in text  # step 300's 0.30 is past step 200
    assert "| mezo | 1 | 0.4000 | 0.4600 | 0.4000 | 0.500 | 100 |" in text
    assert "mezo 0.4200 (2 seeds)" in text and estimators.render_seeds(runs[:2], 0.46) == ""


def test_estimators_intents_task_writes_its_data_and_reports_its_own_target(tmp_path):
    task = estimators.TASKS["intents"]
    flags = task.data_flags(tmp_path)
    data = Path(flags[flags.index("--data") + 1])
    assert (data / "valid.jsonl").read_text().count("\n") == task.n_valid
    assert flags[flags.index("--template") + 1] == intents_data.TEMPLATE and task.results() == "estimators-intents"
    bp = {"name": "bp", "command": "edgezo reference-bp ", "steps": 10, "points": [
        {"step": 0, "train_seconds": 0.0, "valid_accuracy": 0.3, "valid_loss": 1.3},
        {"step": 5, "train_seconds": 10.0, "valid_accuracy": 0.92, "valid_loss": 0.3}]}
    summary = estimators.summarize([bp], task.thresholds)
    assert summary["bp"]["steps_to"] == {"0.50": 5, "0.70": 5, "0.90": 5, "0.95": None}
    text = estimators.render({"task": "intents", "runs": [bp], "summary": summary, "machine": MACHINE, "time": "t"})
    assert "90%: time / BP's" in text and "intents" in text and "200 examples" in text


def test_kernels_render_shows_ratios_and_whether_logits_matched():
    seconds = {"median": 1.0, "min": 0.9, "max": 1.2, "n": 3}
    quant = {"quant": "q4_0", "weight_buffers_mib": [{"CPU_REPACK": 57.0}] * 3, "seconds": [seconds] * 3,
             "guarded_equals_default": True, "guarded_over_default": 1.01, "no_extras_over_default": 1.4}
    text = kernels.render({"quants": [quant], "rounds": 2, "repeats": 3, "machine": MACHINE, "time": "t"})
    assert "1.010" in text and "1.400" in text and "bit-identical to llama.cpp's choice: yes" in text


def test_prefix_reuse_times_every_part_of_both_paths_on_a_real_engine(tmp_path, sentiment_dir):
    from tests.tiny_model import TinyLlama, write_tiny_llama

    from edgezo.adapter import read_base_model_info
    from edgezo.data import build_examples, build_task, read_jsonl
    from edgezo.engine import Vocabulary

    model = tmp_path / "tiny4.gguf"
    write_tiny_llama(model, TinyLlama(n_layers=4))
    rows = read_jsonl(sentiment_dir / "train.jsonl")
    with Vocabulary(model) as vocab:
        task = build_task(rows, sentiment_dir / "train.jsonl", vocab, None, None)
        batch = build_examples(rows[:4], sentiment_dir / "train.jsonl", task, vocab, 64)
    args = prefix_reuse.parse_args(["--batch-size", "4", "--repeats", "2", "--threads", "1"])
    row = prefix_reuse.measure_k(args, model, read_base_model_info(model), task, batch, 1)
    assert (row["first_block"], row["prefix_ideal"], row["eval_ideal"]) == (3, 0.75, 0.25)
    assert row["step_speedup_ideal"] == pytest.approx(2 / 1.25)
    assert all(row["seconds"][k]["n"] == 2 and row["seconds"][k]["median"] > 0 for k in ("forward", "prefix", "eval",
                                                                                     "step_full", "step_split"))
    result = {"rows": [row], "target_eval_over_ideal": 1.15, "model": "tiny", "quant": "f32", "batch_size": 4,
              "n_tokens": 20, "repeats": 2, "threads": 1, "seed": 0, "machine": common.machine_info(), "time": "t"}
    assert "top 1 of 4 (split at block 3)" in prefix_reuse.render(result)


def test_layer_gradients_weighs_energy_density_against_the_step_cost():
    assert layer_gradients.step_cost(0, 30) == 2.0 and layer_gradients.step_cost(0, 6) == 2.0  # no prefix to reuse
    assert layer_gradients.step_cost(24, 30) == pytest.approx((24 + 12) / 30)
    rows = layer_gradients.summarize([{"name": "all", "layers": [0, 30], "energy": 1.0},
                                      {"name": "bottom6", "layers": [0, 6], "energy": 0.6},
                                      {"name": "top6", "layers": [24, 30], "energy": 0.06}])
    by = {r["name"]: r for r in rows}
    assert by["bottom6"]["density_vs_all"] == pytest.approx(3.0)
    assert by["bottom6"]["progress_per_second_vs_all"] == pytest.approx(3.0)
    assert by["top6"]["progress_per_second_vs_all"] == pytest.approx(0.3 * 2 / 1.2)
    assert layer_gradients.statistics_se([1.0, 1.0, 1.0]) == 0.0


def test_gradient_noise_statistics_of_two_examples_are_exact():
    import numpy as np

    a, b = np.array([1.0, 2.0, 0.0]), np.array([3.0, -1.0, 2.0])
    noise = gradient_noise.noise_of(np.stack([a, b]))
    assert noise.signal == pytest.approx(a @ b)  # |mean|^2 - tr(Sigma)/2 = a.b: unbiased for |G|^2
    assert noise.energy == pytest.approx((a @ a + b @ b) / 2)
    assert noise.spread == pytest.approx((a - b) @ (a - b) / 2)
    same = gradient_noise.noise_of(np.stack([a, a, a]))  # no noise: all of the energy is signal
    assert same.rho == pytest.approx(1.0) and same.noise_scale == pytest.approx(0.0)
    assert same.progress(16) == pytest.approx(1.0) and same.best_rate(16) == pytest.approx(1 / (a @ a))
    assert same.gain(0.5, 16) == pytest.approx(0.5 * 5 - 0.125 * 5 * 5)  # lr |G|^2 - lr^2/2 T E|g_B|^2
    with pytest.raises(ValueError):
        gradient_noise.noise_of(a[None])


def test_gradient_noise_curvature_probe_measures_z_hz_and_restores_the_adapter():
    torch = pytest.importorskip("torch")

    class Quadratic(gradient_noise.Setup):  # loss = sum_j h_j x_j^2 / 2 over the k/v B tensors: z'Hz exactly
        def lora_b(self):
            return [("m.layers.0.self_attn.k_proj.lora_B.w", self.model[0]),
                    ("m.layers.0.mlp.up_proj.lora_B.w", self.model[1])]  # not a default target: never perturbed

        def loss(self, batch):
            return float((self.task * self.model[0].double() ** 2).sum() / 2 + self.model[1].double().sum())

    x = torch.tensor([0.5, -1.0, 2.0])
    setup = Quadratic(model=[x.clone(), torch.ones(2)], scorer=None, task=torch.tensor([1.0, 4.0, 10.0],
                      dtype=torch.float64), examples=list(range(64)))
    values = gradient_noise.curvature_along_directions(setup, batches=2, directions=3, eps=0.1, seed=0)
    generator = torch.Generator().manual_seed(0)
    expected = [float((setup.task * torch.randn(3, generator=generator).double() ** 2).sum()) for _ in range(6)]
    assert values == pytest.approx(expected, rel=1e-3)
    assert torch.equal(setup.model[0], x) and torch.equal(setup.model[1], torch.ones(2))


def test_gradient_noise_rows_select_targets_and_ranges_and_render_relative_to_the_default():
    import numpy as np

    rng = np.random.default_rng(0)
    columns, offset = {}, 0
    for target in gradient_noise.TARGETS:
        for block in range(8):
            columns[(target, block)] = np.arange(offset, offset + 3)
            offset += 3
    grads = rng.normal(size=(8, offset)) + 1.0
    result = gradient_noise.measure(grads, columns)
    by = {r["name"]: r for r in result["whole"] + result["ranges"]}
    assert by["default (attn_k,attn_v)"]["n_params"] == 2 * 8 * 3 and by["all targets"]["n_params"] == offset
    assert by["attn_v 6:8"]["n_params"] == 2 * 3  # the last range stops at the last block
    cols = np.concatenate([columns[("attn_v", b)] for b in (6, 7)])
    assert by["attn_v 6:8"]["signal"] == pytest.approx(gradient_noise.noise_of(grads[:, cols]).signal)
    result |= {"model": "m", "task": "movie-reviews", "n_examples": 8, "seed": 0, "seconds": 1.0, "machine": MACHINE,
               "time": "t", "curvature": {"eps": 0.03, "batches": 2, "directions": 2, "values": [1.0, 3.0, 10.0, 14.0]}}
    text = gradient_noise.render(result)
    assert "tr(H) = 7 ± 3" in text and "(per batch 2, 12)" in text
    assert "| default (attn_k,attn_v) | 48 |" in text and "**1.00**" in text and "| 6:8 |" in text


def test_intents_data_is_fixed_balanced_and_tests_unseen_phrasings(tmp_path):
    first, again = intents_data.build(), intents_data.build()
    assert first == again and {k: len(v) for k, v in first.items()} == intents_data.N
    assert {r["label"] for r in first["train"]} == set(intents_data.LABELS.values())
    train_texts = {r["text"] for r in first["train"]}
    assert not train_texts & {r["text"] for r in first["test"]}  # test templates are never trained on
    intents_data.write(tmp_path)
    assert (tmp_path / "valid.jsonl").read_text().count("\n") == intents_data.N["valid"]


def test_generative_compares_step_costs_and_test_gains_over_zero_shot(tmp_path):
    def tested(exact_seen, exact_unseen):
        return {kind: {"exact_match": e, "json_valid": 0.5, "name_accuracy": 0.5, "argument_accuracy": 0.25, "loss": 1.0,
                       "n_examples": 80, "seconds": 9.0} for kind, e in (("seen", exact_seen), ("unseen", exact_unseen))}

    def trained(name, median, flat):
        return {"name": name, "command": "edgezo finetune", "steps": 10, "train_seconds": 100.0, "flat_step_fraction": flat,
                "step_seconds": {"median": median, "min": median, "max": median, "n": 9},
                "curve": [{"step": 0, "valid_loss": 2.0, "valid_exact_match": 0.0},
                          {"step": 10, "valid_loss": 1.5, "valid_exact_match": 0.25}]}

    runs = [{"name": "zero-shot", "test": tested(0.1, 0.05)},
            {**trained("mezo-nll", 10.0, 0.0), "test": tested(0.2, 0.05)},
            {**trained("mezo-reward", 12.5, 0.75), "test": tested(0.1, 0.0)}]
    summary = generative.summarize(runs)
    assert summary["reward_step_over_nll_step"] == pytest.approx(1.25)
    assert summary["exact_match_gain"]["mezo-nll"] == pytest.approx({"seen": 0.1, "unseen": 0.0})
    assert summary["exact_match_gain"]["mezo-reward"] == pytest.approx({"seen": 0.0, "unseen": -0.05})
    text = generative.render({"runs": runs, "summary": summary, "machine": MACHINE, "time": "t"})
    assert "costs 1.25x a step on the NLL" in text and "2.000 -> 1.500" in text and "0.75" in text


def test_work_dir_is_created_and_a_file_is_refused(tmp_path):
    assert common.work_dir(str(tmp_path / "a" / "b")).is_dir()
    (tmp_path / "f").write_text("")
    with pytest.raises(argparse.ArgumentTypeError, match="not a directory"):
        common.work_dir(str(tmp_path / "f"))


def test_run_main_turns_errors_into_one_line_and_exit_codes(capsys, tmp_path):
    def child_failed():
        raise common.ChildFailed("edgezo finetune failed (exit 1)")

    assert common.run_main(child_failed) == 1
    assert common.run_main(lambda: open(tmp_path / "missing")) == 1
    assert common.run_main(lambda: None) == 0 and common.run_main(lambda: 3) == 3
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].endswith("error: edgezo finetune failed (exit 1)") and "missing" in lines[1]


# ---- busy ----------------------------------------------------------------------------------------------------
def busy_cell(setting, load, step_s, background=0.0):
    stats = {w: common.summary([step_s]) for w in busy.WORKLOADS}
    return {"setting": setting, "load": load, "threads": 2, **stats, "threads_end": 1, "openmp": {},
            "background_busy_cores": background}


def test_busy_ratios_are_over_the_same_settings_idle_and_the_table_shows_them():
    cells = [busy_cell("default", "idle", 1.5), busy_cell("default", "normal-1", 2.7),
             busy_cell("threads-all", "idle", 1.6), busy_cell("threads-all", "normal-1", 32.0),
             busy_cell("default", "nice19-1", 3.0, background=0.9)]
    ratios = busy.ratios(cells)
    assert ratios["default"]["normal-1"]["mezo_step"] == pytest.approx(1.8)
    assert ratios["threads-all"]["normal-1"]["validation"] == pytest.approx(20.0)
    text = busy.render({"cells": cells, "ratios": ratios, "model": "smollm2-135m", "quant": "q4_0", "batch_size": 16,
                        "seed": 0, "steps": 4, "repeats": 2, "machine": MACHINE, "time": "t"})
    assert "| normal-1 | 2.700 (1.80x) | 32.000 (20.00x) |" in text
    assert "| nice19-1 | 3.000 (2.00x) (busy before) |  |" in text  # something else ran before that cell


def test_busy_always_measures_idle_and_refuses_unknown_names():
    assert busy.parse_args(["--loads", "normal-1"]).loads == ["idle", "normal-1"]
    with pytest.raises(SystemExit):
        busy.parse_args(["--settings", "threads-7"])


def _robustness_cell(arm: str, final: float, best_valid: float, n: int = 400) -> dict:
    evaluation = {"accuracy": final, "n_examples": n}
    return {"model": "m", "task": "movie-reviews", "arm": arm, "seed": 0, "final": final, "last": final,
            "final_eval": evaluation, "valid_curve": [(0, 0.5), (100, best_valid)], "best_valid": best_valid,
            "rollbacks": 0}


def test_robustness_gains_only_where_the_oracle_gained_beyond_noise_and_counts_cells_below_zero_shot():
    from bench import robustness

    zero_shot = {"test": 0.70, "test_eval": {"accuracy": 0.70, "n_examples": 400}}
    headroom = {"zero_shot": {"m/movie-reviews": zero_shot}, "cells": [
        _robustness_cell("fixed-1e-3", 0.80, 0.82), _robustness_cell("auto", 0.75, 0.80),
        _robustness_cell("auto-step-0.25", 0.60, 0.70)]}
    summary = robustness.summarize(headroom)
    row = summary["rows"][0]
    assert row["oracle"]["arm"] == "fixed-1e-3" and row["oracle"]["headroom"]
    assert row["auto"]["gain"] == pytest.approx(0.5)
    assert row["auto"]["gain_se"] == pytest.approx(math.hypot(math.sqrt(.75 * .25 / 400), math.sqrt(.7 * .3 / 400)) / 0.1)
    assert summary["overall"]["auto-step-0.25"]["below_zero_shot"] == 1
    assert summary["overall"]["auto-step-0.25"]["below_by_2_se"] == 1  # 10 points on 400 is > 2 standard errors
    # an oracle 2 points above zero-shot on 400 examples is within noise: no normalised gains at all
    noise = {"zero_shot": {"m/movie-reviews": zero_shot}, "cells": [
        _robustness_cell("fixed-1e-3", 0.72, 0.82), _robustness_cell("auto", 0.69, 0.80)]}
    summary = robustness.summarize(noise)
    assert not summary["rows"][0]["oracle"]["headroom"] and "gain" not in summary["rows"][0]["auto"]
    assert summary["overall"]["auto"]["median_gain"] is None
    assert (summary["overall"]["auto"]["below_zero_shot"], summary["overall"]["auto"]["below_by_2_se"]) == (1, 0)
