"""Time to accuracy on movie-reviews: held-out accuracy against training wall-clock, edgezo MeZO vs torch BP.

    python -m bench.time_to_accuracy --mezo-run RUN_DIR --bp-run RUN_DIR          # plot two finished runs
    python -m bench.time_to_accuracy --launch [--mezo-steps 400 --bp-steps 100]   # run both first, then plot

Each run directory's metrics.jsonl holds eval lines {step, valid_accuracy, valid_loss, n_valid, train_seconds},
where train_seconds is the cumulative wall-clock of training steps only (evaluations excluded), written the same
way by `edgezo finetune` and `edgezo reference-bp`. With --launch the two runs go in fresh processes, one after the
other, with the same model, data, batch, LoRA, seed and validation slice (MeZO: edgezo's defaults, llama.cpp Q4_0;
BP: AdamW on the same GGUF dequantized to float32), and their peak RSS is measured (ru_maxrss from wait4).
Writes bench/results/time_to_accuracy.{jsonl,md,png}: the curves, the final and best accuracy of each method, and
the training seconds each needed to first reach each --thresholds accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import common

NAME = "time_to_accuracy"
TITLE = "Time to accuracy: edgezo MeZO vs torch BP"
METHODS = {"mezo": "edgezo MeZO (llama.cpp Q4_0)", "bp": "torch BP + AdamW (f32)"}


def read_curve(run_dir: str | Path) -> list[dict]:
    """The eval lines of a run's metrics.jsonl, in step order: [{step, train_seconds, valid_accuracy, valid_loss}]."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no such metrics log (is {run_dir} a run directory?)")
    curve = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            raise SystemExit(f"{path}:{number}: not JSON") from None
        if "valid_accuracy" in event:
            if "train_seconds" not in event:
                raise SystemExit(f"{path}:{number}: eval line without train_seconds (a run from before that field existed)")
            curve.append({k: event.get(k) for k in ("step", "train_seconds", "valid_accuracy", "valid_loss", "n_valid")})
    if not curve:
        raise SystemExit(f"{path}: no evaluation lines (valid_accuracy); run with a validation split and --eval-every")
    return sorted(curve, key=lambda e: e["step"])


def time_to(curve: list[dict], threshold: float) -> float | None:
    """Training seconds at the first evaluation reaching `threshold` accuracy, None if never."""
    return next((e["train_seconds"] for e in curve if e["valid_accuracy"] >= threshold), None)


def run_info(run_dir: str | Path) -> dict:
    config_path = Path(run_dir) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    model_path = config.get("model_path")
    return {"run_dir": str(run_dir), "config": config,
            "model_sha256": common.sha256(model_path) if model_path and Path(model_path).exists() else None}


def summarise(curves: dict[str, list[dict]], thresholds: list[float]) -> dict:
    out = {}
    for method, curve in curves.items():
        out[method] = {"final_accuracy": curve[-1]["valid_accuracy"], "best_accuracy": max(e["valid_accuracy"] for e in curve),
                       "steps": curve[-1]["step"], "train_seconds": curve[-1]["train_seconds"],
                       "time_to": {f"{t:.3f}": time_to(curve, t) for t in thresholds}}
    return out


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for method, curve in curves.items():
        ax.plot([e["train_seconds"] for e in curve], [100 * e["valid_accuracy"] for e in curve], marker="o",
                markersize=3, label=METHODS.get(method, method))
    ax.set_xlabel("training wall-clock (s, evaluations excluded)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---- launching the two runs -----------------------------------------------------------------------------------
def launch(args, method: str, out: Path) -> dict:
    steps, eval_every = (args.mezo_steps, args.mezo_eval_every) if method == "mezo" else (args.bp_steps, args.bp_eval_every)
    command = ["finetune"] if method == "mezo" else ["reference-bp", "--learning-rate", str(args.bp_learning_rate)]
    cmd = [sys.executable, "-m", "edgezo.cli", *command, "--model", args.model, "--quant", args.quant, "--data",
           "movie-reviews", "--steps", str(steps), "--eval-every", str(eval_every), "--n-valid", str(args.n_valid),
           "--batch-size", "16", "--seed", str(args.seed), "--threads", str(args.threads), "--out", str(out), "--json"]
    print(f"{METHODS[method]}: {steps} steps -> {out}", file=sys.stderr, flush=True)
    raw = common.run_json(cmd, METHODS[method])
    return {"peak_rss_bytes": raw["_process"]["peak_rss_bytes"], "process_seconds": raw["_process"]["seconds"],
            "valid_accuracy": raw.get("valid_accuracy"), "steps": steps, "eval_every": eval_every}


def run(args) -> dict:
    machine = common.machine_info()
    launched = {}
    if args.launch:
        root = Path(args.out_dir)
        for method in ("mezo", "bp"):
            out = root / method
            if (out / "metrics.jsonl").exists():
                raise SystemExit(f"{out} already holds a run; choose another --out-dir")
            launched[method] = launch(args, method, out)
        args.mezo_run, args.bp_run = str(root / "mezo"), str(root / "bp")
    if not (args.mezo_run and args.bp_run):
        raise SystemExit("give --mezo-run and --bp-run, or --launch")
    runs = {"mezo": args.mezo_run, "bp": args.bp_run}
    curves = {m: read_curve(d) for m, d in runs.items()}
    return {"benchmark": NAME, "curves": curves, "summary": summarise(curves, args.thresholds),
            "thresholds": args.thresholds, "runs": {m: run_info(d) for m, d in runs.items()}, "launched": launched,
            "seed": args.seed if args.launch else None, "note": args.note, "machine": machine,
            "load_average_end": common.load_average(), "time": common.utc_now()}


def render(result: dict, image: str = "time_to_accuracy.png") -> str:
    """Markdown table (also used by bench/report.py, which links the plot from docs/)."""
    rows = []
    for method, s in result["summary"].items():
        rss = result.get("launched", {}).get(method, {}).get("peak_rss_bytes")
        rows.append([METHODS.get(method, method), s["steps"], f"{s['train_seconds']:.0f} s",
                     f"{100 * s['final_accuracy']:.1f} %", f"{100 * s['best_accuracy']:.1f} %",
                     *[("-" if s["time_to"][k] is None else f"{s['time_to'][k]:.0f} s") for k in sorted(s["time_to"])],
                     common.mib(rss) if rss else "n/a"])
    thresholds = sorted(next(iter(result["summary"].values()))["time_to"])
    head = ["method", "steps", "training time", "final valid acc", "best valid acc",
            *[f"time to {100 * float(t):.0f} %" for t in thresholds], "peak RSS"]
    n_valid = next(iter(result["curves"].values()))[-1].get("n_valid")
    seed = result.get("seed")
    return (common.table(head, rows)
            + f"\nValidation accuracy on {n_valid} movie-review validation examples against cumulative training "
              f"wall-clock (evaluations excluded), from each run's metrics.jsonl"
            + (f", seed {seed}" if seed is not None else "")
            + f"; plot: [{Path(image).name}]({image}).\n\n{common.provenance(result)}\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mezo-run", help="run directory of `edgezo finetune`")
    p.add_argument("--bp-run", help="run directory of `edgezo reference-bp`")
    p.add_argument("--launch", action="store_true", help="run both first (in --out-dir)")
    p.add_argument("--out-dir", default="runs/time_to_accuracy", help="[%(default)s]")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default="q4_0")
    p.add_argument("--mezo-steps", type=int, default=400)
    p.add_argument("--mezo-eval-every", type=int, default=50)
    p.add_argument("--bp-steps", type=int, default=100)
    p.add_argument("--bp-eval-every", type=int, default=10)
    p.add_argument("--bp-learning-rate", type=float, default=1e-3)
    p.add_argument("--n-valid", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--thresholds", default="0.80,0.82,0.84", help="accuracies to time [%(default)s]")
    p.add_argument("--note", default="", help="free text stored with the result (e.g. 'measured under load')")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.thresholds = [float(t) for t in args.thresholds.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    plot(result["curves"], common.RESULTS / f"{NAME}.png",
         f"{result['runs']['mezo']['config'].get('model', '')}, movie-reviews: validation accuracy vs training time")
    common.publish(NAME, TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
