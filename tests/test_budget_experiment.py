"""Issue 33's harness (bench/budget_cells.py, bench/budget_experiment.py): budgets from the accountant, cells, the CPU
cut, milestones, the wall-clock accounting rule, the rate choice and the resume bookkeeping of pieces."""

import json
import shutil
from pathlib import Path

import pytest

from bench import budget_cells as bc
from bench import budget_experiment as be

MiB = 2**20
S, G, Q5, Q15 = "smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"
# task -> model -> predicted peak (lean BP, MeZO), shaped like the real ones
PRED = {S: {"mezo": 350 * MiB, "bp": 700 * MiB}, G: {"mezo": 500 * MiB, "bp": 1250 * MiB},
        Q5: {"mezo": 740 * MiB, "bp": 1600 * MiB}, Q15: {"mezo": 2000 * MiB, "bp": 2800 * MiB}}
PHONES = {"android-4gb": 1536 * MiB, "raspberry-pi-5-4gb": 3584 * MiB}


def test_the_separating_budget_is_midway_between_lean_bp_on_the_two_qwen_models_and_fits_mezo_on_the_larger():
    assert bc.separating_budget(PRED) == 2200 * MiB
    with pytest.raises(ValueError, match="does not fit midway"):  # MeZO on 1.5B above the midpoint
        bc.separating_budget({**PRED, Q15: {"mezo": 2250 * MiB, "bp": 2800 * MiB}})
    with pytest.raises(ValueError, match="is not below"):
        bc.separating_budget({**PRED, Q5: {"mezo": 740 * MiB, "bp": 2900 * MiB}})


def test_the_phone_budget_is_the_first_profile_where_mezo_fits_a_larger_model_than_bp():
    task = bc.TASKS["boolq-long"]
    assert bc.phone_budget(PRED, PHONES, task) == ("android-4gb", 1536 * MiB)  # MeZO 0.5B, BP gemma excluded: smollm
    both_fit_the_same = {**PRED, Q5: {"mezo": 740 * MiB, "bp": 1400 * MiB}, Q15: {"mezo": 2000 * MiB, "bp": 3700 * MiB}}
    assert bc.phone_budget(both_fit_the_same, PHONES, task) == ("raspberry-pi-5-4gb", 3584 * MiB)  # 1.5B vs 0.5B
    no_gap = {**both_fit_the_same, Q15: {"mezo": 2000 * MiB, "bp": 2800 * MiB}}  # BP fits 1.5B on the Pi too
    assert bc.phone_budget(no_gap, PHONES, task) == ("android-4gb", 1536 * MiB)  # no gap anywhere: the tightest
    with pytest.raises(ValueError, match="MeZO fits no model"):
        bc.phone_budget({m: {"mezo": 9999 * MiB, "bp": 9999 * MiB} for m in PRED}, PHONES, task)


def test_cells_take_the_largest_model_each_method_fits_and_say_when_there_is_no_budget():
    specs = [bc.CellSpec("boolq-long", "phone", ""), bc.CellSpec("boolq", "separate", ""),
             bc.CellSpec("movie-reviews", "separate", "")]
    bad = {**PRED, Q15: {"mezo": 2250 * MiB, "bp": 2800 * MiB}}
    cells = bc.plan_cells(specs, {"boolq-long": PRED, "boolq": PRED, "movie-reviews": bad}, PHONES)
    phone, boolq, movies = cells
    assert [(a.method, a.model) for a in phone.arms] == [("bp", S), ("mezo", Q5)]  # gemma is not a long-context BP
    assert phone.budget_bytes == 1536 * MiB and "android-4gb" in phone.budget_source
    assert [(a.method, a.model, a.rates) for a in boolq.arms] == [("bp", Q5, bc.BP_RATES), ("mezo", Q15, ("auto",))]
    assert boolq.arms[1].predicted_bytes == 2000 * MiB and boolq.arms[0].budget_bytes == 2200 * MiB
    assert movies.arms == [] and movies.note.startswith("no budget")


def test_the_cpu_cut_keeps_cells_in_order_within_the_hours_and_counts_zero_shot_once_per_task():
    specs = [bc.CellSpec("boolq-long", "phone", ""), bc.CellSpec("boolq", "separate", ""),
             bc.CellSpec("boolq-long", "separate", "")]
    cells = bc.plan_cells(specs, {"boolq-long": PRED, "boolq": PRED}, PHONES)
    _, _, rows = bc.cut_to_budget(cells, cpu_hours=100)
    two_cells = (rows[0]["cost"] + rows[1]["cost"]) / bc.HOUR
    kept, cut, rows = bc.cut_to_budget(cells, cpu_hours=two_cells + 0.01)
    assert [c.spec for c in kept] == specs[:2] and [c.spec for c in cut] == specs[2:]
    valid_all = sum(bc.eval_seconds(m, "boolq-long", 100) for m in bc.TASKS["boolq-long"].models)
    assert rows[2]["zero_shot"] == pytest.approx(bc.eval_seconds(Q15, "boolq-long", 300))  # only 1.5B's test is new
    assert rows[0]["zero_shot"] == pytest.approx(valid_all + sum(bc.eval_seconds(m, "boolq-long", 300) for m in (S, Q5)))
    reordered = bc.cut_to_budget([cells[0], cells[2], cells[1]], cpu_hours=two_cells + 0.01)[0]
    assert len(reordered) == 1  # cell 3 does not fit after cell 1, so the cheaper cell after it is cut too
    bp = rows[1]["arms"][cells[1].arms[0].key]
    assert bp["train"] == 7200 + 2 * 900  # 2 h, and the two rates not chosen to the first milestone
    assert rows[1]["cumulative"] == pytest.approx(two_cells * bc.HOUR) and not rows[2]["kept"]
    kept, cut, _ = bc.cut_to_budget(cells, cpu_hours=0.1)
    assert len(kept) == 1  # the most informative cell runs whatever the cap


def test_milestones_are_step_counts_at_the_quiet_median():
    assert bc.milestone_steps(11.3) == [80, 159, 319, 637]
    assert bc.milestone_steps(1.0, max_steps=2000) == [900, 1800, 2000, 2000]  # capped: the last pieces do nothing
    with pytest.raises(ValueError):
        bc.milestone_steps(0.0)


def test_a_piece_that_shared_the_cpu_counts_steps_times_the_quiet_median():
    seconds = {1: 10.0, 2: 10.4, 3: 31.0, 4: 29.0, 5: 9.8, 6: 40.0}
    pieces = [{"first_step": 1, "last_step": 2, "others_busy_cores": 0.1, "median_step_s": 10.2},
              {"first_step": 3, "last_step": 4, "others_busy_cores": 1.6, "median_step_s": 30.0},  # shared
              {"first_step": 5, "last_step": 5, "others_busy_cores": 0.0, "median_step_s": 9.8}]
    clock = bc.account(seconds, pieces, quiet_median_s=10.0)
    assert clock[0] == 0 and clock[2] == pytest.approx(20.4)  # quiet: measured
    assert clock[4] == pytest.approx(40.4)  # shared: 2 steps x 10 s, not 60 s
    assert clock[5] == pytest.approx(50.2)
    assert clock[6] == pytest.approx(60.2)  # step 6 is in no piece (a killed attempt): judged alone, 40 s > 1.25 x 10
    slow_alone = [{"first_step": 1, "last_step": 2, "others_busy_cores": 0.0, "median_step_s": 20.0}]
    assert bc.account({1: 20.0, 2: 20.0}, slow_alone, 10.0)[2] == 20.0  # no load seen, but 2x slower: shared


def test_other_processes_busy_cores_come_from_proc_stat_less_the_piece_own_cpu():
    before = [1000, 0, 500, 9000, 0, 0, 0, 0]
    after = [1000 + 30000, 100, 500 + 2000, 9000, 0, 0, 0, 0]  # 321 s busy (100 ticks/s) over 200 s of wall
    assert bc.others_busy_cores(before, after, own_cpu_s=121.0, wall_s=200.0) == pytest.approx(1.0)
    assert bc.others_busy_cores(before, after, own_cpu_s=400.0, wall_s=200.0) == 0.0


def test_the_rate_is_the_best_validation_at_the_first_milestone():
    v = {1e-4: {"valid_accuracy": 0.80, "valid_loss": 0.45}, 3e-4: {"valid_accuracy": 0.85, "valid_loss": 0.40},
         1e-3: {"valid_accuracy": 0.85, "valid_loss": 0.38}}
    assert bc.choose_rate(v) == 1e-3  # tied on accuracy, lower loss
    assert bc.choose_rate({"auto": v[3e-4], 1e-4: v[3e-4]}) == "auto"  # a full tie: the first listed
    with pytest.raises(ValueError):
        bc.choose_rate({})
    assert bc.choose_rate(v, by_loss=True) == 1e-3 and bc.choose_rate({**v, 1e-4: {**v[1e-4], "valid_loss": 0.3}},
                                                                    by_loss=True) == 1e-4  # loss alone


# ---- pieces and their resume bookkeeping, with the child processes faked ----------------------------------------
def fake_trainer(calls: list, median_s: float = 2.0, valid=lambda rate, step: 0.7, last_step: int = 10**9,
                 loss=lambda rate, step: 0.4):
    """A stand-in for run_watched: writes what edgezo finetune / reference-bp would (metrics, state.json) up to --steps,
    continuing from state.json with --resume and starting over without it."""
    def run(cmd, what):
        calls.append(cmd)
        out, target = Path(cmd[cmd.index("--out") + 1]), min(last_step, int(cmd[cmd.index("--steps") + 1]))
        rate = cmd[cmd.index("--learning-rate") + 1]
        out.mkdir(parents=True, exist_ok=True)
        state = out / "state.json"
        start = json.loads(state.read_text())["step"] if "--resume" in cmd else 0
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if start else []
        if not start:
            lines.append({"step": 0, "valid_accuracy": valid(rate, 0), "valid_loss": 0.5, "train_seconds": 0.0})
        for step in range(start + 1, target + 1):
            lines.append({"step": step, "loss": 0.5, "seconds": median_s, "train_seconds": step * median_s})
        lines.append({"step": target, "valid_accuracy": valid(rate, target), "valid_loss": loss(rate, target),
                      "train_seconds": target * median_s})
        (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        state.write_text(json.dumps({"step": target}))
        return {"wall_s": 1.0, "own_cpu_s": 1.0, "others_busy_cores": 0.0, "load_average": [],
                "peak_rss_bytes": 100 * MiB, "steps": target}
    return run


def tiny_arm(method="bp", rates=(1e-4, 1e-3), model="m"):
    return bc.Arm("boolq", "separate", 1000 * MiB, method, model, 900 * MiB, tuple(rates))


def test_a_piece_resumes_from_the_checkpoint_and_a_finished_one_is_not_rerun(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(be, "run_watched", fake_trainer(calls))
    run = be.Run(tiny_arm(), 1e-4, bc.TASKS["boolq"], tmp_path, 1, tmp_path / "r")
    piece = run.advance(10, 40, 5, 8)
    assert "--resume" not in calls[-1] and piece["first_step"] == 1 and piece["last_step"] == 10
    assert piece["median_step_s"] == 2.0 and "--max-memory" in calls[-1] and "--release-freed-memory" in calls[-1]
    assert run.advance(10, 40, 5, 8) is None and len(calls) == 1  # already there: nothing runs
    second = run.advance(20, 40, 5, 8)
    assert calls[-1][-1] == "--resume" and (second["first_step"], second["last_step"]) == (11, 20)
    assert [p["last_step"] for p in run.pieces()] == [10, 20]
    killed = be.Run(tiny_arm(), 1e-3, bc.TASKS["boolq"], tmp_path, 1, tmp_path / "k")
    killed.dir.mkdir()
    (killed.dir / "metrics.jsonl").write_text('{"step": 0}\n')  # killed before its first checkpoint
    killed.advance(5, 40, 5, 8)
    assert "--resume" not in calls[-1] and killed.step() == 5


def test_a_run_the_trainer_ended_early_is_finished_and_not_restarted(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(be, "run_watched", fake_trainer(calls, last_step=7))  # e.g. 5 rollbacks at step 7
    run = be.Run(tiny_arm(), 1e-4, bc.TASKS["boolq"], tmp_path, 1, tmp_path / "r")
    assert run.advance(10, 40, 5, 8)["last_step"] == 7 and run.finished(10)
    assert run.advance(20, 40, 5, 8) is None and len(calls) == 1 and run.finished(20)


def test_an_arm_trains_every_rate_to_the_first_milestone_then_only_the_chosen_one(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(be, "run_watched", fake_trainer(calls, valid=lambda rate, step: 0.9 if rate == "0.001" and step
                                                         else 0.7))
    runner = be.ArmRunner(tiny_arm(), bc.TASKS["boolq"], tmp_path, 1, milestones=(20.0, 40.0))
    assert runner.steps() == [10, 20] and runner.timing()["quiet"] is True
    n_timing = len(calls)
    runner.advance(0)
    assert [c[c.index("--learning-rate") + 1] for c in calls[n_timing:]] == ["0.0001", "0.001"]
    assert runner.chosen_rate() == 1e-3
    runner.advance(1)
    assert calls[-1][calls[-1].index("--learning-rate") + 1] == "0.001" and len(calls) == n_timing + 3
    monkeypatch.setattr(be, "run_json", lambda cmd, what: calls.append(cmd) or
                        {"accuracy": 0.88, "loss": 0.3, "n_examples": 500, "seconds": 1.0})
    assert "test" not in runner.collect(test=False)["runs"]["0.001"]  # --collect scores nothing
    record = runner.collect(test=True)
    chosen = record["runs"]["0.001"]
    n_calls = len(calls)
    assert runner.collect(test=False)["runs"]["0.001"]["test"] == chosen["test"] and len(calls) == n_calls  # shown
    assert [p["step"] for p in chosen["curve"]] == [0, 10, 20] and chosen["curve"][-1]["accounted_s"] == 40.0
    assert chosen["test"]["accuracy"] == 0.88 and chosen["test"]["best_step"] == 10
    assert "--split" in calls[-1] and calls[-1][calls[-1].index("--adapter") + 1].endswith("lr-0.001:best")
    assert "test" not in record["runs"]["0.0001"]  # the rate not chosen is never scored on test


def test_the_report_renders_cells_and_the_first_experiment_lines(tmp_path):
    arm = {**vars(tiny_arm()), "key": "k", "chosen_rate": 1e-3, "timing": {"median_step_s": 9.0},
           "milestone_steps": [1, 2, 3, 4],
           "runs": {"0.001": {"curve": [{"step": s, "accounted_s": 9.0 * s, "valid_accuracy": 0.8 + s / 100,
                                         "valid_loss": 0.4} for s in range(5)],
                              "peak_rss_bytes": 950 * MiB, "shared_pieces": 1,
                              "test": {"accuracy": 0.84, "n_examples": 400}}}}
    result = {"format": 2, "seed": 0, "threads": 2, "milestones_s": [900, 1800, 3600, 7200], "time": "t",
              "machine": {}, "zero_shot": {"boolq": {"m": {"test": {"accuracy": 0.7, "n_examples": 400}}}},
              "cells": [{"task": "boolq", "budget": "separate", "budget_bytes": 1000 * MiB, "budget_source": "x",
                         "note": "", "task_spec": vars(bc.TASKS["boolq"]), "arms": [arm],
                         "refusal": {"model": "big", "refused": True, "message": "exceeds the memory budget",
                                     "returncode": 1}}]}
    mezo = {**arm, "method": "mezo", "model": "big", "chosen_rate": "auto",
            "runs": {"auto": {**arm["runs"]["0.001"], "test": {"accuracy": 0.80, "n_examples": 400},
                              "curve": [{**p, "valid_accuracy": p["valid_accuracy"] + 0.02} for p in
                                        arm["runs"]["0.001"]["curve"][:3]]}}}
    result["cells"][0]["arms"].append(mezo)
    text = be.render(result)
    assert "MeZO minus BP, validation accuracy (points): 15 min +2.0, 30 min +2.0." in text  # 1 h: MeZO not there yet
    assert "Test: BP by 4.0 +/- 2.7 points" in text
    assert "| bp | m | 0.001 | 950 MiB (900 MiB) | 9.00 | 0.700 | 0.810 | 0.820 | 0.830 | 0.840 |" in text
    assert "0.840 +/- 0.018 (400)" in text and "refused" in text
    be.plot(result, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 10_000  # drawn from what is finished
    lines = (Path(be.__file__).parent / "results" / "budget_experiment.jsonl").read_text().splitlines()
    legacy = [record for record in map(json.loads, lines) if record.get("format") != 2][-1]
    assert "Budget **" in be.render(legacy)  # a line of the first experiment still renders (bench/report.py)


def test_a_generative_task_scores_held_out_accuracy_by_generation_at_each_milestone(tmp_path, monkeypatch):
    """BFCL (issue 32): the rate is chosen on validation loss, RUN:best is generated on the validation requests at
    each milestone of the chosen run, the curve holds those scores from the zero-shot start, the test the metric."""
    calls = []
    # the lower rate validates better by (token) accuracy, the higher one by loss: chosen by loss
    monkeypatch.setattr(be, "run_watched", fake_trainer(calls, valid=lambda rate, step: 0.9 if rate == "0.0001" else 0.7,
                                                        loss=lambda rate, step: 0.3 if rate == "0.001" else 0.45))
    scores = iter([0.10, 0.25, 0.40])

    def evaluate(cmd, what):
        calls.append(cmd)
        strict = next(scores)
        return {"bfcl_accuracy": strict, "lenient_accuracy": strict + 0.5, "name_accuracy": 0.9,
                "valid_call_rate": strict, "accuracy": 0.99, "loss": 1.0, "n_examples": 50, "seconds": 1.0}

    monkeypatch.setattr(be, "run_json", evaluate)
    task = bc.TASKS["bfcl"]
    be.zero_shot("m", task, "valid", task.n_valid, 1, tmp_path)  # the start: 0.10
    runner = be.ArmRunner(tiny_arm(), task, tmp_path, 1, milestones=(20.0, 40.0))
    runner.advance(0)
    assert runner.chosen_rate() == 1e-3
    heldout = [c for c in calls if "eval" in c and "--adapter" in c]
    assert len(heldout) == 1 and heldout[0][heldout[0].index("--adapter") + 1].endswith("lr-0.001:best")
    assert heldout[0][heldout[0].index("--split") + 1] == "valid" and "50" in heldout[0]
    runner.advance(1)
    runner.advance(1)  # a rerun scores nothing again
    assert len([c for c in calls if "--adapter" in c]) == 2
    curve = runner.collect(test=False)["runs"]["0.001"]["curve"]
    assert [(p["step"], p["valid_accuracy"]) for p in curve] == [(0, 0.10), (10, 0.25), (20, 0.40)]
    assert curve[-1]["accounted_s"] == 40.0 and curve[-1]["valid_loss"] == 0.3
    assert [p["lenient_accuracy"] for p in curve] == [0.6, 0.75, 0.9]  # the format aside, kept at every point
    arm = {**vars(tiny_arm()), "milestone_steps": [10, 20], "chosen_rate": 1e-3, "runs": {"0.001": {"curve": curve}}}
    text = be.also_table({"task_spec": vars(task), "arms": [arm]},
                         {"m": {"test": {"lenient_accuracy": 0.55, "name_accuracy": 0.8, "valid_call_rate": 0.0}}})
    assert "| bp | m | lenient_accuracy | 0.550 | 0.750 | 0.900 | - | - | - |" in text
    with pytest.raises(RuntimeError, match="at step 0, not 10"):  # RUN:best has moved on: that score is lost
        be.Run(tiny_arm(), 1e-3, task, tmp_path, 1, tmp_path / "elsewhere").heldout(10)


# ---- a smoke run on the tiny model: real processes, pieces, the rate choice and the test split ------------------
@pytest.mark.parametrize("method, rates", [("bp", (1e-3, 3e-2)), ("mezo", ("auto",))])
def test_an_arm_runs_end_to_end_on_the_tiny_model_and_a_rerun_trains_nothing(method, rates, tiny_gguf, sentiment_dir,
                                                                              tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(bc, "LEAN_BP", ["--release-freed-memory"])  # the tiny model has no Q4_0 file
    monkeypatch.setattr(be.ArmRunner, "steps", lambda self: [2, 4])  # milestones at steps 2 and 4
    task = bc.TaskSpec("tiny", str(sentiment_dir), 4, 64, 8, 8,
                       train_args=("--quant", "none", "--targets", "attn_q,attn_v", "--rank", "4"))
    arm = bc.Arm("tiny", "separate", 4 * 2**30, method, str(tiny_gguf), 0, rates)
    runner = be.ArmRunner(arm, task, tmp_path, 1, timing_retries=0)
    assert runner.timing()["median_step_s"] > 0
    runner.advance(0)
    chosen_dir = runner.run(runner.chosen_rate()).dir
    assert be.save_state(tmp_path, tmp_path / "state.tar.gz") == [chosen_dir]
    shutil.rmtree(chosen_dir)  # a session on another machine: the checkpoint comes back from the state file
    assert be.restore_runs(tmp_path / "state.tar.gz", tmp_path) == [str(chosen_dir.relative_to(tmp_path))]
    assert runner.run(runner.chosen_rate()).step() == 2 and not (chosen_dir / "adapter.best.gguf").exists()
    runner.advance(1)  # resumes from step 2 (edgezo's --resume checks the checkpoint's sha256), then the test split
    record = runner.collect(test=True)
    chosen = record["runs"][str(record["chosen_rate"])]
    assert [p["step"] for p in chosen["curve"]] == [0, 2, 4] and len(chosen["pieces"]) == 2
    assert chosen["test"]["n_examples"] == 8 and chosen["peak_rss_bytes"] > 0
    assert json.loads((runner.run(record["chosen_rate"]).dir / "state.json").read_text())["step"] == 4
    assert len(record["runs"]) == len(rates)  # every rate ran to the first milestone
    runner.advance(1)
    assert len(runner.run(record["chosen_rate"]).pieces()) == 2  # a rerun finds everything done


def test_a_rerun_sees_an_edgezo_process_still_writing_into_its_work_dir(tmp_path):
    import subprocess
    import sys
    import time

    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "edgezo.cli", "finetune",
                               "--out", str(tmp_path / "runs" / "x")])
    try:
        deadline = time.monotonic() + 30  # until the child has exec'ed (a loaded machine is slow to)
        while orphan.pid not in be.running_in(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert orphan.pid in be.running_in(tmp_path) and be.running_in(tmp_path / "other") == []
    finally:
        orphan.kill()
        orphan.wait()
    assert orphan.pid not in be.running_in(tmp_path)


def test_a_new_machine_continues_from_the_published_result_and_the_saved_state(tmp_path, monkeypatch):
    """The work directory is lost between sessions on different machines: the published result gives back the
    zero-shot scores, timing, rate choice and the curves of runs not continued; the state file the chosen run's
    checkpoint, which resumes; without it, the chosen run restarts while its published curve is shown."""
    calls = []
    monkeypatch.setattr(be, "run_watched", fake_trainer(calls, valid=lambda rate, step: 0.9 if rate == "0.001" and step
                                                         else 0.7))
    first = tmp_path / "first"
    runner = be.ArmRunner(tiny_arm(), bc.TASKS["boolq"], first, 1, milestones=(20.0, 40.0))
    runner.advance(0)
    zero = {"accuracy": 0.5, "loss": 0.7, "n_examples": 8, "seconds": 1.0, "command_line": ["eval"]}
    result = {"format": 2, "time": "T", "zero_shot": {"boolq": {"m": {"valid": zero}}},
              "cells": [{"task": "boolq", "budget": "separate", "refusal": None, "arms": [runner.collect(test=False)]}]}
    state = tmp_path / "state.tar.gz"
    assert [r.name for r in be.save_state(first, state)] == ["lr-0.001"]  # the rate not chosen stays out

    def resumed_on(work: Path, with_state: bool) -> be.ArmRunner:
        if with_state:
            assert be.restore_runs(state, work) == ["runs/boolq.separate.bp.m/lr-0.001"]
        be.restore(result, work)
        assert json.loads((work / "zero-shot" / "boolq.m.valid.json").read_text()) == zero
        new = be.ArmRunner(tiny_arm(), bc.TASKS["boolq"], work, 1, milestones=(20.0, 40.0),
                           published=be.published_arms(result)["boolq.separate.bp.m"])
        n = len(calls)
        new.advance(0)
        assert len(calls) == n and new.chosen_rate() == 1e-3  # no timing run, no rate trained again
        shown = new.collect(test=False)["runs"]
        assert shown["0.0001"]["published"] == "T" and [p["step"] for p in shown["0.001"]["curve"]] == [0, 10]
        new.advance(1)
        assert len(calls) == n + (1 if with_state else 2)  # resumed at 10, or again through 10 (validated there)
        assert {c[c.index("--learning-rate") + 1] for c in calls[n:]} == {"0.001"}
        assert ("--resume" in calls[n]) == with_state
        assert [p["step"] for p in new.collect(test=False)["runs"]["0.001"]["curve"]] == [0, 10, 20]
        return new

    resumed_on(tmp_path / "second", with_state=True)
    resumed_on(tmp_path / "third", with_state=False)
    assert be.restore_runs(state, tmp_path / "second") == []  # a run already there is never overwritten
    result["cells"][0]["arms"] = [be.ArmRunner(tiny_arm(), bc.TASKS["boolq"], tmp_path / "second", 1,
                                               milestones=(20.0, 40.0),
                                               published=be.published_arms(result)["boolq.separate.bp.m"])
                                  .collect(test=False)]
    result["cells"][0].update(budget_bytes=1000 * MiB, budget_source="x", note="", task_spec=vars(bc.TASKS["boolq"]))
    result.update(seed=0, threads=1, milestones_s=[900, 1800, 3600, 7200], machine={})
    assert "Carried from an earlier published result" in be.render(result) and "lr 0.0001 (T)" in be.render(result)
