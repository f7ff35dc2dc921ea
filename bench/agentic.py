"""Function calling on a real benchmark (BFCL simple_python, the built-in `bfcl` data): zero-shot accuracy of the
built-in models, the table later MeZO and BP runs are measured against.

    python -m bench.agentic zero-shot --work runs/agentic --threads 1
    python -m bench.agentic zero-shot --work runs/agentic --models qwen2.5-coder-1.5b --limit 50

Each model is evaluated by `edgezo eval --data bfcl --split test` in a fresh process (Q4_0 as every built-in, greedy
generation, the prompt edgezo.bfcl builds from the model's own chat template), on the first --limit test requests
(0: all 150). A model's finished evaluation is kept in --work and reused, so a long table can be filled in over
several invocations; the table shows every model evaluated so far.

MeZO against BP on this data, under one memory budget, held-out accuracy against training wall-clock: the budget
experiment's bfcl cell (`python -m bench.budget_experiment --cells bfcl.separate`; bench/budget_cells.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import common

NAME, TITLE = "agentic", "Function calling (BFCL simple_python): zero-shot accuracy of the built-in models"
MODELS = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m", "gemma3-270m")
METRICS = ("bfcl_accuracy", "name_accuracy", "valid_call_rate", "argument_accuracy", "lenient_accuracy", "loss")
# How each model is prompted (edgezo.bfcl.prompt_and_target picks it from the GGUF's chat template)
PROMPTS = {"qwen2.5-coder-0.5b": "tools in the chat template; <tool_call> JSON",
           "qwen2.5-coder-1.5b": "tools in the chat template; <tool_call> JSON",
           "smollm2-135m": "BFCL's system prompt in the chat template; Python call",
           "gemma3-270m": "no chat template: BFCL's system prompt as plain text; Python call"}


def zero_shot(model: str, work: Path, limit: int, threads: int, batch_size: int) -> dict:
    done = work / f"zero-shot-{model}-{limit or 'all'}.json"
    if done.exists():
        return json.loads(done.read_text())
    argv = [sys.executable, "-m", "edgezo.cli", "eval", "--model", model, "--data", "bfcl", "--split", "test",
            "--threads", str(threads), "--batch-size", str(batch_size), "--json"] + (["--limit", str(limit)] if limit else [])
    result = common.run_json(argv, f"zero-shot {model}", timeout=4 * 3600)
    row = {"model": model, "quant": "q4_0", "limit": limit, "prompt": PROMPTS.get(model, ""),
           "model_sha256": common.sha256(result["model"]), "machine": common.machine_info(),
           "peak_rss_bytes": result["_process"]["peak_rss_bytes"],
           **{k: result[k] for k in (*METRICS, "n_examples", "seconds")}}
    done.write_text(json.dumps(row))
    return row


def render(result: dict) -> str:
    rows = [[r["model"], r["quant"], r["n_examples"], f"{100 * r['bfcl_accuracy']:.1f}", f"{100 * r['name_accuracy']:.1f}",
             f"{100 * r['valid_call_rate']:.1f}", f"{100 * r['lenient_accuracy']:.1f}", f"{r['loss']:.3f}",
             f"{r['seconds']:.0f}", r["prompt"]] for r in result["runs"]]
    header = ["model", "quant", "test requests", "BFCL accuracy %", "name %", "valid call %", "lenient accuracy %",
              "target NLL", "eval s", "prompt and answer format"]
    text = common.table(header, rows)
    text += ("\nBFCL accuracy: BFCL's AST check of the simple category (edgezo.bfcl mirrors bfcl_eval's ast_checker) "
             "on the completion read as BFCL reads that format (<tool_call> blocks for the Qwen FC format, a Python "
             "call list for the prompting format); valid call: the completion reads as calls in that format; name: "
             "the first call's function is right; lenient accuracy: the same check on calls also read from a "
             "```json fence or bare JSON (what the model knew, format aside); target NLL: per token of the reference "
             "call. Greedy generation, budget twice the reference call's tokens plus 8. The first N requests of the "
             f"seeded test split (150 of BFCL's 400). Rows come from several invocations (the last: `--threads "
             f"{result['threads']}`), some beside other work: eval s are not comparable between rows.\n\n")
    return text + common.provenance(result) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["zero-shot"])
    p.add_argument("--work", type=common.work_dir, required=True, help="directory of the runs (created; reused)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated built-in models [%(default)s]")
    p.add_argument("--limit", type=int, default=0, help="first N test requests per model [all]")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for model in args.models.split(","):
        print(f"== zero-shot {model}", file=sys.stderr, flush=True)
        zero_shot(model, args.work, args.limit, args.threads, args.batch_size)
    runs = [json.loads(path.read_text()) for path in sorted(args.work.glob("zero-shot-*.json"))]
    runs.sort(key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else len(MODELS), -r["n_examples"]))
    result = {"benchmark": NAME, "mode": args.mode, "time": common.utc_now(), "machine": common.machine_info(),
              "threads": args.threads, "runs": runs}
    common.publish(NAME, TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
