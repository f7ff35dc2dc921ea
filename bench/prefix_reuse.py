"""Prefix reuse: the cost of the split path's parts over one full forward, against their ideal block fractions.

    python -m bench.prefix_reuse [--model smollm2-135m] [--quant q4_0] [--num-layers 6,12] [--repeats 10] [--json]

In one process, a full Engine and a SplitEngine on the same base (the weights are memory-mapped once), both with
a LoRA adapter (rank 16, k,v) on the last K blocks, score the same fixed batch of 16 movie-review prompts. Rounds
alternate, so the machine's drift hits every figure alike:
  forward   Engine.logits with the adapter (all L blocks)
  prefix    SplitEngine.block_inputs: blocks [0, L-K), the graph stopped at block L-K's input; ideal (L-K)/L
  eval      one evaluation on the suffix GGUF fed those hidden states: ideal K/L (plus the head, which both pay)
  step      a two-sided MeZO step (edgezo.mezo.zo_step) through each engine: the full one costs two forwards,
            the split one a prefix and two evaluations
Reported per K: each part over the forward, its ideal, eval_over_ideal (the issue's target: <= 1.15), and the
step speed-up full / split. The split logits equal the full ones bit for bit (tests/test_split.py).
Writes bench/results/prefix_reuse.jsonl (appended) and bench/results/prefix_reuse.md.
"""

from __future__ import annotations

import argparse
import sys

from bench import common

NAME = "prefix_reuse"
TITLE = "Prefix reuse: what the split path's parts cost over one full forward"
TARGET_EVAL_OVER_IDEAL = 1.15


def measure_k(args, model_path, base, task, batch, k: int) -> dict:
    from edgezo.adapter import LoraAdapter, LoraConfig
    from edgezo.engine import Engine, EngineConfig, SplitEngine
    from edgezo.mezo import MezoConfig, zo_step
    from edgezo.objective import loss_function
    from edgezo.split import split_files

    first = base.n_layers - k
    config = EngineConfig(n_seq_max=args.batch_size, n_ctx_per_seq=256, n_threads=args.threads)
    adapter = LoraAdapter.init(base, LoraConfig(layers=(first, None)), seed=args.seed)
    full, parts = Engine(model_path, config), SplitEngine(*split_files(model_path, first, base.n_layers), first, config,
                                                             cache_bytes=0)  # every split step pays its prefix
    seqs, last = [ex.tokens for ex in batch], [[len(ex.tokens) - 1] for ex in batch]
    hidden = parts.block_inputs(seqs)
    timings = {"forward": [], "prefix": [], "eval": [], "step_full": [], "step_split": []}
    try:
        for engine in (full, parts):
            engine.set_adapter(adapter)
        losses = {"step_full": loss_function(full, batch, task), "step_split": loss_function(parts, batch, task)}
        mezo, step = MezoConfig(), iter(range(10**6))

        def mezo_step(name):
            n = next(step)
            parts._last = None  # every split step pays its prefix pass, as a new batch would
            return lambda: zo_step(adapter.tensors, losses[name], mezo, args.seed, n, 10**6)

        calls = {"forward": lambda: full.logits(seqs, last, task.label_token_ids),
                 "prefix": lambda: parts.block_inputs(seqs),
                 "eval": lambda: parts.suffix.logits(seqs, last, task.label_token_ids, embeddings=hidden)}
        for _ in range(args.repeats):
            for name, fn in calls.items():
                timings[name] += common.timed(fn, 1, 1)
            for name in ("step_full", "step_split"):
                timings[name] += common.timed(mezo_step(name), 0, 1)
    finally:
        full.close()
        parts.close()
    med = {name: common.summary(values)["median"] for name, values in timings.items()}
    forward = med["forward"]
    return {"num_layers": k, "first_block": first, "n_layers": base.n_layers,
            "seconds": {name: common.summary(values) for name, values in timings.items()},
            "prefix_over_forward": med["prefix"] / forward, "prefix_ideal": first / base.n_layers,
            "eval_over_forward": med["eval"] / forward, "eval_ideal": k / base.n_layers,
            "eval_over_ideal": med["eval"] / forward / (k / base.n_layers),
            "step_speedup": med["step_full"] / med["step_split"],
            "step_speedup_ideal": 2 / (first / base.n_layers + 2 * k / base.n_layers)}


def run(args) -> dict:
    from edgezo import store
    from edgezo.adapter import read_base_model_info
    from edgezo.data import build_examples, build_task, read_jsonl
    from edgezo.engine import Vocabulary

    model_path = store.resolve_model(args.model, args.quant)
    base = read_base_model_info(model_path)
    files, template = store.resolve_data("movie-reviews")
    records = read_jsonl(files.train)
    with Vocabulary(model_path) as vocab:
        task = build_task(records, files.train, vocab, template, None)
        batch = build_examples(records[: args.batch_size], files.train, task, vocab, 256)
    rows = [measure_k(args, model_path, base, task, batch, k) for k in args.num_layers]
    return {"benchmark": NAME, "rows": rows, "target_eval_over_ideal": TARGET_EVAL_OVER_IDEAL,
            "model": args.model, "quant": args.quant, "model_sha256": common.sha256(model_path),
            "batch_size": args.batch_size, "n_tokens": sum(len(ex.tokens) for ex in batch), "repeats": args.repeats,
            "threads": args.threads, "seed": args.seed, "machine": common.machine_info(),
            "load_average_end": common.load_average(), "time": common.utc_now(), "note": args.note}


def render(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        rows.append([f"top {r['num_layers']} of {r['n_layers']} (split at block {r['first_block']})",
                     f"{r['prefix_over_forward']:.3f} (ideal {r['prefix_ideal']:.3f})",
                     f"{r['eval_over_forward']:.3f} (ideal {r['eval_ideal']:.3f})",
                     f"**{r['eval_over_ideal']:.2f}** (<= {result['target_eval_over_ideal']:.2f})",
                     f"{r['step_speedup']:.2f}x (ideal {r['step_speedup_ideal']:.2f}x)",
                     f"{r['seconds']['forward']['median']:.3f}"])
    return (common.table(["LoRA blocks", "prefix pass / forward", "split evaluation / forward", "evaluation / ideal",
                          "MeZO step full / split", "forward, s"], rows)
            + f"\n{result['model']} {result['quant']}, batch {result['batch_size']} movie-review prompts "
              f"({result['n_tokens']} tokens, label logits only), LoRA rank 16 on attn_k/attn_v of the top blocks, "
              f"seed {result['seed']}, threads {result['threads'] or 'all'}; medians of {result['repeats']} "
              f"alternating rounds in one process. The ideal split step is (prefix + 2 evaluations) in block "
              f"fractions; the head and the host's loss are paid by both paths.\n\n{common.provenance(result)}\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default="q4_0")
    p.add_argument("--num-layers", default="6,12", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    common.publish(NAME, TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
