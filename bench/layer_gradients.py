"""Which blocks carry the gradient MeZO sees: the squared projected gradient of LoRA-FA on each block range.

    python -m bench.layer_gradients --work runs/layer-gradients     # every range below (reruns reuse finished ones)

For a Gaussian direction z, E[(z . grad)^2] = |grad|^2, so the mean square of MeZO's projected gradients over a
few steps at a negligible learning rate (1e-12: the adapter does not move) measures the gradient energy of the
parameters being perturbed. Each range is one `edgezo finetune --lora-fa --layers A:B` on SmolLM2-135M Q4_0,
movie-reviews, batch 16, seed 0 (the same batches for every range), LoRA rank 16 on attn_k/attn_v.

What it decides: MeZO's usable learning rate scales about as 1/d (d perturbed parameters), so its progress per
step goes as energy / d ("density"); a step costs two forwards over all blocks, or with prefix reuse (ranges that
end at the top) a pass over the blocks below the range plus two over the range. Reported per range: energy (with
its standard error), its share of all blocks', d's share, the density relative to all blocks, the step cost in
forwards, and density / cost relative to all blocks (> 1: more progress per second than LoRA on every block).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from bench import common

from edgezo.rundir import RunDir  # noqa: E402

NAME, TITLE = "layer_gradients", "Which blocks carry MeZO's gradient: LoRA-FA gradient energy by block range"
N_LAYERS = 30  # SmolLM2-135M
RANGES = {"all": (0, 30), "bottom6": (0, 6), "6-12": (6, 12), "12-18": (12, 18), "18-24": (18, 24), "top6": (24, 30),
          "top3": (27, 30), "top12": (18, 30), "top18": (12, 30)}
COMMON = ["--model", "smollm2-135m", "--quant", "q4_0", "--data", "movie-reviews", "--batch-size", "16", "--seed", "0",
          "--lora-fa", "--learning-rate", "1e-12", "--eval-every", "0", "--n-valid", "16", "--json"]


def run_range(name: str, work: Path, steps: int, threads: int) -> dict:
    start, stop = RANGES[name]
    out = work / name
    if not (out / "adapter.gguf").exists():
        argv = ["-m", "edgezo.cli", "finetune", *COMMON, "--layers", f"{start}:{stop}", "--steps", str(steps),
                "--threads", str(threads), "--out", str(out)]
        common.run_json([sys.executable, *argv], name, timeout=3600)
    lines = RunDir(out).events()
    squares = [g * g for e in lines if "loss" in e for g in e["projected_grads"]]
    return {"name": name, "layers": [start, stop], "n_steps": len(squares), "energy": sum(squares) / len(squares),
            "energy_se": statistics_se(squares)}


def statistics_se(values: list[float]) -> float:
    """Standard error of the mean."""
    return statistics.stdev(values) / math.sqrt(len(values))


def step_cost(start: int, stop: int, n_layers: int = N_LAYERS) -> float:
    """Forwards per two-sided MeZO step: with prefix reuse (the range ends at the top) one pass below it and two
    over it; otherwise two full forwards."""
    if stop == n_layers and start > 0:
        return (start + 2 * (stop - start)) / n_layers
    return 2.0


def summarize(rows: list[dict]) -> list[dict]:
    full = next(r for r in rows if r["name"] == "all")
    out = []
    for r in rows:
        start, stop = r["layers"]
        params_share = (stop - start) / N_LAYERS  # every block's k, v B has the same size
        density = (r["energy"] / full["energy"]) / params_share
        cost = step_cost(start, stop)
        out.append({**r, "energy_share": r["energy"] / full["energy"], "params_share": params_share,
                    "density_vs_all": density, "step_forwards": cost, "progress_per_second_vs_all": density * 2.0 / cost})
    return out


def render(result: dict) -> str:
    rows = [[r["name"], f"{r['layers'][0]}:{r['layers'][1]}", f"{r['energy']:.3f} ± {r['energy_se']:.3f}",
             f"{r['energy_share']:.2f}", f"{r['params_share']:.2f}", f"{r['density_vs_all']:.2f}",
             f"{r['step_forwards']:.2f}", f"**{r['progress_per_second_vs_all']:.2f}**"] for r in result["rows"]]
    return (common.table(["range", "blocks", "E[g^2] ± se", "energy / all", "params / all", "density / all",
                          "forwards per step", "progress per second / all"], rows)
            + f"\nsmollm2-135m q4_0, movie-reviews, batch 16, seed 0, LoRA-FA rank 16 on attn_k,attn_v of the blocks "
              f"given, {result['steps']} steps at learning rate 1e-12 (the adapter does not move) per range. The "
              f"estimates are noisy (a standard error of 20-35 % of the mean); shares are ratios of separate runs, so "
              f"their sum over disjoint ranges is not exactly 1. The last column is the model's prediction, not a "
              f"training measurement: see bench/estimators.py for accuracy against time.\n\n"
            + common.provenance(result) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=common.work_dir, required=True, help="directory of the runs (created; reused to continue)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    machine = common.machine_info()
    rows = [run_range(name, args.work, args.steps, args.threads) for name in RANGES]
    result = {"benchmark": NAME, "time": common.utc_now(), "machine": machine, "steps": args.steps,
              "rows": summarize(rows), "load_average_end": common.load_average()}
    common.publish(NAME, TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
