"""Predicted (edgezo.memory) against measured peak RSS of llama.cpp runs, each measured in a fresh process.

    python bench/memory_validation.py [--threads 2] [--steps 3]

For each model x quant x shape x method a child process does what bench/mezo_step.py's children do (engine,
classification scoring of a movie-review batch; for MeZO the default LoRA adapter and full MeZO steps) and
reports its VmHWM. The parent predicts the same run from the GGUF header and the run's shape (batch, context per
sequence, tokens actually decoded) and writes bench/results/memory_validation.jsonl (appended) and
bench/results/memory_validation.md (the latest table). Target: every prediction within 10 % of the measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = [("smollm2-135m", "q4_0"), ("smollm2-135m", "q8_0"), ("gemma3-270m", "q4_0")]
SHAPES = [(16, 256), (4, 512)]  # (batch size = n_seq_max, KV cells per sequence)
METHODS = ["inference", "mezo"]
TARGET_ERROR = 0.10


def child(args) -> dict:
    """Runs in a fresh process: one configuration, prints one JSON line."""
    from edgezo import store
    from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info
    from edgezo.data import build_examples, build_task, read_jsonl
    from edgezo.engine import Engine, EngineConfig
    from edgezo.files import peak_rss_bytes
    from edgezo.mezo import MezoConfig, mezo_step
    from edgezo.objective import loss_function, score

    model_path = store.resolve_model(args.model, args.quant)
    files, template = store.resolve_data("movie-reviews")
    base = read_base_model_info(model_path)
    engine = Engine(model_path, EngineConfig(n_seq_max=args.batch_size, n_ctx_per_seq=args.ctx, n_threads=args.threads))
    records = read_jsonl(files.train)
    task = build_task(records, files.train, engine, template, None)
    batch = build_examples(records[: args.batch_size], files.train, task, engine, args.ctx)
    if args.method == "inference":
        for _ in range(args.steps):
            score(engine, batch, task)
    else:
        adapter = LoraAdapter.init(base, LoraConfig(), seed=0)
        engine.set_adapter(adapter)
        loss_fn = loss_function(engine, batch, task)
        for step in range(args.steps):
            mezo_step(adapter.tensors, loss_fn, MezoConfig(), 0, step, args.steps)
    return {"peak_rss_bytes": peak_rss_bytes(), "n_tokens": sum(len(ex.tokens) for ex in batch),
            "model_path": str(model_path)}


def measure(args, model: str, quant: str, batch_size: int, ctx: int, method: str) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--model", model, "--quant", quant, "--batch-size",
           str(batch_size), "--ctx", str(ctx), "--threads", str(args.threads), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{model} {quant} {method} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def validate(args, model: str, quant: str, batch_size: int, ctx: int, method: str) -> dict:
    from edgezo.adapter import LoraConfig, config_dict
    from edgezo.memory import predict_llama_cpp

    measured = measure(args, model, quant, batch_size, ctx, method)
    tokens_per_seq = -(-measured["n_tokens"] // batch_size)
    prediction = predict_llama_cpp(measured["model_path"], method, batch_size, ctx, LoraConfig(), n_tokens_per_seq=tokens_per_seq)
    error = prediction.total_bytes / measured["peak_rss_bytes"] - 1
    return {"benchmark": "memory_validation", "model": model, "quant": quant, "method": method, "batch_size": batch_size,
            "n_ctx_per_seq": ctx, "n_tokens": measured["n_tokens"], "measured_bytes": measured["peak_rss_bytes"],
            "predicted_bytes": prediction.total_bytes, "error": error, "breakdown": prediction.breakdown,
            "lora": config_dict(LoraConfig()) if method == "mezo" else None, "threads": args.threads, "steps": args.steps,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | quant | method | batch x ctx/seq | tokens | predicted MiB | measured MiB | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['quant']} | {r['method']} | {r['batch_size']} x {r['n_ctx_per_seq']} | {r['n_tokens']} "
                     f"| {r['predicted_bytes'] / 2**20:.1f} | {r['measured_bytes'] / 2**20:.1f} | {100 * r['error']:+.1f} % |")
    worst = max(abs(r["error"]) for r in rows)
    lines.append(f"\nWorst error {100 * worst:.1f} % (target {100 * TARGET_ERROR:.0f} %); peak RSS = VmHWM of a fresh "
                 f"process; {rows[0]['steps']} scoring passes / MeZO steps per run, {rows[0]['threads']} threads.")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--model"), p.add_argument("--quant"), p.add_argument("--batch-size", type=int), p.add_argument("--ctx", type=int)
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.method = args.child
        print(json.dumps(child(args)))
        return 0
    rows = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    for model, quant in MODELS:
        for batch_size, ctx in SHAPES:
            for method in METHODS:
                row = validate(args, model, quant, batch_size, ctx, method)
                rows.append(row)
                with open(RESULTS / "memory_validation.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{model} {quant} {method} {batch_size}x{ctx}: predicted {row['predicted_bytes'] / 2**20:.1f} MiB, "
                      f"measured {row['measured_bytes'] / 2**20:.1f} MiB ({100 * row['error']:+.1f} %)", flush=True)
    table = markdown(rows)
    (RESULTS / "memory_validation.md").write_text("# Peak RSS: edgezo.memory prediction vs measurement\n\n" + table)
    print(table)
    return 0 if all(abs(r["error"]) <= TARGET_ERROR for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
