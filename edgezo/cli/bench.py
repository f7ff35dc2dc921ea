"""`edgezo bench`: llama-bench's experience for fine-tuning, one table of this device's figures (edgezo.devicebench)."""

from __future__ import annotations

import csv
import io
from itertools import product
from pathlib import Path

from .. import store
from .output import ChildProgress, say

MIB = 2**20


def cmd_bench(args) -> tuple[dict, str]:
    """Resolve every --model x --quant (fetching / requantizing before any timing), then measure each combination
    with every --batch-size x --prompt-tokens x --gen-tokens in fresh processes. Text: markdown, or CSV (--csv)."""
    from ..devicebench import BenchConfig, BenchPoint, run_bench

    points = []
    for model, quant in product(args.model, args.quant or [None]):
        quant = store.effective_quant(model, quant)
        path = store.resolve_model(model, quant, log=say)
        quant = None if quant == "none" else quant
        points += [BenchPoint(model, quant, str(path), b, p, n)
                   for b, p, n in product(args.batch_size, args.prompt_tokens, args.gen_tokens)]
    config = BenchConfig(repeats=args.repeats, warmup=args.warmup, threads=args.threads, seed=args.seed, bp=args.bp,
                         timeout_s=args.timeout, busy_processes=args.busy, busy_nice=args.busy_nice)
    with ChildProgress("bench") as progress:
        result = run_bench(points, config, on_child=progress)
    return result, format_csv(result) if args.csv else format_markdown(result)


# ---- markdown ----------------------------------------------------------------------------------------------------
HEADER = ("model", "quant", "batch", "prompt", "gen", "pp tok/s", "tg tok/s", "MeZO step s", "step / 2 fwd",
          "MeZO peak RSS", "predicted", "BP step s", "BP peak RSS", "predicted")


def _mean_sd(row: dict, key: str, digits: int) -> str:
    return f"{row[key]:.{digits}f} ± {row[key + '_sd']:.{digits}f}"


def _cell(row: dict, key: str, digits: int = 0, failed: bool = False) -> str:
    """A figure as mean ± sd or MiB, 'failed' where its child crashed, '-' where nothing was measured."""
    if row[key] is None:
        return "failed" if failed else "-"
    if key.endswith("_bytes"):
        return f"{row[key] / MIB:.0f} MiB"
    return _mean_sd(row, key, digits)


def format_markdown(result: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * 5 + "---:|" * (len(HEADER) - 5)]
    notes = []
    for i, row in enumerate(result["rows"], 1):
        llama_failed = not row["details"]["llama"]["ok"]
        bp = row["details"]["bp"]
        bp_failed = bp is not None and not bp["ok"]
        cells = [Path(row["model"]).name, row["quant"], row["batch_size"], row["prompt_tokens"], row["gen_tokens"],
                 _cell(row, "pp_tokens_per_s", 1, llama_failed), _cell(row, "tg_tokens_per_s", 1, llama_failed),
                 _cell(row, "mezo_step_s", 3, llama_failed), _cell(row, "mezo_step_over_two_forwards", 3, llama_failed),
                 _cell(row, "mezo_peak_rss_bytes", failed=llama_failed), _cell(row, "mezo_predicted_rss_bytes"),
                 _cell(row, "bp_step_s", 3, bp_failed), _cell(row, "bp_peak_rss_bytes", failed=bp_failed),
                 _cell(row, "bp_predicted_rss_bytes")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
        if row["note"]:
            notes.append(f"row {i} {row['status']}: {row['note']}")
    if result["bp_skipped"]:
        notes.append(f"BP not measured: {result['bp_skipped']}.")
    return "\n".join(lines) + "\n\n" + footer(result) + "".join(f"\n{n}" for n in notes)


def busy_text(busy: dict) -> str:
    if not busy["processes"]:
        return ""
    priority = f"nice {busy['nice']}" if busy["nice"] else "normal priority"
    return f", **under {busy['processes']} busy loop(s) at {priority}** (--busy)"


def footer(result: dict) -> str:
    m = result["machine"]
    ok = [row["details"]["llama"]["result"] for row in result["rows"] if row["details"]["llama"]["ok"]]
    threads = sorted({r["n_threads"] for r in ok})
    versions = ", ".join(f"{name} {v}" for name, v in m["versions"].items() if v)
    return (f"{m['cpu'] or 'unknown CPU'}, {m['usable_cores']} of {m['n_cores']} cores usable, load average "
            f"{m['load_average'][0]:.2f} at the end{busy_text(result['busy'])}; "
            f"llama.cpp threads {'/'.join(map(str, threads)) or '-'}; "
            f"{versions}.\n"
            f"Mean ± sd of {result['repeats']} timed repetitions after {result['warmup']} warm-up, each row in fresh "
            f"processes ({result['seconds']:.0f} s in all). Synthetic batch: `batch` sequences of `prompt` tokens of "
            f"the model's own tokenizer. pp: the batch in one decode, logits at each last token; tg: `batch` "
            f"sequences generating `gen` tokens each from an empty context; MeZO step: one two-sided step of the "
            f"default LoRA (rank 16 on attn_k,attn_v) on the batch, and its ratio over two bare forwards of it; "
            f"peak RSS: the process's ru_maxrss after that short MeZO run, beside `edgezo memory`'s prediction; "
            f"BP: one AdamW step of `edgezo reference-bp` (float32) on the same batch.")


# ---- CSV ---------------------------------------------------------------------------------------------------------
def format_csv(result: dict) -> str:
    """One line per row with the fixed columns (edgezo.devicebench.COLUMNS); bytes and seconds unscaled, an empty
    cell where nothing was measured."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result["columns"])
    for row in result["rows"]:
        writer.writerow(["" if row[c] is None else row[c] for c in result["columns"]])
    return out.getvalue().rstrip("\n")
