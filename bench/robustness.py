"""Does a fine-tune work without tuning? The matrix of models x tasks x step-size arms, scored on the test split.

    python -m bench.robustness --work runs/robustness                          # the whole matrix (days on 2 cores)
    python -m bench.robustness --work runs/robustness --models smollm2-135m --tasks movie-reviews,intents \
        --arms fixed-1e-3,auto --seeds 0                                       # a slice; cells already done are kept

Each cell (model, task, arm, seed) is one `edgezo finetune` in a fresh process with the same forward-pass budget
(--steps, batch 16, validation every --eval-every steps on --n-valid examples), resumed if a previous invocation
was cut short, then `edgezo eval` of the adapter it left (adapter.gguf) and of its last step (adapter.last.gguf) on
the first --test-limit test examples. Zero-shot is the base model on the same examples. Arms:

    fixed-1e-3           today's constant rate; "today" scores its last adapter (what adapter.gguf used to be)
    auto                 the new default: --learning-rate auto, rollbacks, the best validated adapter
    auto-no-rollback     the default minus its rollbacks
    auto-no-clip         the default minus its trust region (a step's |g| is not capped at 3 running RMS)
    auto-step-0.25       the auto rate with a 2.5x longer step than the default's (0.1 probe radii)
    fixed-1e-3-rollback  the default minus its normalised rate (today's rate, with rollbacks and selection)
    oracle-LR            a fixed rate with cosine decay; the oracle is the best of these and fixed-1e-3 on validation

Figures: cells whose adapter is below zero-shot on test (goal 0); normalised gain (final - zero-shot) / (oracle -
zero-shot), median (goal >= 0.9) and minimum (goal >= 0.7); forward passes until validation first reaches 90 % of
the oracle's validated gain; rollbacks. Classification is scored on accuracy, the language-model task tool-calls on
minus its loss (per token NLL).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import common, intents_data, parity_data
from edgezo.rundir import RunDir

NAME = "robustness"
TITLE = "Fine-tuning without tuning: final adapter against zero-shot and a tuned oracle, on the test split"
MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
ORACLE_RATES = ("1e-4", "3e-4", "1e-3", "3e-3")
ARMS = {"fixed-1e-3": ["--learning-rate", "1e-3"], "auto": [], "auto-no-rollback": ["--no-rollback"],
        "auto-no-clip": ["--auto-clip", "0"],
        "auto-step-0.25": ["--auto-step", "0.25"],
        "fixed-1e-3-rollback": ["--learning-rate", "1e-3", "--rollback"],
        **{f"oracle-{lr}": ["--learning-rate", lr, "--schedule", "cosine"] for lr in ORACLE_RATES}}
BATCH = 16
FORWARDS_PER_STEP = 2  # MeZO: the + and the - evaluation
# A normalised gain divides by the oracle's gain over zero-shot: where that is within the test split's noise (a task
# no rate learned to generalise, or a model already at its ceiling) the ratio is noise over noise, and the cell is
# left out of the gain figures (it still counts for "below zero-shot"). The same margin marks a cell as below
# zero-shot beyond noise.
NOISE_STANDARD_ERRORS = 2.0


@dataclass(frozen=True)
class BenchTask:
    name: str
    language_model: bool = False  # scored on minus the loss, not accuracy

    def data_flags(self, work: Path) -> list[str]:
        if self.name == "intents":
            return ["--data", str(intents_data.write(work / "data" / "intents")), "--template", intents_data.TEMPLATE]
        if self.name == "parity":
            return ["--data", str(parity_data.write(work / "data" / "parity")), "--template", parity_data.TEMPLATE]
        return ["--data", self.name]

    def score(self, evaluation: dict) -> float:
        return -evaluation["loss"] if self.language_model else evaluation["accuracy"]

    def valid_score(self, event: dict) -> float:
        return -event["valid_loss"] if self.language_model else event["valid_accuracy"]


TASKS = {t.name: t for t in (BenchTask("movie-reviews"), BenchTask("intents"), BenchTask("boolq"),
                             BenchTask("tool-calls", language_model=True), BenchTask("parity"))}


def edgezo_json(argv: list[str], what: str) -> dict:
    return common.run_json([sys.executable, "-m", "edgezo.cli", *argv, "--json"], what, timeout=12 * 3600)


def cached_json(path: Path, argv: list[str], what: str) -> dict:
    """edgezo's JSON result, computed once: kept in `path` so an interrupted matrix continues where it stopped."""
    if not path.exists():
        path.write_text(json.dumps(edgezo_json(argv, what)))
    return json.loads(path.read_text())


def cell_dir(work: Path, model: str, task: BenchTask, arm: str, seed: int) -> Path:
    return work / model / task.name / f"{arm}-seed{seed}"


def finished(work: Path, model: str, task: BenchTask, arm: str, seed: int) -> bool:
    """The cell was trained and scored (--collect publishes only these)."""
    out = cell_dir(work, model, task, arm, seed)
    return (out / "test.json").exists() and (out / "test-last.json").exists()


def run_cell(work: Path, model: str, task: BenchTask, arm: str, seed: int, args) -> dict:
    out = cell_dir(work, model, task, arm, seed)
    what = f"{model} {task.name} {arm} seed {seed}"
    flags = ["--model", model, *task.data_flags(work), "--threads", str(args.threads)]
    if not (out / "adapter.gguf").exists():
        argv = ["finetune", *flags, "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                "--n-valid", str(args.n_valid), "--batch-size", str(BATCH), "--seed", str(seed), "--out", str(out),
                *ARMS[arm]]
        print(f"== {what}", file=sys.stderr, flush=True)
        edgezo_json(argv + (["--resume"] if (out / "state.json").exists() else []), what)
    test = ["eval", *flags, "--split", "test", "--limit", str(args.test_limit)]
    final = cached_json(out / "test.json", [*test, "--adapter", str(out)], f"{what}: test")
    last = cached_json(out / "test-last.json", [*test, "--adapter", f"{out}:last"], f"{what}: test of the last")
    events = RunDir(out).events()
    valid = [e for e in events if "valid_loss" in e]
    best = max(valid, key=task.valid_score)
    return {"model": model, "task": task.name, "arm": arm, "seed": seed, "steps": args.steps,
            "final": task.score(final), "last": task.score(last), "final_eval": final, "last_eval": last,
            "valid_curve": [(e["step"], task.valid_score(e)) for e in valid], "best_valid": task.valid_score(best),
            "rollbacks": sum(1 for e in events if "rollback_to" in e),
            "train_seconds": max((e.get("train_seconds", 0.0) for e in events), default=0.0)}


def zero_shot(work: Path, model: str, task: BenchTask, args) -> dict:
    directory = work / model / task.name
    directory.mkdir(parents=True, exist_ok=True)
    flags = ["--model", model, *task.data_flags(work), "--threads", str(args.threads), "--limit", str(args.test_limit)]
    test = cached_json(directory / "zero-shot-test.json", ["eval", *flags, "--split", "test"], f"{model} {task.name} zero-shot")
    return {"test": task.score(test), "test_eval": test}


# ---- the figures ----
def oracle(cells: list[dict]) -> dict | None:
    """The fixed-rate cell (oracle-* and today's fixed-1e-3) with the best validation (the test split is not looked
    at to choose): the best of the rates that were run."""
    grid = [c for c in cells if c["arm"].startswith("oracle-") or c["arm"] == "fixed-1e-3"]
    return max(grid, key=lambda c: c["best_valid"]) if grid else None


def passes_to(cell: dict, start: float, target_gain: float) -> int | None:
    """Forward passes (training only) until validation first reaches start + target_gain."""
    for step, score in cell["valid_curve"]:
        if score - start >= target_gain:
            return step * FORWARDS_PER_STEP * BATCH
    return None


def test_standard_error(cell_eval: dict, language_model: bool) -> float:
    """Standard error of a test score: of a proportion for accuracy, of the mean per-example loss for LM data (its
    eval does not keep per-example losses, so this is 0 and the gain's error is not shown)."""
    if language_model:
        return 0.0
    p, n = cell_eval["accuracy"], cell_eval["n_examples"]
    return math.sqrt(p * (1 - p) / n)


def summarize(result: dict) -> dict:
    """Per (model, task, seed): each arm's final against zero-shot and the oracle; over all: the goals' figures."""
    rows, gains, below = [], {}, {}
    groups: dict[tuple, list[dict]] = {}
    for cell in result["cells"]:
        groups.setdefault((cell["model"], cell["task"], cell["seed"]), []).append(cell)
    for (model, task, seed), cells in sorted(groups.items()):
        zs = result["zero_shot"][f"{model}/{task}"]["test"]
        lm = TASKS[task].language_model
        zs_se = test_standard_error(result["zero_shot"][f"{model}/{task}"]["test_eval"], lm)
        best = oracle(cells)
        valid_start = cells[0]["valid_curve"][0][1]
        def difference_se(cell: dict) -> float:  # of the cell's test score minus zero-shot's
            return math.hypot(test_standard_error(cell["final_eval"], lm), zs_se)

        headroom = best and best["final"] - zs > NOISE_STANDARD_ERRORS * difference_se(best)
        row = {"model": model, "task": task, "seed": seed, "zero_shot": zs,
               "oracle": best and {"arm": best["arm"], "test": best["final"], "headroom": headroom}}
        for cell in cells:
            arm = cell["arm"]
            entry = {"final": cell["final"], "last": cell["last"], "rollbacks": cell["rollbacks"]}
            if headroom:
                entry["gain"] = (cell["final"] - zs) / (best["final"] - zs)
                # the noise of the two test scores in the numerator (the oracle's own noise left out: a lower bound)
                entry["gain_se"] = difference_se(cell) / abs(best["final"] - zs)
                gains.setdefault(arm, []).append(entry["gain"])
            if best:
                entry["passes_to_90"] = passes_to(cell, valid_start, 0.9 * (best["best_valid"] - valid_start))
            below.setdefault(arm, [0, 0, 0])
            below[arm][0] += cell["final"] < zs
            below[arm][1] += zs - cell["final"] > NOISE_STANDARD_ERRORS * difference_se(cell)
            below[arm][2] += 1
            row[arm] = entry
        rows.append(row)
    overall = {arm: {"below_zero_shot": b[0], "below_by_2_se": b[1], "cells": b[2],
                     "median_gain": statistics.median(gains[arm]) if gains.get(arm) else None,
                     "min_gain": min(gains[arm]) if gains.get(arm) else None} for arm, b in below.items()}
    # today: the fixed rate's last adapter (what adapter.gguf was before the best validated one was kept)
    today = [c for c in result["cells"] if c["arm"] == "fixed-1e-3"]
    overall["today (fixed-1e-3, last adapter)"] = {
        "below_zero_shot": sum(c["last"] < result["zero_shot"][f"{c['model']}/{c['task']}"]["test"] for c in today),
        "cells": len(today)}
    return {"rows": rows, "overall": overall}


def below_text(overall: dict) -> str:
    text = f"{overall['below_zero_shot']} of {overall['cells']}"
    return text + (f" ({overall['below_by_2_se']} by > {NOISE_STANDARD_ERRORS:g} s.e.)" if overall.get("below_by_2_se") else "")


def render(result: dict) -> str:
    summary = summarize(result)
    arms = [a for a in ARMS if any(a in row for row in summary["rows"])]
    header = ["model", "task", "seed", "zero-shot", "today (1e-3, last)", *arms, "oracle"]
    rows = []
    for row in summary["rows"]:
        today = row.get("fixed-1e-3", {}).get("last")
        cells = []
        for arm in arms:
            entry = row.get(arm)
            if entry is None:
                cells.append("")
                continue
            gain = ""
            if "gain" in entry:
                gain = f", gain {entry['gain']:.2f}" + (f" ± {entry['gain_se']:.2f}" if entry["gain_se"] else "")
            rb = f", {entry['rollbacks']} rb" if entry["rollbacks"] else ""
            cells.append(f"{entry['final']:.3f}{gain}{rb}")
        oracle_text = "not run"
        if row["oracle"]:
            oracle_text = f"{row['oracle']['test']:.3f} ({row['oracle']['arm']})"
            oracle_text += "" if row["oracle"]["headroom"] else ", no gain beyond noise"
        rows.append([row["model"], row["task"], row["seed"], f"{row['zero_shot']:.3f}",
                     "" if today is None else f"{today:.3f}", *cells, oracle_text])
    overall = [[arm, below_text(o), common.fmt(o.get("median_gain"), 2), common.fmt(o.get("min_gain"), 2)]
               for arm, o in summary["overall"].items()]
    return (common.table(header, rows) + "\n"
            + common.table(["arm", "cells below zero-shot", "median normalised gain", "minimum"], overall)
            + f"\nTest accuracy (tool-calls: minus the per-token NLL) of the adapter each run left (adapter.gguf), on "
            f"the first {result['test_limit']} test examples; rb: rollbacks; ± one standard error of the gain from the "
            f"sampling noise of the two test scores (the oracle's own left out); where the oracle gained no more than "
            f"{NOISE_STANDARD_ERRORS:g} standard errors over zero-shot no gain is computed. {result['steps']} steps of "
            f"batch {BATCH} per cell, validation every {result['eval_every']} steps on {result['n_valid']} examples, Q4_0.\n\n"
            + common.provenance(result) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=common.work_dir, required=True, help="directory of the runs (reused to continue)")
    p.add_argument("--models", default=",".join(MODELS), help="[%(default)s]")
    p.add_argument("--tasks", default="movie-reviews,intents,boolq,tool-calls",
                   help=f"of {', '.join(TASKS)} [%(default)s]")
    p.add_argument("--arms", default=",".join(ARMS), help="[%(default)s]")
    p.add_argument("--seeds", default="0", help="comma-separated [%(default)s]")
    p.add_argument("--steps", type=int, default=200, help="[%(default)s]")
    p.add_argument("--eval-every", type=int, default=50, help="[%(default)s]")
    p.add_argument("--n-valid", type=int, default=300, help="[%(default)s]")
    p.add_argument("--test-limit", type=int, default=500, help="[%(default)s]")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--collect", action="store_true",
                   help="run nothing: publish the cells of the selection that are finished and scored")
    p.add_argument("--tag", help="publish to results/robustness-TAG")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    models, tasks, arms = args.models.split(","), args.tasks.split(","), args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS] + [t for t in tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown arm(s) or task(s): {', '.join(unknown)}")
    result = {"benchmark": NAME, "time": common.utc_now(), "machine": common.machine_info(), "steps": args.steps,
              "eval_every": args.eval_every, "n_valid": args.n_valid, "test_limit": args.test_limit,
              "zero_shot": {}, "cells": []}
    for model in models:
        for task in map(TASKS.get, tasks):
            cells = [(seed, arm) for seed in map(int, args.seeds.split(",")) for arm in arms
                     if not args.collect or finished(args.work, model, task, arm, seed)]
            if not cells:
                continue
            result["zero_shot"][f"{model}/{task.name}"] = zero_shot(args.work, model, task, args)
            for seed, arm in cells:
                result["cells"].append(run_cell(args.work, model, task, arm, seed, args))
    result["load_average_end"] = common.load_average()
    common.publish(f"{NAME}-{args.tag}" if args.tag else NAME, TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
