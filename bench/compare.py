"""Side by side in one run: edgezo MeZO (llama.cpp, Q4_0 and Q8_0) against torch MeZO and torch BP with AdamW.

    python -m bench.compare [--steps 40] [--warmup-steps 5] [--threads 0] [--configs all] [--quick] [--json]

Seven configurations train the same LoRA (rank 16, alpha 32 on attn_k,attn_v, edgezo's initial adapter for the
seed) of the same model (SmolLM2-135M) on the same movie-review batches (batch 16, same seed, --max-seq-len 256),
each as its own fresh `python -m edgezo.cli ... --json` process:
  mezo_q4_0      edgezo finetune --quant q4_0          MeZO through llama.cpp on the Q4_0 GGUF
  mezo_q8_0      edgezo finetune --quant q8_0          the same on Q8_0
  torch_mezo     edgezo reference-mezo                 MeZO on the torch model (the Q4_0 GGUF dequantized to f32)
  torch_bp       edgezo reference-bp                   PEFT LoRA, AdamW, float32
  torch_bp_ckpt  edgezo reference-bp --gradient-checkpointing
  torch_bp_quant_ckpt          edgezo reference-bp --base-dtype q4_0 --gradient-checkpointing (the Q4_0 blocks)
  torch_bp_quant_ckpt_release  the same with --release-freed-memory
Columns: peak RSS (the process's ru_maxrss from wait4, the kernel's high-water mark, the same for every tool),
median step time (the `seconds` of the step lines of metrics.jsonl, after --warmup-steps steps), steps/s =
1 / median step time, tokens/s = mean real (unpadded) tokens per measured step / median step time; a MeZO step
reads its batch twice, a BP step once forward and once backward, the count is of the batch either way.
Validation runs only once, at the end, on 16 examples (--n-valid). Before them, a one-step torch run fills
the cache of the GGUF -> HF conversion so that no measured process includes the conversion.
Ratios (targets): rss_torch_bp_over_mezo_q4_0 >= 5, step_torch_mezo_over_mezo_q4_0 >= 1.5.
Writes bench/results/compare.jsonl (appended) and bench/results/compare.md; --json prints the result.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import common

from edgezo.rundir import RunDir  # noqa: E402

NAME = "compare"
TITLE = "Side by side: edgezo MeZO vs torch MeZO vs torch BP"
TARGETS = {"rss_torch_bp_over_mezo_q4_0": 5.0, "step_torch_mezo_over_mezo_q4_0": 1.5}


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    command: tuple[str, ...]  # edgezo subcommand and its specific flags


CONFIGS = (
    Config("mezo_q4_0", "edgezo MeZO, llama.cpp Q4_0", ("finetune", "--quant", "q4_0")),
    Config("mezo_q8_0", "edgezo MeZO, llama.cpp Q8_0", ("finetune", "--quant", "q8_0")),
    Config("torch_mezo", "torch MeZO, f32", ("reference-mezo", "--quant", "q4_0")),
    Config("torch_bp", "torch BP + AdamW, f32", ("reference-bp", "--quant", "q4_0", "--dtype", "float32")),
    Config("torch_bp_ckpt", "torch BP + AdamW, f32, gradient checkpointing",
           ("reference-bp", "--quant", "q4_0", "--dtype", "float32", "--gradient-checkpointing")),
    Config("torch_bp_quant_ckpt", "torch BP + AdamW, Q4_0 blocks, gradient checkpointing",
           ("reference-bp", "--quant", "q4_0", "--base-dtype", "q4_0", "--gradient-checkpointing")),
    Config("torch_bp_quant_ckpt_release", "the same, --release-freed-memory",
           ("reference-bp", "--quant", "q4_0", "--base-dtype", "q4_0", "--gradient-checkpointing",
            "--release-freed-memory")),
)


def shared_flags(args, out: Path) -> list[str]:
    """The flags every configuration gets: same model, data, batch, sequence length, LoRA, seed."""
    return ["--model", args.model, "--data", "movie-reviews", "--steps", str(args.steps), "--batch-size",
            str(args.batch_size), "--max-seq-len", str(args.max_seq_len), "--rank", "16", "--alpha", "32",
            "--targets", "attn_k,attn_v", "--seed", str(args.seed), "--eval-every", "0", "--n-valid",
            str(args.n_valid), "--threads", str(args.threads), "--out", str(out), "--json"]


def edgezo_cmd(config: Config, args, out: Path, steps: int | None = None) -> list[str]:
    flags = shared_flags(args, out)
    if steps is not None:
        flags[flags.index("--steps") + 1] = str(steps)
    return [sys.executable, "-m", "edgezo.cli", *config.command, *flags]


# ---- tokens per step (a child process: the parent stays free of llama.cpp) ------------------------------------
def child_tokens(args) -> dict:
    """Real tokens in each step's batch, with the finetune command's own tokenization and batch order."""
    from edgezo import store
    from edgezo.data import batch_indices, build_examples, build_task, read_jsonl
    from edgezo.engine import Engine, EngineConfig

    engine = Engine(store.resolve_model(args.model, "q4_0"), EngineConfig(n_seq_max=1, n_ctx_per_seq=256))
    files, template = store.resolve_data("movie-reviews")
    records = read_jsonl(files.train)
    task = build_task(records, files.train, engine, template, None)
    examples = build_examples(records, files.train, task, engine, args.max_seq_len)
    per_step = [sum(len(examples[i].tokens) for i in batch_indices(len(examples), args.batch_size, args.seed, step))
                for step in range(args.steps)]
    longest = [max(len(examples[i].tokens) for i in batch_indices(len(examples), args.batch_size, args.seed, step))
               for step in range(args.steps)]
    return {"tokens_per_step": per_step, "longest_per_step": longest}


# ---- measurement ----------------------------------------------------------------------------------------------
def step_lines(run_dir: Path) -> list[dict]:
    return [e for e in RunDir(run_dir).events() if "loss" in e and "seconds" in e]


def measure(config: Config, args, tokens_per_step: list[int], workdir: Path) -> dict:
    out = workdir / config.key
    raw = common.run_json(edgezo_cmd(config, args, out), config.label, timeout=args.timeout)
    steps = step_lines(out)
    measured = [e for e in steps if e["step"] > args.warmup_steps]
    if not measured:
        raise common.ChildFailed(f"{config.label}: no steps after the {args.warmup_steps} warm-up steps")
    step = common.summary([e["seconds"] for e in measured])
    tokens = sum(tokens_per_step[e["step"] - 1] for e in measured) / len(measured)
    return {"label": config.label, "command": " ".join(config.command), "peak_rss_bytes": raw["_process"]["peak_rss_bytes"],
            "peak_rss_reported_bytes": raw.get("peak_rss_bytes"), "step_seconds": step,
            "steps_per_s": 1 / step["median"], "tokens_per_step": tokens, "tokens_per_s": tokens / step["median"],
            "final_loss": raw.get("final_loss"), "process_seconds": raw["_process"]["seconds"],
            "train_seconds": raw.get("train_seconds"), "n_measured_steps": len(measured),
            "median_step_seconds_reported": raw.get("median_step_seconds")}


def ratios(rows: dict) -> dict:
    """Ratios of figures measured in this run (None when a configuration was not run)."""
    def value(key, field):
        v = rows[key][field] if key in rows else None
        return v["median"] if isinstance(v, dict) else v

    def r(num, den, field):
        a, b = value(num, field), value(den, field)
        return None if a is None or b is None else common.ratio(a, b)

    return {"rss_torch_bp_over_mezo_q4_0": r("torch_bp", "mezo_q4_0", "peak_rss_bytes"),
            "step_torch_mezo_over_mezo_q4_0": r("torch_mezo", "mezo_q4_0", "step_seconds"),
            "rss_torch_bp_ckpt_over_mezo_q4_0": r("torch_bp_ckpt", "mezo_q4_0", "peak_rss_bytes"),
            "rss_torch_mezo_over_mezo_q4_0": r("torch_mezo", "mezo_q4_0", "peak_rss_bytes"),
            "step_torch_bp_over_mezo_q4_0": r("torch_bp", "mezo_q4_0", "step_seconds"),
            "step_mezo_q8_0_over_mezo_q4_0": r("mezo_q8_0", "mezo_q4_0", "step_seconds"),
            # what the lean heap trades: peak RSS and step time of BP on the Q4_0 blocks, with over without it
            "rss_release_over_heap": r("torch_bp_quant_ckpt_release", "torch_bp_quant_ckpt", "peak_rss_bytes"),
            "step_release_over_heap": r("torch_bp_quant_ckpt_release", "torch_bp_quant_ckpt", "step_seconds")}


def run(args) -> dict:
    from edgezo import store

    machine = common.machine_info()
    selected = [c for c in CONFIGS if args.configs == "all" or c.key in args.configs.split(",")]
    hashes = {q: common.sha256(store.resolve_model(args.model, q)) for q in ("q4_0", "q8_0")}  # requantize first
    tokens = common.run_json(common.python_cmd(__spec__.name, "--child", "tokens", "--model", args.model, "--steps",
                                               args.steps, "--batch-size", args.batch_size, "--seed", args.seed,
                                               "--max-seq-len", args.max_seq_len), "token count")
    workdir = Path(tempfile.mkdtemp(prefix="edgezo-compare-", dir=args.workdir))
    rows = {}
    try:
        torch_configs = [c for c in selected if c.command[0].startswith("reference")]
        if torch_configs:  # one step, unmeasured: caches the GGUF -> HF conversion the torch runs load
            print("warm-up: one torch step (fills the HF conversion cache)", file=sys.stderr, flush=True)
            common.run_json(edgezo_cmd(torch_configs[0], args, workdir / "warmup", steps=1), "torch warm-up",
                            timeout=args.timeout)
        for config in selected:
            print(f"{config.label} ...", file=sys.stderr, flush=True)
            rows[config.key] = measure(config, args, tokens["tokens_per_step"], workdir)
            row = rows[config.key]
            print(f"  peak RSS {common.mib(row['peak_rss_bytes'])}, median step {row['step_seconds']['median']:.3f} s, "
                  f"{row['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    finally:
        if not args.keep_runs:
            shutil.rmtree(workdir, ignore_errors=True)
    return {"benchmark": NAME, **ratios(rows), "targets": TARGETS, "rows": rows, "model": args.model,
            "model_sha256": hashes, "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
            "lora": {"rank": 16, "alpha": 32.0, "targets": ["attn_k", "attn_v"]}, "steps": args.steps,
            "warmup_steps": args.warmup_steps, "n_valid": args.n_valid, "threads": args.threads, "seed": args.seed,
            "mean_tokens_per_step": sum(tokens["tokens_per_step"]) / len(tokens["tokens_per_step"]),
            "mean_longest_per_step": sum(tokens["longest_per_step"]) / len(tokens["longest_per_step"]),
            "quick": args.quick, "note": args.note, "machine": machine, "load_average_end": common.load_average(),
            "time": common.utc_now(), "run_dir": str(workdir) if args.keep_runs else None}


def render(result: dict) -> str:
    rows = []
    for r in result["rows"].values():
        rows.append([r["label"], common.mib(r["peak_rss_bytes"]), common.spread(r["step_seconds"]),
                     f"{r['steps_per_s']:.2f}", f"{r['tokens_per_s']:.0f}"])
    lines = [common.table(["configuration", "peak RSS", "step s: median (min-max)", "steps/s", "tokens/s"], rows)]
    checks = []
    for name, target in result["targets"].items():
        value = result.get(name)
        checks.append([f"`{name}`", common.fmt(value, 2), f">= {target:g}"])
    lines.append("\n" + common.table(["ratio", "value", "target"], checks))
    if result.get("rss_release_over_heap") is not None:
        lines.append(f"\n`--release-freed-memory` (freed tensors returned to the kernel at once) on BP with the Q4_0 "
                     f"blocks and checkpointing: peak RSS x{result['rss_release_over_heap']:.2f}, step time "
                     f"x{result['step_release_over_heap']:.2f}.\n")
    lora = result["lora"]
    lines.append(f"\n{result['model']}, movie-reviews, batch {result['batch_size']} (mean {result['mean_tokens_per_step']:.0f} "
                 f"real tokens per batch, longest sequence {result['mean_longest_per_step']:.0f} on average; torch pads to "
                 f"it), LoRA rank {lora['rank']} alpha {lora['alpha']:g} on {','.join(lora['targets'])}, seed "
                 f"{result['seed']}, threads {result['threads'] or 'all'}; {result['steps']} steps per fresh process, the "
                 f"first {result['warmup_steps']} not timed. Peak RSS = ru_maxrss of each process.\n\n"
                 f"{common.provenance(result)}\n")
    return "".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=40, help="steps per configuration [%(default)s]")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the statistics [%(default)s]")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--n-valid", type=int, default=16, help="validation examples (one evaluation, at the end) [%(default)s]")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp / torch threads, 0: all cores [%(default)s]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default="all", help=f"comma-separated subset of {','.join(c.key for c in CONFIGS)} [all]")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per process [%(default)s]")
    p.add_argument("--workdir", type=common.work_dir, help="where the temporary run directories go [system temp]")
    p.add_argument("--keep-runs", action="store_true", help="keep the run directories")
    p.add_argument("--quick", action="store_true", help="8 steps per configuration, 2 of them warm-up (< 10 min)")
    p.add_argument("--note", default="", help="free text stored with the result (e.g. 'measured under load')")
    p.add_argument("--json", action="store_true", help="print the result (with the two ratios) as one JSON line")
    p.add_argument("--child", choices=["tokens"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup_steps = 8, 2
    if args.steps <= args.warmup_steps:
        p.error("--steps must exceed --warmup-steps")
    unknown = set(args.configs.split(",")) - {c.key for c in CONFIGS} - {"all"}
    if unknown:
        p.error(f"unknown --configs {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.child_or_publish(args, NAME, TITLE, child_tokens, run, render)


if __name__ == "__main__":
    sys.exit(common.run_main(main))
