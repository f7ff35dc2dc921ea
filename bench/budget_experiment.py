"""The seed paper's experiment, symmetric, with headroom and at long context (issue 33): under a memory budget, MeZO on
the largest model it fits against the lean BP (Q4_0 blocks, checkpointing, freed memory returned) on the largest
model BP fits, each trained 2 h, validated at 15 min, 30 min, 1 h and 2 h of training, scored once on test.

What runs (bench/budget_cells.py holds the rules; `--plan` prints them with the predicted memory and CPU hours):
1. Tasks: movie-reviews, boolq (batch 16, --max-seq-len 256) and boolq-long (bench/long_context_data.py: boolq with
   distractor passages, 513-769 tokens by the Qwen tokenizer on valid / test, batch 4, --max-seq-len 1024); and,
   for issue 32, bfcl (function calling, batch 4, --max-seq-len 768, the Qwen models): a generative task, whose
   runs validate by the call's NLL and whose held-out accuracy (BFCL's AST check of generated calls) is scored at
   each milestone on the adapter chosen so far (the last cell: run it with --cells bfcl.separate).
2. Budgets from the accountant (`edgezo memory` on each run's own batches): per task, midway between lean BP on
   qwen2.5-coder-0.5b and on 1.5b, where MeZO fits 1.5b; and for boolq-long a phone-like profile (android-4gb, else
   raspberry-pi-5-4gb usable RAM). Each arm trains the largest built-in model its method fits. Every run gets
   --max-memory BUDGET (refused if predicted over, stopped if measured over); the larger model's lean BP is shown
   to be refused; measured peak RSS is reported beside the prediction.
3. Symmetric settings: BP's AdamW rate from 1e-4 / 3e-4 / 1e-3 and MeZO's rates (default: `auto` only; give a
   grid with --mezo-rates) each trained to the first milestone, the best validation accuracy there (ties: loss)
   continues to 2 h. Both keep the best validated adapter (the start included): test scores RUN:best.
4. Time: a quiet timing run of each arm (6 steps) gives its median step; the milestones are the step counts that take
   15 / 30 / 60 / 120 min at that median, so a validation falls at the same step whatever the load. Each piece (one
   process to one milestone) checkpoints and resumes bit-exactly: kill the script, rerun it, it continues. A piece
   during which other processes kept >= 0.5 cores busy (/proc/stat less its own CPU), or whose median step was
   1.25x the quiet one, counts its time as steps x the quiet median; both clocks are recorded. On another machine
   (the work directory lost), the last published result gives back the zero-shot scores, timing runs, rate choices
   and finished curves, and bench/results/budget_experiment.state.tar.gz (written by every run and --collect: commit
   it) the checkpoints of the runs still going.
5. Order: cell by cell, most informative first; within a cell the arms advance together, milestone by milestone,
   so a session cut short leaves the first cells complete and the next one compared at a shorter time. Cells
   beyond --cpu-hours are cut, last first.
6. Results: bench/results/budget_experiment.{jsonl,md,png}: per cell the validation curves against training
   wall-clock (zero-shot of every model as horizontal lines), test accuracy with its standard error, the rates
   chosen, peak RSS measured and predicted. Drawn from whatever is finished (--collect: no training).

    python -m bench.budget_experiment --plan          # cells, budgets, predicted memory, projected CPU hours
    python -m bench.budget_experiment                 # ~10 CPU hours on the 2-core machine; rerun to continue
    python -m bench.budget_experiment --collect       # tables and figure from what is finished, nothing trained
    python -m bench.budget_experiment --smoke         # each arm 2 steps on its real model: the pipeline, minutes
    python -m bench.budget_experiment --cells bfcl.separate   # issue 32's MeZO against BP on function calling, ~7 h
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from bench import budget_cells as bc
from bench import common
from bench.budget_legacy import render_v1
from bench.common import RESULTS, ROOT, machine_info, mib, provenance, run_fresh, run_json, table, utc_now

NAME = "budget_experiment"
TITLE = "The paper's experiment, symmetric: MeZO on the largest model it fits vs lean BP on the largest BP fits"
EDGEZO = [sys.executable, "-m", "edgezo.cli"]
SEED = 0


# ---- commands -----------------------------------------------------------------------------------------------------
def data_path(task: bc.TaskSpec, work: Path) -> str:
    """The --data of a task: a built-in name, or the long-context directory (generated once, deterministic)."""
    if task.data != "long-context":
        return task.data
    from bench import long_context_data

    return str(long_context_data.write(work / "data" / task.name))


def data_args(task: bc.TaskSpec, work: Path) -> list[str]:
    return ["--data", data_path(task, work), "--batch-size", str(task.batch_size), "--max-seq-len",
            str(task.max_seq_len), *(["--template", task.template] if task.template else [])]


def cached_json(path: Path, key: list[str], compute) -> dict | None:
    """`compute()` once per `key` (a command line): the record in `path` is reused while its key is the same.
    With `compute` None, only that record is read (None if there is none for this key)."""
    if path.exists() and (record := json.loads(path.read_text())).get("command_line") == key:
        return record
    if compute is None:
        return None
    record = {**compute(), "command_line": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def predict(model: str, method: str, task: bc.TaskSpec, work: Path) -> int:
    """`edgezo memory` for the arm's run: its data, batch, validation examples and MAX_STEPS steps."""
    flags = ["--method", "mezo"] if method == "mezo" else ["--method", "bp", *bc.LEAN_BP]
    cmd = [*EDGEZO, "memory", "--model", model, *data_args(task, work), "--seed", str(SEED), "--steps",
           str(bc.MAX_STEPS), "--n-valid", str(task.n_valid), *flags, "--json"]
    path = work / "predictions" / f"{task.name}.{model}.{method}.json"
    return cached_json(path, cmd[2:], lambda: {"predicted_bytes": run_json(cmd, f"memory {model} {method}")
                                                ["predicted_bytes"]})["predicted_bytes"]


def task_predictions(task: bc.TaskSpec, work: Path) -> dict:
    out = {m: {"mezo": predict(m, "mezo", task, work)} for m in task.models}
    for m in task.bp_models:
        out.setdefault(m, {})["bp"] = predict(m, "bp", task, work)
    return out


def scores(r: dict, task: bc.TaskSpec) -> dict:
    """What a record keeps of an `edgezo eval --json` result: the task's metric as accuracy, its other keys."""
    return {"accuracy": r[task.metric], **{k: r[k] for k in task.also}, "loss": r["loss"],
            "n_examples": r["n_examples"], "seconds": r["seconds"]}


def zero_shot(model: str, task: bc.TaskSpec, split: str, limit: int, threads: int, work: Path) -> dict:
    """llama.cpp's accuracy of the base model on the first `limit` examples of `split`, computed once."""
    cmd = [*EDGEZO, "eval", "--model", model, *data_args(task, work), "--split", split, "--threads", str(threads),
           "--json", *(["--limit", str(limit)] if limit else [])]

    def compute():
        say(f"zero-shot {model} on {task.name} {split}")
        return scores(run_json(cmd, f"zero-shot {model} {task.name} {split}"), task)

    return cached_json(work / "zero-shot" / f"{task.name}.{model}.{split}.json", cmd[2:], compute)


def zero_shot_record(task: bc.TaskSpec, model: str, work: Path) -> dict | None:
    """The base model's zero-shot validation score, if computed."""
    path = work / "zero-shot" / f"{task.name}.{model}.valid.json"
    return json.loads(path.read_text()) if path.exists() else None


def say(message: str) -> None:
    print(f"== {message}", file=sys.stderr, flush=True)


# ---- one run, in pieces -------------------------------------------------------------------------------------------
class Run:
    """One training run of an arm at one rate, in its directory; advanced piece by piece to step targets."""

    def __init__(self, arm: bc.Arm, rate, task: bc.TaskSpec, work: Path, threads: int, directory: Path,
                 model: str | None = None):
        self.arm, self.rate, self.task, self.work, self.threads = arm, rate, task, work, threads
        self.dir, self.model = directory, model or arm.model

    def command(self, steps: int, eval_every: int, save_every: int, n_valid: int) -> list[str]:
        method = ["reference-bp", *bc.LEAN_BP] if self.arm.method == "bp" else ["finetune"]
        return [*EDGEZO, method[0], "--model", self.model, *data_args(self.task, self.work), "--seed", str(SEED),
                "--steps", str(steps), "--eval-every", str(eval_every), "--save-every", str(save_every),
                "--n-valid", str(n_valid), "--max-memory", str(self.arm.budget_bytes), "--threads",
                str(self.threads), "--learning-rate", str(self.rate), "--out", str(self.dir), *method[1:],
                *self.task.train_args, "--json"]

    def step(self) -> int:
        state = self.dir / "state.json"
        return json.loads(state.read_text())["step"] if state.exists() else 0

    def events(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def pieces(self) -> list[dict]:
        path = self.dir / "pieces.json"
        return json.loads(path.read_text()) if path.exists() else []

    def advance(self, target: int, eval_every: int, save_every: int, n_valid: int) -> dict | None:
        """Train to step `target` in a fresh process (resuming from the checkpoint if there is one); the piece's
        record (steps, measured time, load, peak RSS), or None if the run is already there."""
        start, pieces = self.step(), self.pieces()
        if start >= target or (pieces and pieces[-1]["last_step"] == start < pieces[-1]["target"]):
            return None  # there, or the trainer ended the run short of its last target (5 rollbacks): finished
        if self.dir.exists() and not (self.dir / "state.json").exists():
            shutil.rmtree(self.dir)  # killed before its first checkpoint: nothing to continue
            pieces = []
        cmd = self.command(target, eval_every, save_every, n_valid) + (["--resume"] if start else [])
        say(f"{self.dir.name}: steps {start} -> {target}" + (" (resumed)" if start else ""))
        piece = run_watched(cmd, f"{self.dir.name} to step {target}")
        seconds = {e["step"]: e["seconds"] for e in self.events() if "seconds" in e}
        own = [seconds[s] for s in range(start + 1, target + 1) if s in seconds]
        piece.update(target=target, first_step=start + 1, last_step=self.step(), median_step_s=bc.median(own),
                     measured_train_s=sum(own), time=utc_now())
        (self.dir / "pieces.json").write_text(json.dumps(pieces + [piece], indent=1) + "\n")
        return piece

    def finished(self, target: int) -> bool:
        """At `target`, or ended short of its last target by the trainer itself (its checkpoint is its end)."""
        pieces = self.pieces()
        return self.step() >= target or bool(pieces and pieces[-1]["last_step"] < pieces[-1]["target"])

    def scored(self, split: str, limit: int, record: Path, compute: bool = True) -> dict | None:
        """`split` scored once on the adapter chosen by validation so far (RUN:best: the best validated, start
        included), its held-out accuracy the task's metric; kept in `record` (compute False: only read from it)."""
        cmd = [*EDGEZO, "eval", "--model", self.model, "--adapter", f"{self.dir}:best", *data_args(self.task, self.work),
               "--split", split, "--threads", str(self.threads), "--json", *(["--limit", str(limit)] if limit else [])]

        def score():
            say(f"{self.dir.name}: {split} split at step {self.step()}")
            return {**scores(run_json(cmd, f"{self.dir.name} {split}"), self.task),
                    "best_step": best_event(self.events(), self.task.generative)["step"], "step": self.step()}

        return cached_json(record, cmd[2:], score if compute else None)

    def test(self, limit: int, compute: bool = True) -> dict | None:
        """The test split, once, at the end (compute False: the score if already computed, else None)."""
        return self.scored("test", limit, self.dir / "test.json", compute)

    def heldout(self, step: int) -> dict:
        """A generative task's held-out accuracy at a milestone `step` (where the run must be now: RUN:best moves on)."""
        record = self.dir / f"heldout-{step}.json"
        if not record.exists() and self.step() != step:
            raise RuntimeError(f"{self.dir.name} is at step {self.step()}, not {step}: its held-out score there is lost")
        return self.scored("valid", self.task.n_valid, record)

    def heldout_curve(self, start: dict | None) -> list[dict]:
        """(generative tasks) the curve's points: the start (`start`: the base model's zero-shot validation score)
        and each milestone scored, with the trainer's validation loss at that step."""
        losses = {e["step"]: e["valid_loss"] for e in self.events() if "valid_loss" in e}
        records = [{**start, "step": 0}] if start else []
        records += [json.loads(p.read_text()) for p in sorted(self.dir.glob("heldout-*.json"),
                                                               key=lambda p: int(p.stem.split("-")[1]))]
        return [{"step": r["step"], "valid_accuracy": r["accuracy"], "valid_loss": losses.get(r["step"]),
                 **{k: r.get(k) for k in self.task.also}} for r in records]


def read_proc_stat() -> list[int]:
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return []


def run_watched(cmd: list[str], what: str) -> dict:
    """run_json, with what else the CPU did meanwhile: cores other processes kept busy (bc.others_busy_cores)."""
    before, cpu_before, t0 = read_proc_stat(), resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    result = run_json(cmd, what)
    wall, cpu_after, after = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_CHILDREN), read_proc_stat()
    own = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    busy = (bc.others_busy_cores(before, after, own, wall, os.sysconf("SC_CLK_TCK")) if before and after else None)
    return {"wall_s": wall, "own_cpu_s": own, "others_busy_cores": busy, "load_average": common.load_average(),
            "peak_rss_bytes": result["_process"]["peak_rss_bytes"], "steps": result.get("steps")}


def best_event(events: list[dict], by_loss: bool = False) -> dict:
    """The validation RUN:best holds: highest accuracy, then lowest loss (by_loss: the lowest loss, the trainer's
    choice on generative data), the first on a tie (rundir.is_better)."""
    valid = [e for e in events if "valid_accuracy" in e]
    return min(valid, key=lambda e: bc.validation_rank(e, by_loss) + (e["step"],))


# ---- an arm: timing, rates, milestones -----------------------------------------------------------------------------
class ArmRunner:
    def __init__(self, arm: bc.Arm, task: bc.TaskSpec, work: Path, threads: int, milestones=bc.MILESTONES_S,
                 model: str | None = None, timing_retries: int = 3, retry_wait_s: float = 120.0,
                 fixed_steps: list[int] | None = None, timing_steps: int = bc.TIMING_STEPS, runs: Path | None = None,
                 published: dict | None = None):
        self.arm, self.task, self.work, self.threads, self.milestones = arm, task, work, threads, milestones
        self.published = published or {}  # the arm's record in the last published result (restore())
        self.model, self.timing_retries, self.retry_wait_s = model, timing_retries, retry_wait_s
        self.fixed_steps = fixed_steps  # --smoke: these step counts instead of the milestones
        self.timing_steps = timing_steps
        self.dir = (runs or work / "runs") / arm.key  # the data stays in WORK/data

    def published_run(self, rate) -> dict | None:
        """The run's record in the last published result: what a work directory lost (another machine's) measured."""
        return (self.published.get("runs") or {}).get(str(rate))

    def run(self, rate, name: str | None = None) -> Run:
        return Run(self.arm, rate, self.task, self.work, self.threads, self.dir / (name or f"lr-{rate}"), self.model)

    def timing(self) -> dict:
        """The quiet timing run (bc.TIMING_STEPS steps, 1 validation example), redone while it shared the CPU (up to
        timing_retries times, then kept with quiet = false)."""
        path = self.dir / "timing.json"
        if path.exists():
            return json.loads(path.read_text())
        attempts = []
        for attempt in range(self.timing_retries + 1):
            run = self.run(self.arm.rates[0], "timing")
            shutil.rmtree(run.dir, ignore_errors=True)
            piece = run.advance(self.timing_steps, 0, 0, 1)
            attempts.append(piece)
            if not bc.is_shared({**piece, "median_step_s": None}, piece["median_step_s"]):
                break
            if attempt < self.timing_retries:
                say(f"{self.arm.key}: the timing run shared the CPU ({piece['others_busy_cores']:.2f} other cores "
                    f"busy); again in {self.retry_wait_s:.0f} s")
                time.sleep(self.retry_wait_s)
        last = attempts[-1]
        record = {"median_step_s": last["median_step_s"], "others_busy_cores": last["others_busy_cores"],
                  "quiet": not bc.is_shared({**last, "median_step_s": None}, last["median_step_s"]),
                  "peak_rss_bytes": last["peak_rss_bytes"], "attempts": len(attempts), "time": utc_now()}
        path.write_text(json.dumps(record, indent=1) + "\n")
        return record

    def steps(self) -> list[int]:
        return self.fixed_steps or bc.milestone_steps(self.timing()["median_step_s"], self.milestones)

    def chosen_rate(self):
        path = self.dir / "choice.json"
        return json.loads(path.read_text())["rate"] if path.exists() else None

    def advance(self, k: int) -> None:
        """Every run of the arm to milestone k: all rates to the first, then the chosen one."""
        steps = self.steps()
        save_every = max(1, round(300 / self.timing()["median_step_s"]))  # a checkpoint every ~5 min of training
        rates = self.arm.rates if k == 0 else [self.chosen_rate()]
        for rate in rates:
            run, published = self.run(rate), self.published_run(rate)
            if run.step() == 0 and published and published["steps"] >= steps[k]:
                continue  # measured on another machine and kept in the published result; a later milestone retrains it
            for target in steps[:k + 1]:  # a run that restarts passes (and validates at) every milestone again
                run.advance(target, steps[-1], save_every, self.task.n_valid)
        if k == 0 and self.chosen_rate() is None:
            # the validation at the first milestone (the last before it, if a run ended early: 5 rollbacks)
            firsts = {rate: [e for e in self.run(rate).events() if "valid_accuracy" in e and e["step"] <= steps[0]][-1]
                      for rate in self.arm.rates}
            rate = bc.choose_rate(firsts, by_loss=self.task.generative)
            (self.dir / "choice.json").write_text(json.dumps(
                {"rate": rate, "at_step": steps[0], "validations": firsts}, indent=1) + "\n")
        chosen = self.run(self.chosen_rate())
        if self.task.generative and chosen.step() == steps[k]:  # not if the trainer ended it early
            chosen.heldout(steps[k])

    def collect(self, test: bool) -> dict:
        """The arm's record: timing, chosen rate, each run's curve on the accounted clock, pieces, test."""
        record = {**asdict(self.arm), "key": self.arm.key, "runs": {}}
        if not (self.dir / "timing.json").exists():
            return record
        timing = self.timing()
        record.update(timing=timing, milestone_steps=self.steps(), chosen_rate=self.chosen_rate())
        for rate in self.arm.rates:
            run, published = self.run(rate), self.published_run(rate)
            events, pieces = run.events(), run.pieces()
            if published and run.step() < published["steps"]:
                record["runs"][str(rate)] = published
                continue
            if not events:
                continue
            clock = bc.account({e["step"]: e["seconds"] for e in events if "seconds" in e}, pieces,
                               timing["median_step_s"])
            measured = {0: 0.0, **{e["step"]: e["train_seconds"] for e in events if "seconds" in e}}
            points = (run.heldout_curve(zero_shot_record(self.task, self.arm.model, self.work))
                      if self.task.generative else
                      [{k: e[k] for k in ("step", "valid_accuracy", "valid_loss")} for e in events if "valid_accuracy" in e])
            curve = [{**p, "accounted_s": clock.get(p["step"]), "measured_s": measured.get(p["step"])} for p in points]
            rec = {"rate": rate, "steps": run.step(), "curve": curve, "pieces": pieces,
                   "shared_pieces": sum(bc.is_shared(p, timing["median_step_s"]) for p in pieces),
                   "peak_rss_bytes": max((p["peak_rss_bytes"] or 0 for p in pieces), default=None),
                   "rollbacks": sum(1 for e in events if "rollback_to" in e)}
            # --collect (test False) runs nothing, but shows a test split already scored
            if rate == record["chosen_rate"] and run.finished(self.steps()[-1]) \
                    and (scored := run.test(self.task.test_limit, compute=test)):
                rec["test"] = scored
            record["runs"][str(rate)] = rec
        return record


# ---- what a lost work directory held -------------------------------------------------------------------------------
def published_arms(result: dict | None) -> dict[str, dict]:
    """Each arm's record in a published result, by arm key, its runs stamped with the result's time ("published")."""
    if not result or result.get("format") != 2:
        return {}
    arms = {}
    for cell in result["cells"]:
        for arm in cell["arms"]:
            runs = {rate: {**run, "published": run.get("published") or result["time"]} for rate, run in arm["runs"].items()}
            arms[arm["key"]] = {**arm, "runs": runs}
    return arms


def write_missing(path: Path, record: dict) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")


def resumable_runs(work: Path) -> list[Path]:
    """Run directories with a checkpoint and no test score yet, less the timing runs and the rates not chosen: what a
    rerun continues."""
    def continues(run: Path) -> bool:
        choice = run.parent / "choice.json"
        chosen = run.name == f"lr-{json.loads(choice.read_text())['rate']}" if choice.exists() else True
        return chosen and run.name != "timing" and not (run / "test.json").exists()

    return sorted(state.parent for state in (work / "runs").rglob("state.json") if continues(state.parent))


def save_state(work: Path, path: Path) -> list[Path]:
    """The resumable runs, less the adapters a rerun rewrites (adapter*.gguf), into the tar file `path`, so a
    session on another machine continues them (restore()): the checkpoint, its best adapter and optimizer state
    (sha256-checked on --resume), config.json, metrics.jsonl and the pieces. Returns the runs saved."""
    runs = resumable_runs(work)
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:  # ~11 % smaller: the initial LoRA B is zeros
        for run in runs:
            for f in sorted(run.iterdir()):
                if f.is_file() and not f.name.startswith(("adapter", ".")):
                    tar.add(f, arcname=str(f.relative_to(work)))
    tmp.replace(path)
    return runs


def restore_runs(path: Path, work: Path) -> list[str]:
    """The runs saved in `path` whose directories `work` lacks, unpacked (a run already here is never overwritten)."""
    if not path.exists():
        return []
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        missing = sorted(d for d in {str(Path(m.name).parent) for m in members} if not (work / d).exists())
        tar.extractall(work, members=[m for m in members if str(Path(m.name).parent) in missing], filter="data")
    return missing


def restore(result: dict | None, work: Path) -> None:
    """Write back what the last published result holds and `work` lacks (a new machine, or a deleted directory):
    the zero-shot scores and refusals (with their command lines, so they stay valid only for the same commands), each
    arm's timing run and rate choice. The runs' curves come back in collect() (published_arms); a run that must go
    further than its published record resumes from the state file (restore_runs), else restarts from step 0."""
    if not result or result.get("format") != 2:
        return
    for task, models in result["zero_shot"].items():
        for model, splits in models.items():
            for split, record in splits.items():
                write_missing(work / "zero-shot" / f"{task}.{model}.{split}.json", record)
    for cell in result["cells"]:
        if cell.get("refusal"):
            write_missing(work / "refused" / f"{cell['task']}.{cell['budget']}.json", cell["refusal"])
    for key, arm in published_arms(result).items():
        if arm.get("timing"):
            write_missing(work / "runs" / key / "timing.json", arm["timing"])
        if arm.get("chosen_rate") is not None:
            first = arm["milestone_steps"][0]
            validations = {rate: [p for p in run["curve"] if p["step"] <= first][-1] for rate, run in arm["runs"].items()}
            write_missing(work / "runs" / key / "choice.json", {"rate": arm["chosen_rate"], "at_step": first,
                                                               "validations": validations, "published": result["time"]})


# ---- the experiment -----------------------------------------------------------------------------------------------
def device_budgets() -> dict[str, int]:
    from edgezo.memory import load_device_profile

    return {name: load_device_profile(name).usable_ram_bytes for name in bc.PHONE_PROFILES}


def plan(args) -> tuple[list[bc.Cell], list[bc.Cell], list[dict], dict]:
    specs = [c for c in bc.CELLS if not args.cells or f"{c.task}.{c.budget}" in args.cells]
    predictions = {t: task_predictions(bc.TASKS[t], args.work) for t in dict.fromkeys(c.task for c in specs)}
    cells = bc.plan_cells(specs, predictions, device_budgets(), args.bp_rates, args.mezo_rates)
    kept, cut, rows = bc.cut_to_budget(cells, args.cpu_hours)
    return kept, cut, rows, predictions


def lengths_text(task: bc.TaskSpec, work: Path) -> str:
    """The long-context prompt lengths under each tokenizer, from the generated data's lengths.json."""
    path = work / "data" / task.name / "lengths.json"
    if task.data != "long-context" or not path.exists():
        return ""
    tokens = json.loads(path.read_text())["tokens"]
    return "; ".join(f"{model} " + ", ".join(f"{split} {v['min']}/{v['median']:g}/{v['max']}"
                                            for split, v in per_split.items())
                     for model, per_split in tokens.items())


def plan_text(rows: list[dict], predictions: dict, cpu_hours: float, work: Path) -> str:
    lines = [f"Cells in order (most informative first); CPU hours projected on the 2-core machine (training 2 h per "
             f"run, the extra rates to 15 min, validations, test, zero-shot); cap {cpu_hours:g} h:\n"]
    for i, row in enumerate(rows, 1):
        cell = row["cell"]
        head = (f"{i}. {cell.spec.task} @ {cell.spec.budget}: "
                + (f"budget {mib(cell.budget_bytes)} ({cell.budget_source})" if cell.budget_bytes else cell.note)
                + f"; {cell.spec.why}")
        lines.append(head)
        for arm in cell.arms:
            cost = row["arms"][arm.key]
            rates = ",".join(map(str, arm.rates))
            lines.append(f"   {arm.method:5} {arm.model:20} predicted {mib(arm.predicted_bytes):>9}  rates {rates:18} "
                         f"{cost['total'] / bc.HOUR:4.1f} h (train {cost['train'] / bc.HOUR:.1f}, "
                         f"evals {cost['evals'] / bc.HOUR:.2f})")
        if cell.note and cell.budget_bytes:
            lines.append(f"   note: {cell.note}")
        lines.append(f"   cell {row['cost'] / bc.HOUR:.1f} h (zero-shot {row['zero_shot'] / bc.HOUR:.2f}); "
                     + (f"kept, cumulative {row['cumulative'] / bc.HOUR:.1f} h" if row["kept"] else "CUT"))
    for task in dict.fromkeys(r["cell"].spec.task for r in rows):
        lengths = lengths_text(bc.TASKS[task], work)
        if lengths:
            lines.append(f"\n{task} prompt tokens (min / median / max, the answer word included): {lengths}")
    lines.append("\nPredicted peak RSS (edgezo memory on each run's batches; bp = lean BP: Q4_0 blocks, checkpointing, "
                 "--release-freed-memory):")
    for task, per_model in predictions.items():
        lines.append(f"  {task}: " + "; ".join(f"{m} " + " / ".join(f"{k} {mib(v)}" for k, v in p.items())
                                            for m, p in per_model.items()))
    return "\n".join(lines)


def refusal(cell: bc.Cell, task: bc.TaskSpec, work: Path) -> dict | None:
    """Lean BP on the next larger model than BP's arm, under the cell's budget: must exit before training."""
    bp = next((a for a in cell.arms if a.method == "bp"), None)
    larger = [m for m in bc.MODELS if m in task.bp_models and bp and bc.MODELS[m] > bc.MODELS[bp.model]]
    if not larger:
        return None
    model = larger[0]
    cmd = [*EDGEZO, "reference-bp", "--model", model, *data_args(task, work), "--seed", str(SEED), "--steps",
           str(bc.MAX_STEPS), "--n-valid", str(task.n_valid), "--max-memory", str(cell.budget_bytes), *bc.LEAN_BP,
           "--out", str(work / "refused" / f"{task.name}.{cell.spec.budget}.{model}")]

    def compute():
        done = run_fresh(cmd)
        message = done["stderr"].strip().splitlines()[-1] if done["stderr"].strip() else ""
        return {"model": model, "returncode": done["returncode"], "message": message,
                "refused": done["returncode"] == 1 and "exceeds the memory budget" in message}

    return cached_json(work / "refused" / f"{task.name}.{cell.spec.budget}.json", cmd[2:], compute)


def collect(cells: list[bc.Cell], args, test: bool, published: dict[str, dict]) -> dict:
    tasks = {c.spec.task: bc.TASKS[c.spec.task] for c in cells}
    zero = {}
    for name, task in tasks.items():
        zero[name] = {}
        for m in task.models:
            entry = {}
            for split, limit in (("valid", task.n_valid), ("test", task.test_limit)):
                path = args.work / "zero-shot" / f"{name}.{m}.{split}.json"
                if path.exists():
                    entry[split] = json.loads(path.read_text())
            zero[name][m] = entry
    out_cells = []
    for cell in cells:
        task = bc.TASKS[cell.spec.task]
        refused = args.work / "refused" / f"{task.name}.{cell.spec.budget}.json"
        out_cells.append({"task": task.name, "budget": cell.spec.budget, "budget_bytes": cell.budget_bytes,
                          "budget_source": cell.budget_source, "why": cell.spec.why, "note": cell.note,
                          "task_spec": asdict(task),
                          "refusal": json.loads(refused.read_text()) if refused.exists() else None,
                          "arms": [ArmRunner(a, task, args.work, args.threads, published=published.get(a.key)).collect(test)
                                   for a in cell.arms]})
    return {"benchmark": NAME, "format": 2, "time": utc_now(), "machine": machine_info(), "threads": args.threads,
            "milestones_s": list(bc.MILESTONES_S), "seed": SEED, "cells": out_cells, "zero_shot": zero}


def smoke(kept: list[bc.Cell], args) -> list[dict]:
    """Every kept arm on its real model, 1 then 2 steps (each rate to step 1; a 1-step timing run), 4 validation and
    4 test examples, under its budget: the pipeline end to end in minutes, in WORK/smoke (nothing published)."""
    records = []
    for cell in kept:
        task = replace(bc.TASKS[cell.spec.task], n_valid=4, test_limit=4)
        for arm in cell.arms:
            runner = ArmRunner(arm, task, args.work, args.threads, timing_retries=0, fixed_steps=[1, 2, 2, 2],
                               timing_steps=1, runs=args.work / "smoke")
            for k in range(len(bc.MILESTONES_S)):
                runner.advance(k)
            records.append(runner.collect(test=True))
    return records


def running_in(work: Path) -> list[int]:
    """PIDs of edgezo commands still writing into `work` (a piece orphaned when this script was killed): a rerun
    waits for them rather than train the same run twice."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"edgezo.cli" in argv and any(str(work).encode() in a for a in argv) and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return pids


def execute(kept: list[bc.Cell], args, published: dict[str, dict]) -> None:
    """Cell by cell, in the plan's order: zero-shot (every model on validation, the trained ones on test), the
    refusal, the arms' timing runs, then the arms together milestone by milestone (both at 15 min, then both at
    30 min, ...), then test. Each step is skipped if done, so a session cut short leaves the first cells complete
    and the next with both arms at the same milestone."""
    for cell in kept:
        task = bc.TASKS[cell.spec.task]
        for m in task.models:
            zero_shot(m, task, "valid", task.n_valid, args.threads, args.work)
        for m in dict.fromkeys(a.model for a in cell.arms):
            zero_shot(m, task, "test", task.test_limit, args.threads, args.work)
        refusal(cell, task, args.work)
        runners = [ArmRunner(a, task, args.work, args.threads, published=published.get(a.key)) for a in cell.arms]
        for runner in runners:
            runner.timing()
        for k in range(len(bc.MILESTONES_S)):
            for runner in runners:
                runner.advance(k)
        for runner in runners:
            runner.collect(test=True)


# ---- figure and tables --------------------------------------------------------------------------------------------
def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else math.nan


def curve_of(arm: dict) -> tuple[dict | None, list[dict]]:
    run = arm["runs"].get(str(arm.get("chosen_rate"))) if arm.get("chosen_rate") is not None else None
    return run, (run["curve"] if run else [])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    fig, axes = plt.subplots(1, max(1, len(cells)), figsize=(5.2 * max(1, len(cells)), 4.2), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        for model, entry in result["zero_shot"].get(cell["task"], {}).items():  # every model's start, labelled
            if "valid" in entry:
                ax.axhline(entry["valid"]["accuracy"], color="0.45", ls=":", lw=1)
                ax.annotate(f"{model} zero-shot", (1.0, entry["valid"]["accuracy"]), xycoords=("axes fraction", "data"),
                            ha="right", va="bottom", fontsize=6, color="0.35")
        for j, arm in enumerate(cell["arms"]):
            for rate, run in arm["runs"].items():
                pts = [(p["accounted_s"] / 60, p["valid_accuracy"]) for p in run["curve"] if p["accounted_s"] is not None]
                if not pts:
                    continue
                chosen = rate == str(arm.get("chosen_rate"))
                x, y = zip(*pts)
                ax.plot(x, y, marker="o" if chosen else ".", color=f"C{j}", lw=2 if chosen else 0.7,
                        alpha=1 if chosen else 0.4,
                        label=f"{arm['method']} {arm['model']} lr {rate}" + ("" if chosen else " (not chosen)"))
                if chosen and "test" in run:
                    ax.errorbar([x[-1]], [run["test"]["accuracy"]], marker="*", ms=12, color=f"C{j}",
                                yerr=[standard_error(run["test"]["accuracy"], run["test"]["n_examples"])])
        ax.set_title(f"{cell['task']}, {cell['budget']} budget {mib(cell['budget_bytes'])}", fontsize=9)
        ax.set_xlabel("training wall-clock (min, accounted; evaluations excluded)")
        ax.set_ylabel("validation accuracy (star: test, +/- 1 SE)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def at_milestone(curve: list[dict], steps: int) -> dict | None:
    return next((p for p in curve if p["step"] == steps), None)


def at_milestones(arm: dict) -> tuple[dict | None, list[dict | None]]:
    """The arm's chosen run and its curve's points at the four milestones (None where not reached)."""
    run, curve = curve_of(arm)
    at = [at_milestone(curve, s) for s in arm.get("milestone_steps") or []]
    return run, at + [None] * (len(bc.MILESTONES_S) - len(at))


def verdict(cell: dict) -> str:
    """MeZO's lead over BP (points) on validation at each milestone both reached, and on test with the standard
    error of the difference of two independent test scores."""
    arms = {a["method"]: a for a in cell["arms"]}
    if set(arms) != {"bp", "mezo"}:
        return ""
    (bp_run, bp_curve), (mezo_run, mezo_curve) = curve_of(arms["bp"]), curve_of(arms["mezo"])
    leads = []
    for label, b_steps, m_steps in zip(("15 min", "30 min", "1 h", "2 h"), arms["bp"].get("milestone_steps") or [],
                                       arms["mezo"].get("milestone_steps") or []):
        b, m = at_milestone(bp_curve, b_steps), at_milestone(mezo_curve, m_steps)
        if b and m:
            leads.append(f"{label} {100 * (m['valid_accuracy'] - b['valid_accuracy']):+.1f}")
    text = ""
    if leads:
        text += "\nMeZO minus BP, validation accuracy (points): " + ", ".join(leads) + "."
    bt, mt = (bp_run or {}).get("test"), (mezo_run or {}).get("test")
    if bt and mt:
        se = math.hypot(standard_error(bt["accuracy"], bt["n_examples"]),
                        standard_error(mt["accuracy"], mt["n_examples"]))
        gap = mt["accuracy"] - bt["accuracy"]
        winner = "MeZO" if gap > 0 else "BP" if gap < 0 else "neither"
        text += (f" Test: {winner} by {100 * abs(gap):.1f} +/- {100 * se:.1f} points (MeZO on {arms['mezo']['model']} "
                 f"{mt['accuracy']:.3f}, BP on {arms['bp']['model']} {bt['accuracy']:.3f}; +/- one standard error of "
                 f"the difference).")
    return text + "\n" if text else ""


def also_table(cell: dict, zero: dict) -> str:
    """The task's other metrics of the same generations (BFCL: lenient accuracy, name, valid call), as the main
    table shows accuracy: zero-shot test, validation at each milestone, test."""
    also = cell["task_spec"].get("also") or []
    rows = []
    for arm in cell["arms"]:
        run, at = at_milestones(arm)
        test, z = (run or {}).get("test") or {}, zero.get(arm["model"], {}).get("test") or {}
        for key in also:
            rows.append([arm["method"], arm["model"], key, *[f"{r[key]:.3f}" if r and r.get(key) is not None else "-"
                                                             for r in (z, *at, test)]])
    if not rows:
        return ""
    return "\nThe same generations, other metrics:\n\n" + table(
        ["method", "model", "metric", "zero-shot test", "valid 15 min", "30 min", "1 h", "2 h", "test"], rows)


LEGACY_TITLE = "The paper's experiment: MeZO on a bigger model vs the best BP on the biggest that fits, one memory budget"


def title(result: dict) -> str:
    """The first experiment's lines keep their own title: they were not symmetric."""
    return TITLE if result.get("format") == 2 else LEGACY_TITLE


def render(result: dict, image: str = "budget_experiment.png") -> str:
    """Markdown of a result line (bench/report.py calls it too); the first experiment's lines render as they were."""
    if result.get("format") != 2:
        return render_v1(result, image)
    text = [f"Seed {result['seed']}, {result['threads']} threads, LoRA rank 16 on attn_k/attn_v, Q4_0 files; "
            f"milestones {', '.join(f'{m / 60:g}' for m in result['milestones_s'])} min of training (evaluations "
            f"excluded, accounted: a piece that shared the CPU counts steps x its arm's quiet median). Figure: "
            f"[{Path(image).name}]({image}).\n"]
    for cell in result["cells"]:
        t = cell["task_spec"]
        text.append(f"\n**{cell['task']} under {mib(cell['budget_bytes'])}** ({cell['budget_source']}; batch "
                    f"{t['batch_size']}, --max-seq-len {t['max_seq_len']}, {t['n_valid']} validation and "
                    f"{t['test_limit'] or 'all'} test examples){': ' + cell['note'] if cell['note'] else ''}\n\n")
        zero = result["zero_shot"].get(cell["task"], {})
        rows = []
        for arm in cell["arms"]:
            run, cells_at = at_milestones(arm)
            test = (run or {}).get("test")
            z = zero.get(arm["model"], {}).get("test")
            rows.append([arm["method"], arm["model"], arm.get("chosen_rate") or "-",
                         f"{mib(run['peak_rss_bytes']) if run else '-'} ({mib(arm['predicted_bytes'])})",
                         (f"{arm['timing']['median_step_s']:.2f}" + ("" if arm["timing"].get("quiet", True) else " (busy)"))
                         if arm.get("timing") else "-",
                         f"{z['accuracy']:.3f}" if z else "-",
                         *[f"{c['valid_accuracy']:.3f}" if c else "-" for c in cells_at],
                         (f"{test['accuracy']:.3f} +/- {standard_error(test['accuracy'], test['n_examples']):.3f} "
                          f"({test['n_examples']})") if test else "-",
                         run["shared_pieces"] if run else "-"])
        text.append(table(["method", "model", "rate", "peak RSS (predicted)", "quiet s/step", "zero-shot test",
                           "valid 15 min", "30 min", "1 h", "2 h", "test (best validated)", "shared pieces"], rows))
        text.append(also_table(cell, zero))
        carried = [f"{arm['method']} lr {rate} ({run['published']})" for arm in cell["arms"]
                   for rate, run in arm["runs"].items() if run.get("published")]
        if carried:
            text.append(f"\nCarried from an earlier published result (their run directories were on another machine): "
                        f"{', '.join(carried)}.\n")
        text.append(verdict(cell))
        if cell.get("refusal"):
            r = cell["refusal"]
            text.append(f"\nLean BP on {r['model']} under the budget: "
                        + (f"refused (`{r['message']}`)" if r["refused"] else f"NOT refused (exit {r['returncode']})")
                        + ".\n")
    if result.get("cut"):
        text.append(f"\nNot run (beyond the CPU budget, in the plan's order): {', '.join(result['cut'])}.\n")
    return "".join(text) + f"\n{provenance(result)}\n"


def publish(result: dict, directory: Path) -> None:
    plot(result, directory / f"{NAME}.png")
    common.append_result(NAME, result, directory)
    common.write_markdown(NAME, f"# {TITLE}\n\n{render(result, f'{NAME}.png')}", directory)


def rates(text: str) -> list:
    return [x if x == "auto" else float(x) for x in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", "--dry-run", action="store_true", help="print the cells and their cost; train nothing")
    parser.add_argument("--collect", action="store_true", help="results from what is finished; train nothing")
    parser.add_argument("--smoke", action="store_true", help="each kept arm for 2 steps on its real model (WORK/smoke)")
    parser.add_argument("--cpu-hours", type=float, default=11.0,
                        help="cut the cells from the first beyond this projection on [%(default)s: the first two]")
    parser.add_argument("--cells", type=lambda s: s.split(","), help="only these TASK.BUDGET cells, e.g. boolq.separate")
    parser.add_argument("--bp-rates", type=rates, default=list(bc.BP_RATES), help="AdamW grid [1e-4,3e-4,1e-3]")
    parser.add_argument("--mezo-rates", type=rates, default=list(bc.MEZO_RATES), help="MeZO rates [auto]")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="[all cores]")
    parser.add_argument("--work", type=common.work_dir, default=str(ROOT / "runs" / "budget33"), help="[runs/budget33]")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the tables and figure go [bench/results]")
    args = parser.parse_args()
    kept, cut, rows, predictions = plan(args)
    print(plan_text(rows, predictions, args.cpu_hours, args.work), file=sys.stderr if not args.plan else sys.stdout)
    if args.plan:
        return 0
    if args.smoke:
        for record in smoke(kept, args):
            run = record["runs"][str(record["chosen_rate"])]
            print(f"{record['key']}: rate {record['chosen_rate']}, steps {run['steps']}, valid "
                  f"{[p['valid_accuracy'] for p in run['curve']]}, test {run['test']['accuracy']:.3f}, peak RSS "
                  f"{mib(run['peak_rss_bytes'])} (predicted {mib(record['predicted_bytes'])}), timing "
                  f"{record['timing']['median_step_s']:.2f} s/step")
        return 0
    latest, state = common.latest_result(NAME, args.results), args.results / f"{NAME}.state.tar.gz"
    for run in restore_runs(state, args.work):
        say(f"restored {run} from {state}")
    restore(latest, args.work)
    published = published_arms(latest)
    if not args.collect:
        while pids := running_in(args.work.resolve()):
            say(f"waiting for edgezo processes still writing into {args.work} (pids {pids}; stop this script with "
                f"Ctrl-C, which lets a piece checkpoint, rather than kill it alone)")
            time.sleep(30)
        execute(kept, args, published)
    result = collect(kept, args, not args.collect, published)
    result["cut"] = [f"{c.spec.task}.{c.spec.budget}" for c in cut]
    publish(result, args.results)
    saved = save_state(args.work, state)
    say(f"{len(saved)} resumable runs saved in {state} (commit it: a session on another machine continues them)")
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
