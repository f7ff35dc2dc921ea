"""Fast MeZO levers against torch BP: validation accuracy against steps and training wall-clock, in one run.

    python -m bench.estimators --work runs/estimators            # every configuration below, one after another
    python -m bench.estimators --work runs/estimators --only fzoo-fa,bp
    python -m bench.estimators --work runs/intents --task intents --only bp,mezo   # the held-out-style check

Each configuration is one `edgezo finetune` (or `edgezo reference-bp`) in a fresh process on SmolLM2-135M Q4_0,
movie-reviews (or --task intents: bench/intents_data.py's synthetic requests), batch 16, seed 0, validated on
the same 500 reviews (200 requests); a finished run in --work is reused (rerun to
continue an interrupted sweep). Training seconds exclude evaluations, so they compare across evaluation schedules.
Levers (issue "Fast MeZO"): LoRA-FA (B only), LoRA on the last K blocks only (--num-layers), and FZOO (one-sided
Rademacher directions around the unperturbed loss, step normalised by the losses' std).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import common
from bench import intents_data

from edgezo.rundir import RunDir  # noqa: E402
from bench.time_to_accuracy import read_curve

NAME, TITLE = "estimators", "Fast MeZO levers: accuracy against steps and training time, torch BP alongside"
AT_SECONDS = (60, 120, 300)
COMMON = ["--model", "smollm2-135m", "--quant", "q4_0", "--batch-size", "16", "--seed", "0", "--json"]


@dataclass(frozen=True)
class BenchTask:
    """The data a sweep trains on, and the validation accuracies it reports the time to (the last but one is the
    target whose time is compared with BP's)."""
    name: str
    n_valid: int
    thresholds: tuple[float, ...]

    @property
    def target(self) -> float:
        return self.thresholds[-2]

    def results(self, benchmark: str = NAME) -> str:
        """The results name of `benchmark` on this task (the default task's is the benchmark's own)."""
        return benchmark if self.name == "movie-reviews" else f"{benchmark}-{self.name}"

    def data_flags(self, work: Path) -> list[str]:
        if self.name == "movie-reviews":
            return ["--data", "movie-reviews", "--n-valid", str(self.n_valid)]
        return ["--data", str(intents_data.write(work / "data")), "--template", intents_data.TEMPLATE,
                "--n-valid", str(self.n_valid)]


TASKS = {"movie-reviews": BenchTask("movie-reviews", 500, (0.80, 0.82, 0.84, 0.86)),
         # four intents answered by a letter: zero-shot is near chance, so the thresholds span the whole climb
         "intents": BenchTask("intents", intents_data.N["valid"], (0.50, 0.70, 0.90, 0.95))}
# name -> (command, steps, eval every, extra flags); MeZO's defaults (lr 1e-3, eps 1e-2, rank 16 on k,v) unless given
CONFIGS = {
    "mezo": ("finetune", 400, 25, []),  # today's defaults: first reached 84 % at step 350 on the AVX-512 machine
    # ConMeZO (arXiv 2511.02757): directions in a cone (half-angle 1.35 rad) around the momentum (0.99) of past
    # estimates, at MeZO's rate
    "conmezo": ("finetune", 400, 25, ["--estimator", "conmezo"]),
    # a larger rate early, decayed to 0 by step 400 (a constant 1e-3 drifts in long runs; at 1e-3 ConMeZO peaked
    # at step 100, then fell back)
    "mezo-cosine-lr2e-3": ("finetune", 400, 25, ["--learning-rate", "2e-3", "--schedule", "cosine"]),
    "conmezo-cosine-lr2e-3": ("finetune", 400, 25, ["--estimator", "conmezo", "--learning-rate", "2e-3",
                                                    "--schedule", "cosine"]),
    # A larger rate, decayed over a shorter horizon (200 steps), validated every 10 steps: diverged (validation
    # loss 0.438 at step 40, 0.664 at step 100, seed 0), so larger rates were not tried
    "conmezo-cosine200-lr4e-3": ("finetune", 200, 10, ["--estimator", "conmezo", "--learning-rate", "4e-3",
                                                       "--schedule", "cosine"]),
    "mezo-fa": ("finetune", 200, 20, ["--lora-fa", "--learning-rate", "4e-3"]),
    "mezo-fa-top6": ("finetune", 200, 20, ["--lora-fa", "--num-layers", "6", "--learning-rate", "4e-3"]),
    # FZOO's expected step is lr along the unit gradient direction (its g is normalised by the losses' std): at
    # lr 1e-3 a 20-step pilot moved validation loss by 0.005 only, so 1e-2 (step noise ~ MeZO-FA's at 4e-3).
    "fzoo-fa": ("finetune", 40, 4, ["--estimator", "fzoo", "--lora-fa", "--learning-rate", "1e-2"]),
    # With --num-layers the split engine runs only the top blocks per evaluation (prefix reuse, bit-identical) and
    # validation after the first one only those blocks (repeated batches cached).
    "fzoo-fa-top3": ("finetune", 100, 10, ["--estimator", "fzoo", "--lora-fa", "--num-layers", "3", "--learning-rate", "1e-2"]),
    # The gradient energy of the top 3 blocks' B is 1/22 of all blocks' (bench note), on 1/10 of the parameters:
    # MeZO's usable rate scales about as 1/d, so 5x the all-block rate.
    "mezo-fa-top3": ("finetune", 200, 20, ["--lora-fa", "--num-layers", "3", "--learning-rate", "2e-2"]),
    # The first 6 blocks carry about half of all blocks' gradient energy on 1/5 of the parameters (bench note):
    # LoRA there, no prefix to reuse (every evaluation runs all blocks above them), 5x the all-block rate.
    "mezo-fa-bottom6": ("finetune", 100, 20, ["--lora-fa", "--layers", "0:6", "--learning-rate", "2e-2"]),  # 2e-2 diverged
    "mezo-fa-bottom6-lr1e-2": ("finetune", 200, 20, ["--lora-fa", "--layers", "0:6", "--learning-rate", "1e-2"]),
    "bp": ("reference-bp", 30, 5, []),
    # LoRA on ffn_down only, the target with the largest signal share (bench/gradient_noise.py: 2.6x the default's
    # progress per step at 5x its best rate). Seed 0, Intel Xeon: validation loss 0.449 at step 75, then diverged
    # (0.78 at step 125); at 2e-3, 0.451 at step 125 and 0.434 at step 200 (the defaults: 0.447 and 0.436)
    "mezo-down-lr4e-3": ("finetune", 150, 25, ["--targets", "ffn_down", "--learning-rate", "4e-3"]),
    "mezo-down-lr2e-3": ("finetune", 200, 25, ["--targets", "ffn_down", "--learning-rate", "2e-3"]),
    # MeZO steps lr * (z . g) z, whose expectation is the SGD step lr * g: plain SGD (BP, no momentum) at MeZO's rate
    # and above shows how much of BP's lead is AdamW's per-coordinate scaling and how much SGD's own rate limit
    "mezo-100": ("finetune", 100, 25, []),
    **{f"bp-sgd-lr{lr}": ("reference-bp", 100, 25, ["--optimizer", "sgd", "--learning-rate", lr])
       for lr in ("1e-3", "1e-2", "1e-1", "1")},
}
# Today's defaults and the best schedule on two more seeds (other batches, directions and initial A), stopped after
# 320 s of training (about 200 steps here; the schedule's horizon stays 400): is a gain more than one seed's luck?
CONFIGS |= {f"{name}-seed{seed}": (CONFIGS[name][0], 400, 25, [*CONFIGS[name][3], "--seed", str(seed),
                                                                "--max-train-seconds", "320"])
            for name in ("mezo", "mezo-cosine-lr2e-3", "conmezo-cosine-lr2e-3") for seed in (1, 2)}


def first_reaching(points: list[dict], threshold: float) -> dict | None:
    return next((p for p in points if p["valid_accuracy"] >= threshold - 1e-9), None)


def best_by(points: list[dict], seconds: float, key: str = "valid_accuracy", clock: str = "train_seconds",
            pick=max) -> float | None:
    """Best `key` seen within `seconds` of training by `clock` (None if the run never got that far)."""
    seen = [p[key] for p in points if p[clock] <= seconds]
    return pick(seen) if seen and points[-1][clock] >= seconds else None


def run_config(name: str, data_flags: list[str], work: Path, threads: int) -> dict:
    command, steps, every, extra = CONFIGS[name]
    out = work / name
    argv = ["-m", "edgezo.cli", command, *COMMON, *data_flags, "--steps", str(steps), "--eval-every", str(every),
            "--threads", str(threads), "--out", str(out), *extra]
    finished = (out / "adapter.gguf").exists()
    if not finished:
        if command == "finetune" and (out / "state.json").exists():
            argv.append("--resume")
        common.run_json([sys.executable, *argv], name, timeout=4 * 3600)
    points = read_curve(out)
    return {"name": name, "command": f"edgezo {command} " + " ".join(extra), "steps": steps, "eval_every": every,
            "points": points, "reused": finished}


def time_config(name: str, data_flags: list[str], work: Path, threads: int, steps: int) -> dict:
    """Median seconds per training step of a configuration, from a short run without evaluations (fresh process).
    On a shared machine the sweep's own clock is only as good as its load; these short runs, one configuration
    after another on an otherwise idle machine, give the per-step cost that converts steps into seconds."""
    command, _, _, extra = CONFIGS[name]
    out = work / "timing" / name
    if not (out / "adapter.gguf").exists():
        argv = ["-m", "edgezo.cli", command, *COMMON, *data_flags, "--steps", str(steps), "--eval-every", "0",
                "--n-valid", "16", "--threads", str(threads), "--out", str(out), *extra]
        common.run_json([sys.executable, *argv], f"{name} timing", timeout=3600)
    lines = RunDir(out).events()
    seconds = [e["seconds"] for e in lines if "loss" in e][1:]  # the first step warms caches and thread pools
    return common.summary(seconds)


def summarize(runs: list[dict], thresholds: tuple[float, ...]) -> dict:
    """Per run: best accuracy, steps and training seconds to each threshold, best accuracy within each time budget;
    with timing runs, the projected time (steps x median step seconds) and its ratio to BP's."""
    out = {}
    for r in runs:
        reach = {f"{t:.2f}": first_reaching(r["points"], t) for t in thresholds}
        row = {"best": max(p["valid_accuracy"] for p in r["points"]),
               "time_to": {k: (p and p["train_seconds"]) for k, p in reach.items()},
               "steps_to": {k: (p and p["step"]) for k, p in reach.items()},
               "best_by": {str(s): best_by(r["points"], s) for s in AT_SECONDS}}
        if "step_seconds" in r:
            median = r["step_seconds"]["median"]
            row["projected_time_to"] = {k: (n * median if n is not None else None) for k, n in row["steps_to"].items()}
            # equal training time on an idle machine: each evaluation placed at step x the timing run's s/step
            projected = [{**p, "projected_seconds": p["step"] * median} for p in r["points"]]
            row["projected_best_loss_by"] = {str(t): best_by(projected, t, "valid_loss", "projected_seconds", min)
                                             for t in AT_SECONDS}
            row["projected_best_by"] = {str(t): best_by(projected, t, clock="projected_seconds") for t in AT_SECONDS}
        out[r["name"]] = row
    bp = out.get("bp")
    for row in out.values():
        key = "projected_time_to" if bp and "projected_time_to" in bp and "projected_time_to" in row else "time_to"
        if bp is not None:
            row["time_over_bp"] = {k: common.ratio(v, bp[key][k]) if v is not None and bp[key][k] else None
                                   for k, v in row[key].items()}
    return out


SEED_STEPS = (100, 200)  # the seed runs stop after 320 s of training, a little past step 200 here


def seed_groups(runs: list[dict]) -> dict[str, dict[int, dict]]:
    """{configuration: {seed: run}} for each configuration with `-seedN` runs; its plain run is seed 0."""
    named = {r["name"]: r for r in runs}
    groups: dict[str, dict[int, dict]] = {}
    for name, run in named.items():
        base, _, seed = name.rpartition("-seed")
        if base and seed.isdigit():
            groups.setdefault(base, {0: named[base]} if base in named else {})[int(seed)] = run
    return {base: dict(sorted(seeds.items())) for base, seeds in groups.items()}


def render_seeds(runs: list[dict], target: float) -> str:
    """Per seed: validation loss at SEED_STEPS, the best loss and accuracy up to the last of them, and the step
    of the first evaluation at `target`; then the mean best loss of each configuration."""
    groups = seed_groups(runs)
    if not groups:
        return ""
    last, rows, means = SEED_STEPS[-1], [], []
    for base, seeds in groups.items():
        best_losses = []
        for seed, run in seeds.items():
            points = {p["step"]: p for p in run["points"]}
            upto = [p for p in run["points"] if p["step"] <= last]
            best_loss = min(p["valid_loss"] for p in upto)
            best_losses.append(best_loss)
            reached = first_reaching(run["points"], target)
            rows.append([base, seed, *[common.fmt(points[s]["valid_loss"], 4) if s in points else "-" for s in SEED_STEPS],
                         f"{best_loss:.4f}", f"{max(p['valid_accuracy'] for p in upto):.3f}",
                         reached["step"] if reached else "-"])
        means.append(f"{base} {sum(best_losses) / len(best_losses):.4f} ({len(best_losses)} seeds)")
    header = ["configuration", "seed", *[f"valid loss at step {s}" for s in SEED_STEPS], f"best loss to step {last}",
              f"best accuracy to step {last}", f"first step at {target:.0%}"]
    return (f"\nSeeds (other batches, directions and initial A):\n\n{common.table(header, rows)}\n"
            f"Mean best validation loss to step {last}: {'; '.join(means)}.\n")


def render(result: dict) -> str:
    task = TASKS[result.get("task", "movie-reviews")]
    target = f"{task.target:.2f}"
    rows = []
    for r in result["runs"]:
        s = result["summary"][r["name"]]
        reached = [f"{s['steps_to'][k]} / {common.fmt(s['time_to'][k], 0)} s" if s["time_to"][k] is not None else "-"
                   for k in s["time_to"]]
        step = common.spread(r["step_seconds"], 2) if "step_seconds" in r else "-"
        projected = s.get("projected_time_to", {}).get(target)
        at = [f"{common.fmt(s['projected_best_by'][str(t)])} / {common.fmt(s['projected_best_loss_by'][str(t)], 4)}"
              if "projected_best_by" in s else "-" for t in AT_SECONDS]
        rows.append([r["name"], r["command"], r["steps"], f"{s['best']:.3f}", *at, *reached, step,
                     common.fmt(projected, 0), common.fmt(s.get("time_over_bp", {}).get(target), 1)])
    header = ["run", "command (extra flags)", "steps", "best valid",
              *[f"by {t} s: best acc / loss" for t in AT_SECONDS],
              *[f"step / s to {float(t) * 100:.0f} %" for t in task.thresholds], "s per step (timing run)",
              f"{task.target:.0%}: steps x s/step", f"{task.target:.0%}: time / BP's"]
    text = common.table(header, rows)
    text += (f"\nsmollm2-135m q4_0, {task.name}, batch 16, seed 0, LoRA rank 16 alpha 32 on attn_k,attn_v unless the "
             f"flags say otherwise; validation on the same {task.n_valid} examples (every `eval_every` steps, and at "
             "step 0); "
             "training seconds exclude evaluations. Each run a fresh process, one after another. The sweep's seconds "
             "(the step / s columns) are as loaded as the machine was; the timing runs (short, no evaluation, one "
             "configuration at a time) give seconds per step, and the 'by N s' columns (best validation accuracy / "
             "lowest validation loss among the evaluations at step x s/step <= N) and the time ratio to BP use them.\n")
    text += render_seeds(result["runs"], task.target)
    return text + "\n" + common.provenance(result) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=common.work_dir, required=True, help="directory of the runs (created; reused to continue)")
    p.add_argument("--only", help="comma-separated configuration names [all]: " + ", ".join(CONFIGS))
    p.add_argument("--task", choices=list(TASKS), default="movie-reviews",
                   help="movie-reviews, or intents: bench/intents_data.py's held-out-style task [%(default)s]")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--time-steps", type=int, default=0,
                   help="also time each configuration over this many steps without evaluations (work/timing/)")
    p.add_argument("--tag", help="publish to results/estimators[-task]-TAG (a study beside the main sweep)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    task = TASKS[args.task]
    data_flags = task.data_flags(args.work)  # the intents data is written once, into --work
    machine = common.machine_info()
    runs = []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        runs.append(run_config(name, data_flags, args.work, args.threads))
    for run in runs if args.time_steps else []:
        print(f"== timing {run['name']}", file=sys.stderr, flush=True)
        run["step_seconds"] = time_config(run["name"], data_flags, args.work, args.threads, args.time_steps)
    result = {"benchmark": NAME, "task": task.name, "time": common.utc_now(), "machine": machine, "runs": runs,
              "summary": summarize(runs, task.thresholds), "load_average_end": common.load_average()}
    name = f"{task.results()}-{args.tag}" if args.tag else task.results()
    common.publish(name, TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
