"""The seed paper's experiment on this machine: under one memory budget, MeZO on a bigger model vs BP on the biggest
model BP can fit.

1. Predict (edgezo memory) the peak RSS of BP (float32, with and without gradient checkpointing) and MeZO (Q4_0)
   on SmolLM2-135M and Gemma-3-270M at the runs' settings, and pick a budget at which BP fits SmolLM2-135M but
   not Gemma-3-270M while MeZO fits Gemma-3-270M (or check the one given with --budget).
2. Show the budget is enforced: BP on Gemma with --max-memory BUDGET refuses to start, in both BP variants.
3. Train, each in a fresh process with --max-memory BUDGET (refused if predicted over, stopped if measured RSS
   crosses it): BP (AdamW) on SmolLM2, MeZO on Gemma, and for reference MeZO on SmolLM2. All on movie-reviews,
   batch 16, seed 0, LoRA rank 16 on attn_k/attn_v, validation on 500 held-out reviews at fixed step intervals.
4. Plot validation accuracy against training wall-clock (evaluation time excluded) and evaluate every final
   adapter on the 1000-review test split with llama.cpp. Results: bench/results/budget_experiment.{jsonl,md,png}.
   An interrupted experiment continues where it stopped when rerun with the same --work (finished runs are reused).

    python bench/budget_experiment.py            # ~70 min on the 2-core CI machine; rerun it to continue
    python bench/budget_experiment.py --quick    # a few steps each: checks the pipeline
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from edgezo.store import MODELS

from common import RESULTS, ROOT, machine_info, mib, provenance, publish, run_fresh, run_json, summary, table, utc_now

NAME = "budget_experiment"
TITLE = "The paper's experiment: MeZO on a bigger model vs BP on the biggest that fits, one memory budget"
EDGEZO = [sys.executable, "-m", "edgezo.cli"]
COMMON = ["--data", "movie-reviews", "--batch-size", "16", "--seed", "0", "--n-valid", "500", "--json"]
BP_VARIANTS = {"bp": [], "bp-ckpt": ["--gradient-checkpointing"]}
# MeZO learning rates: each built-in model's default (edgezo.store, where the Gemma-3-270M evidence is), chosen on
# the validation split: 1e-3 was tuned on SmolLM2-135M; on Gemma-3-270M 1e-3 and 3e-4 diverged.
MEZO_LEARNING_RATES = {name: MODELS[name].mezo_learning_rate for name in ("smollm2-135m", "gemma3-270m")}


def parse_learning_rates(text: str) -> dict:
    rates = dict(MEZO_LEARNING_RATES)
    for item in filter(None, text.split(",")):
        model, _, lr = item.partition("=")
        if model not in rates:
            raise argparse.ArgumentTypeError(f"unknown model {model!r}; choose from {', '.join(rates)}")
        rates[model] = float(lr)
    return rates


def predict(model: str, method: str, steps: int) -> int:
    """`edgezo memory` for the run: the same data, batch and steps, so the same longest batch."""
    result = run_json([*EDGEZO, "memory", "--model", model, "--method", method, "--data", "movie-reviews",
                       "--batch-size", "16", "--steps", str(steps), "--json"], f"edgezo memory {model} {method}")
    return int(result["predicted_bytes"])


def choose_budget(predictions: dict) -> int:
    """Midway between the cheapest BP on SmolLM2 and the cheapest BP on Gemma, if MeZO on Gemma fits there."""
    bp_small = min(predictions["smollm2-135m"][m] for m in BP_VARIANTS)
    bp_large = min(predictions["gemma3-270m"][m] for m in BP_VARIANTS)
    mezo_large = predictions["gemma3-270m"]["mezo"]
    if not bp_small < bp_large:
        sys.exit(f"no budget separates BP on the two models (predicted {mib(bp_small)} vs {mib(bp_large)})")
    budget = (bp_small + bp_large) // 2 // 2**20 * 2**20
    if mezo_large > budget:
        sys.exit(f"MeZO on Gemma ({mib(mezo_large)}) does not fit the budget {mib(budget)}")
    return budget


def check_budget(predictions: dict, budget: int) -> dict:
    fits = {model: {method: p <= budget for method, p in per_model.items()} for model, per_model in predictions.items()}
    ok = (any(fits["smollm2-135m"][m] for m in BP_VARIANTS) and not any(fits["gemma3-270m"][m] for m in BP_VARIANTS)
          and fits["gemma3-270m"]["mezo"])
    if not ok:
        sys.exit(f"budget {mib(budget)} does not separate the methods: {fits}")
    return fits


def train(name: str, command: str, model: str, steps: int, eval_every: int, budget: int, work: Path,
          threads: int, extra: list[str]) -> dict:
    """One run in a fresh process, recorded in its run directory: a rerun of the experiment reuses a finished run
    with the same command and continues an interrupted MeZO run from its checkpoint (--resume)."""
    out = work / name
    cmd = [*EDGEZO, command, "--model", model, *COMMON, "--steps", str(steps), "--eval-every", str(eval_every),
           "--max-memory", str(budget), "--threads", str(threads), "--out", str(out), *extra]
    record_path, started_path = out / "experiment-run.json", out / "experiment-command.json"
    if record_path.exists() and (record := json.loads(record_path.read_text()))["command_line"] == cmd[2:]:
        print(f"== {name}: finished earlier, reusing {record_path}", file=sys.stderr, flush=True)
        return record
    checkpoint_step = json.loads((out / "state.json").read_text())["step"] if (out / "state.json").exists() else None
    resumed_from = None
    if (command == "finetune" and checkpoint_step is not None and checkpoint_step <= steps and started_path.exists()
            and without_length(json.loads(started_path.read_text())) == without_length(cmd[2:])):
        resumed_from = checkpoint_step  # interrupted, or extended (--mezo-steps, --gemma-mezo-steps)
    elif out.exists():
        shutil.rmtree(out)  # an interrupted BP run (reference runs do not resume) or another command: start over
    out.mkdir(parents=True, exist_ok=True)
    started_path.write_text(json.dumps(cmd[2:]) + "\n")
    print(f"== {name}: {' '.join(cmd[2:])}" + (f" (resuming from step {resumed_from})" if resumed_from else ""),
          file=sys.stderr, flush=True)
    result = run_json(cmd + (["--resume"] if resumed_from is not None else []), name)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [[e["train_seconds"], e["valid_accuracy"], e["step"]] for e in lines if "valid_accuracy" in e]
    test = run_json([*EDGEZO, "eval", "--model", model, "--adapter", str(out), "--split", "test",
                     "--threads", str(threads), "--json"], f"{name} test eval")
    record = {"name": name, "command": command, "model": model, "steps": steps, "run_dir": str(out),
              "command_line": cmd[2:], "resumed_from_step": resumed_from,
              "peak_rss_bytes": result["_process"]["peak_rss_bytes"], "train_seconds": result["train_seconds"],
              "median_step_seconds": summary([e["seconds"] for e in lines if "seconds" in e])["median"],
              "valid_curve": curve, "final_valid_accuracy": curve[-1][1],
              "test_accuracy": test["accuracy"], "test_loss": test["loss"]}
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def without_length(command_line: list[str]) -> list[str]:
    """A command line without --steps and --eval-every: a MeZO run continued to more steps is the same run (the
    learning rate is constant, so steps 1..N are the same whatever the total)."""
    drop = {i + 1 for i, arg in enumerate(command_line) if arg in ("--steps", "--eval-every")}
    return [arg for i, arg in enumerate(command_line) if i not in drop and arg not in ("--steps", "--eval-every")]


def refused(model: str, variant: str, steps: int, budget: int, work: Path) -> str:
    """BP on the larger model under the budget, for as many steps as BP runs on the smaller one (the prediction
    takes the longest batch of those steps): must exit 1 before training, naming the prediction."""
    cmd = [*EDGEZO, "reference-bp", "--model", model, *COMMON, "--steps", str(steps), "--max-memory", str(budget),
           "--out", str(work / f"refused-{variant}"), *BP_VARIANTS[variant]]
    done = run_fresh(cmd)
    message = done["stderr"].strip().splitlines()[-1] if done["stderr"].strip() else ""
    if done["returncode"] != 1 or "exceeds the memory budget" not in message:
        sys.exit(f"BP {variant} on {model} was not refused under {mib(budget)}: exit {done['returncode']}\n{done['stderr'][-2000:]}")
    return message


def overtakes(challenger: dict, incumbent: dict) -> float | None:
    """Training seconds after which the challenger's validation accuracy stays at or above the incumbent's final."""
    target = incumbent["final_valid_accuracy"]
    for i, (seconds, accuracy, _) in enumerate(challenger["valid_curve"]):
        if all(a >= target for _, a, _ in challenger["valid_curve"][i:]):
            return seconds
    return None


def plot(runs: list[dict], budget: int, cores: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        seconds, accuracy, _ = zip(*run["valid_curve"])
        ax.plot([s / 60 for s in seconds], accuracy, marker="o", label=f"{run['name']} (peak {mib(run['peak_rss_bytes'])})")
    ax.set_xlabel("training wall-clock (min), evaluation excluded")
    ax.set_ylabel("validation accuracy (500 reviews)")
    ax.set_title(f"movie-reviews under a {mib(budget)} budget ({cores}-core CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def render(result: dict, image: str = "budget_experiment.png") -> str:
    """Markdown (also used by bench/report.py, which links the plot from the README's directory)."""
    runs = {r["name"]: r for r in result["runs"]}
    p, budget = result["predictions"], result["budget_bytes"]
    rates = ", ".join(f"{m} {lr:g}" for m, lr in result["mezo_learning_rates"].items())
    text = [f"Budget **{mib(budget)}**; movie-reviews, batch 16, seed 0, LoRA rank 16 on attn_k/attn_v, "
            f"{result['threads']} threads; BP: AdamW lr 1e-3 ({result['bp_variant']}); MeZO (Q4_0 bases) lr {rates}. "
            "Predicted peak RSS (`edgezo memory`, the runs' arguments):\n\n",
            table(["model", *p["smollm2-135m"]],
                  [[m, *[f"{mib(v)}{' fits' if v <= budget else ''}" for v in per.values()]] for m, per in p.items()]),
            "\nBP on Gemma-3-270M under the budget (`edgezo reference-bp --max-memory`) refuses to start:\n\n",
            *[f"- {variant}: `{message}`\n" for variant, message in result["refusals"].items()],
            "\n",
            table(["run", "steps", "median s/step", "train time", "peak RSS (measured)", "valid acc start -> end (best)",
                   "test acc (1000)"],
                  [[r["name"], r["steps"], f"{r['median_step_seconds']:.2f}", f"{r['train_seconds'] / 60:.1f} min",
                    mib(r["peak_rss_bytes"]),
                    f"{r['valid_curve'][0][1]:.3f} -> {r['final_valid_accuracy']:.3f} "
                    f"({max(a for _, a, _ in r['valid_curve']):.3f})", f"{r['test_accuracy']:.3f}"]
                   for r in result["runs"]]),
            f"\nValidation: 500 held-out reviews against cumulative training wall-clock (evaluations excluded); "
            f"plot: [{Path(image).name}]({image}).\n"]
    if "mezo-gemma" in runs and "bp-smollm2" in runs:
        t = overtakes(runs["mezo-gemma"], runs["bp-smollm2"])
        text.append("\n" + (f"MeZO on Gemma-3-270M stays at or above BP-on-SmolLM2's final validation accuracy from "
                             f"{t / 60:.1f} min of training on." if t is not None else
                             "MeZO on Gemma-3-270M did not stay at or above BP-on-SmolLM2's final validation accuracy "
                             "within this run.") + "\n")
    resumed = [f"{r['name']} from step {r['resumed_from_step']}" for r in result["runs"] if r.get("resumed_from_step")]
    if resumed:
        text.append(f"\nContinued from a checkpoint (exact resume, the training clock continues): {', '.join(resumed)}.\n")
    return "".join(text) + f"\n{provenance(result)}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, help="bytes (default: chosen from the predictions)")
    parser.add_argument("--bp-steps", type=int, default=250)
    parser.add_argument("--mezo-steps", type=int, default=800)
    parser.add_argument("--gemma-mezo-steps", type=int, help="steps of MeZO on Gemma only [--mezo-steps]; more than "
                        "before continues the finished run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="run directories [runs/budget, runs/budget-quick with --quick]")
    parser.add_argument("--mezo-lr", type=parse_learning_rates, default=dict(MEZO_LEARNING_RATES),
                        help="MODEL=LR,... MeZO learning rates [%(default)s]")
    parser.add_argument("--quick", action="store_true", help="a few steps per run (pipeline check)")
    args = parser.parse_args()
    if args.quick:
        args.bp_steps, args.mezo_steps, args.gemma_mezo_steps = 4, 8, None
    args.work = args.work or ROOT / "runs" / ("budget-quick" if args.quick else "budget")
    gemma_steps = args.gemma_mezo_steps or args.mezo_steps
    bp_every, mezo_every, gemma_every = (max(1, args.bp_steps // 5), max(1, args.mezo_steps // 8),
                                         max(1, gemma_steps // 8))
    args.work.mkdir(parents=True, exist_ok=True)

    models = ("smollm2-135m", "gemma3-270m")
    mezo_steps = {"smollm2-135m": args.mezo_steps, "gemma3-270m": gemma_steps}
    predictions = {m: {method: predict(m, method, mezo_steps[m] if method == "mezo" else args.bp_steps)
                       for method in ("mezo", *BP_VARIANTS)} for m in models}
    budget = args.budget or choose_budget(predictions)
    check_budget(predictions, budget)
    print(f"budget {mib(budget)}: {json.dumps(predictions)}", file=sys.stderr)
    refusals = {variant: refused("gemma3-270m", variant, args.bp_steps, budget, args.work) for variant in BP_VARIANTS}
    bp_variant = min((v for v in BP_VARIANTS if predictions["smollm2-135m"][v] <= budget),
                     key=lambda v: v != "bp")  # without checkpointing if it fits: it is faster
    runs = [
        train("bp-smollm2", "reference-bp", "smollm2-135m", args.bp_steps, bp_every, budget, args.work, args.threads,
              BP_VARIANTS[bp_variant]),
        train("mezo-gemma", "finetune", "gemma3-270m", gemma_steps, gemma_every, budget, args.work, args.threads,
              ["--learning-rate", str(args.mezo_lr["gemma3-270m"])]),
        train("mezo-smollm2", "finetune", "smollm2-135m", args.mezo_steps, mezo_every, budget, args.work, args.threads,
              ["--learning-rate", str(args.mezo_lr["smollm2-135m"])]),
    ]
    name = f"{NAME}_quick" if args.quick else NAME
    result = {"benchmark": NAME, "time": utc_now(), "machine": machine_info(), "threads": args.threads,
              "budget_bytes": budget, "predictions": predictions, "refusals": refusals, "bp_variant": bp_variant,
              "runs": runs, "mezo_learning_rates": args.mezo_lr, "quick": args.quick,
              "note": "pipeline check (--quick)" if args.quick else ""}
    plot(runs, budget, result["machine"]["cores"], RESULTS / f"{name}.png")
    publish(name, TITLE, result, render(result, f"{name}.png"), as_json=False)


if __name__ == "__main__":
    main()
