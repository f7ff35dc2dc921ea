"""Predicted (edgezo.memory) against measured peak RSS, each run a fresh `python -m edgezo.cli` process.

    python -m bench.memory_validation [--work-dir DIR] [--threads 2] [--steps 2] [--models ...] [--methods ...]

Runs, for each model x setting x method, the real command and reads the `peak_rss_bytes` (VmHWM) it reports:
    inference  edgezo eval --split valid --limit N          (llama.cpp)
    mezo       edgezo finetune --steps S                     (llama.cpp, LoRA k,v rank 16)
    bp         edgezo reference-bp --steps S                 (torch float32, same LoRA, AdamW)
    bp-ckpt    edgezo reference-bp --steps S --gradient-checkpointing
    bp-quant   edgezo reference-bp --steps S --base-dtype q4_0 [--gradient-checkpointing: bp-quant-ckpt]
               (torch, the base kept in the Q4_0 file's blocks)
    bp*-release  the same BP method with --release-freed-memory (freed tensors returned to the kernel at once)
and predicts the same run with `edgezo memory --json` (the same arguments plus --method), so the table checks the
command users call. Settings: movie-reviews at batch 8 (padded ~55 tokens), and "long reviews" (eight reviews
joined per example, ~270 tokens) at batch 2 with --max-seq-len 512. Language-modelling settings (--settings
calls-b16,plans-b16,chat-b16; not in the default list): synthetic tool calls built by tool_data at batch 16, the loss
on every completion / assistant token (~28 and ~111 completion tokens, and a two-turn chat).

Models: the built-in SmolLM2-135M and Gemma-3-270M (Q4_0), the built-in Qwen2.5-Coder 0.5B and 1.5B (their
Q4_K_M files requantized to Q4_0 by llama.cpp, as edgezo does by default; out of sample: no constant was fitted on
them), and two randomly initialised llama models built here
(transformers, seed 0) with SmolLM2's tokenizer and 49,152-token vocabulary: random-360m (SmolLM2-360M's shape) and
random-1b (Llama-3.2-1B's shape with SmolLM2's vocabulary), saved as safetensors, converted with convert/hf_to_gguf.py
(F16) and quantized to Q4_0 by llama.cpp as `--quant q4_0` does. Everything is cached under --work-dir (its own
EDGEZO_HOME; built-in models are copied there from $EDGEZO_HOME or fetched), nothing is committed. The GGUF -> HF
conversion a model's first reference run does (cached in EDGEZO_HOME/hf) is done beforehand, outside the measured runs.
Writes bench/results/memory_validation.jsonl (appended) and bench/results/memory_validation.md (latest table).
Target: every prediction within 10 % of the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import common
from bench.common import RESULTS, ROOT, cpu_model

METHODS = ["inference", "mezo", "bp", "bp-ckpt", "bp-quant", "bp-quant-ckpt"]
# A BP method with this suffix runs with --release-freed-memory (freed tensors returned to the kernel at once).
RELEASE = "-release"
RELEASE_METHODS = [f"{m}{RELEASE}" for m in METHODS if m.startswith("bp")]
BUILTIN_MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
MODELS = [*BUILTIN_MODELS[:2], "random-360m", "random-1b", *BUILTIN_MODELS[2:]]
# (name, data, batch size, --max-seq-len)
SETTINGS = [("reviews-b8", "movie-reviews", 8, 256), ("long-b2", "long-reviews", 2, 512)]
# Language-modelling settings (the loss covers every completion / assistant token): synthetic tool calls, built here.
LM_SETTINGS = [("calls-b16", "tool-calls", 16, 256), ("plans-b16", "tool-plans", 16, 256), ("chat-b16", "tool-chat", 16, 256)]
# Random llama models: (layers, hidden, intermediate, heads, kv heads) of SmolLM2-360M and Llama-3.2-1B.
RANDOM_SHAPES = {"random-360m": (32, 960, 2560, 15, 5), "random-1b": (16, 2048, 8192, 32, 8)}
TARGET_ERROR = 0.10
TABLE_TITLE = "# Peak RSS: edgezo.memory prediction vs measurement\n\n"


# ---- inputs ------------------------------------------------------------------------------------------------------
def prepare(work: Path, models: list[str]) -> None:
    """The built-in models run (and SmolLM2, whose tokenizer the random models use) and the dataset in the work dir's
    EDGEZO_HOME (copied from the user's cache when there)."""
    home = work / "home"
    user_home = Path(os.environ.get("EDGEZO_HOME") or Path.home() / ".cache" / "edgezo")
    builtins = [m for m in BUILTIN_MODELS if m in models or m == "smollm2-135m"]
    for sub in [f"models/{m}" for m in builtins] + ["datasets/movie-reviews"]:
        if not (home / sub).exists() and (user_home / sub).exists():
            shutil.copytree(user_home / sub, home / sub)
    run([sys.executable, "-m", "edgezo.cli", "fetch", *builtins, "movie-reviews", "--json"], home)


def long_reviews(work: Path) -> Path:
    """Eight consecutive movie-review snippets per example (label of the last one): ~270 tokens per sequence."""
    out = work / "long-reviews"
    if (out / "valid.jsonl").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    src = work / "home" / "datasets" / "movie-reviews"
    for split in ("train", "valid"):
        records = [json.loads(line) for line in (src / f"{split}.jsonl").read_text().splitlines()]
        rows = [{"text": " ".join(r["text"] for r in records[i : i + 8]), "label": records[i + 7]["label"]}
                for i in range(0, len(records) - 7, 8)]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# Synthetic tool calls for the language-modelling rows (not a benchmark task: only their lengths matter here).
# One call's JSON is ~25 SmolLM2 tokens; a plan of PLAN_CALLS calls ~100.
APPS = {"set_alarm": ("time", "label"), "send_message": ("to", "text"), "add_event": ("title", "day"),
        "play_music": ("artist", "volume"), "get_weather": ("city", "day")}
VALUES = {"time": ["07:30", "06:15", "22:00", "09:45"], "label": ["gym", "work", "pills", "call mom"],
          "to": ["Ana", "Ben", "Chloe", "Dev"], "text": ["running late", "see you at noon", "call me back", "on my way"],
          "title": ["dentist", "team sync", "lunch with Eve", "yoga"], "day": ["monday", "friday", "tomorrow", "sunday"],
          "artist": ["Nina Simone", "Daft Punk", "Bach", "Adele"], "volume": [3, 5, 7, 9],
          "city": ["Lisbon", "Oslo", "Nairobi", "Lima"]}
PLAN_CALLS = 4
LM_SPLITS = {"train": 64, "valid": 32}


def tool_call(rng) -> tuple[str, dict]:
    name = rng.choice(sorted(APPS))
    args = {k: rng.choice(VALUES[k]) for k in APPS[name]}
    request = f"{name.replace('_', ' ')} " + ", ".join(f"{k} {v}" for k, v in args.items())
    return request, {"name": name, "arguments": args}


def tool_data(work: Path, data: str) -> Path:
    """tool-calls: prompt/completion, one call per record; tool-plans: PLAN_CALLS calls per completion; tool-chat: a
    two-turn chat, one call per assistant turn. Seeded (random.Random(0)), so every run builds the same files."""
    import random

    out = work / data
    if (out / "valid.jsonl").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, n in LM_SPLITS.items():
        rows = []
        for _ in range(n):
            if data == "tool-chat":
                turns = [tool_call(rng) for _ in range(2)]
                messages = [m for req, call in turns for m in ({"role": "user", "content": req},
                                                                {"role": "assistant", "content": json.dumps(call)})]
                rows.append({"messages": messages})
                continue
            calls = [tool_call(rng) for _ in range(PLAN_CALLS if data == "tool-plans" else 1)]
            prompt = "Request: " + "; then ".join(req for req, _ in calls) + "\nCall:"
            completion = json.dumps([c for _, c in calls] if len(calls) > 1 else calls[0][1])
            rows.append({"prompt": prompt, "completion": " " + completion})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def random_model(work: Path, name: str) -> Path:
    """A randomly initialised llama GGUF (Q4_0) of RANDOM_SHAPES[name] with SmolLM2's tokenizer; built once."""
    gguf_q4 = work / f"{name}.q4_0.gguf"
    if gguf_q4.exists():
        return gguf_q4
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgezo.convert.gguf_to_hf import convert_gguf_to_hf
    from edgezo.convert.hf_to_gguf import convert_hf_to_gguf
    from edgezo.engine import quantize_gguf

    tokenizer_dir = work / "smollm2-hf"
    if not (tokenizer_dir / "config.json").exists():
        env_home = os.environ.get("EDGEZO_HOME")
        os.environ["EDGEZO_HOME"] = str(work / "home")
        try:
            from edgezo import store

            convert_gguf_to_hf(store.resolve_model("smollm2-135m", "q4_0"), tokenizer_dir)
        finally:
            if env_home is None:
                os.environ.pop("EDGEZO_HOME", None)
            else:
                os.environ["EDGEZO_HOME"] = env_home
    layers, hidden, ff, heads, kv = RANDOM_SHAPES[name]
    base = json.loads((tokenizer_dir / "config.json").read_text())
    config = LlamaConfig(vocab_size=base["vocab_size"], hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=base.get("bos_token_id"), eos_token_id=base.get("eos_token_id"),
                         pad_token_id=base.get("pad_token_id"))
    torch.manual_seed(0)
    hf_dir = work / f"{name}-hf"
    LlamaForCausalLM(config).save_pretrained(hf_dir)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, hf_dir / f.name)
    f16 = work / f"{name}.f16.gguf"
    convert_hf_to_gguf(hf_dir, f16, "f16")
    quantize_gguf(f16, gguf_q4, "q4_0")
    f16.unlink()
    shutil.rmtree(hf_dir)
    return gguf_q4


# ---- one configuration --------------------------------------------------------------------------------------------
def run(cmd: list[str], home: Path) -> dict:
    env = dict(os.environ, EDGEZO_HOME=str(home))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def commands(args, model: str, data: str, batch_size: int, max_seq_len: int, method: str, out: Path) -> tuple[list, list]:
    """(measured command, edgezo memory command) for one configuration."""
    cli = [sys.executable, "-m", "edgezo.cli"]
    common = ["--model", model, "--quant", "q4_0", "--data", data, "--batch-size", str(batch_size),
              "--max-seq-len", str(max_seq_len), "--json"]
    # A run validates on --n-valid examples at the start and the end; one batch's worth keeps runs short.
    train = ["--steps", str(args.steps), "--eval-every", "0", "--n-valid", str(batch_size), "--seed", "0"]
    threads = ["--threads", str(args.threads)]
    if method == "inference":
        measured = cli + ["eval", *common, *threads, "--split", "valid", "--limit", str(4 * batch_size)]
        predicted = cli + ["memory", *common, "--method", "inference", "--split", "valid", "--limit", str(4 * batch_size)]
    elif method == "mezo":
        measured = cli + ["finetune", *common, *train, *threads, "--out", str(out)]
        predicted = cli + ["memory", *common, *train, "--method", "mezo"]
    else:
        flags = (["--gradient-checkpointing"] if "-ckpt" in method else []) + (
            ["--base-dtype", "q4_0"] if method.startswith("bp-quant") else []) + (
            ["--release-freed-memory"] if method.endswith(RELEASE) else [])
        measured = cli + ["reference-bp", *common, *train, *threads, *flags, "--out", str(out)]
        predicted = cli + ["memory", *common, *train, *flags, "--method", "bp"]
    return measured, predicted


def validate(args, work: Path, model: str, setting: tuple, method: str) -> dict:
    name, data, batch_size, max_seq_len = setting
    home = work / "home"
    model_arg = model if not model.startswith("random-") else str(random_model(work, model))
    data_arg = (data if data == "movie-reviews" else str(long_reviews(work)) if data == "long-reviews"
                else str(tool_data(work, data)))
    out = work / "runs" / f"{model}-{name}-{method}-{time.time_ns()}"
    # the first float reference run of a model converts it to HF once; keep that out of the runs
    if method.removesuffix(RELEASE) in ("bp", "bp-ckpt"):
        warm = "import sys; from edgezo import store, reference; reference.hf_model_dir(store.resolve_model(sys.argv[1], 'q4_0'))"
        subprocess.run([sys.executable, "-c", warm, model_arg], check=True, env=dict(os.environ, EDGEZO_HOME=str(home)), cwd=ROOT)
    measured_cmd, predicted_cmd = commands(args, model_arg, data_arg, batch_size, max_seq_len, method, out)
    measured = run(measured_cmd, home)
    predicted = run(predicted_cmd, home)
    shutil.rmtree(out, ignore_errors=True)
    error = predicted["predicted_bytes"] / measured["peak_rss_bytes"] - 1
    return {"benchmark": "memory_validation", "model": model, "quant": "q4_0", "setting": name, "data": data,
            "batch_size": batch_size, "max_seq_len": max_seq_len, "method": method,
            "seq_len": predicted.get("seq_len"), "measured_bytes": measured["peak_rss_bytes"],
            "predicted_bytes": predicted["predicted_bytes"], "error": error, "breakdown": predicted["breakdown"],
            "cpu": cpu_model(), "threads": args.threads, "steps": args.steps, "seed": 0,
            "lora": "rank 16, alpha 32, attn_k,attn_v",
            "measured_cmd": measured_cmd[3:], "predicted_cmd": predicted_cmd[3:],  # after python -m edgezo.cli
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def row_line(r: dict) -> str:
    return (f"| {r['model']} | {r['setting']} | {r['method']} | {r.get('seq_len') or ''} "
            f"| {r['predicted_bytes'] / 2**20:.1f} | {r['measured_bytes'] / 2**20:.1f} | {100 * r['error']:+.1f} % "
            f"| {short_cpu(r.get('cpu'))} |")


def short_cpu(name: str | None) -> str:
    """'AMD EPYC 7B13' -> 'AMD EPYC', 'Intel(R) Xeon(R) Processor' -> 'Intel Xeon'; rows before 2026-12-02 did not
    record it."""
    if not name:
        return "not recorded"
    return " ".join(name.replace("(R)", "").replace("(TM)", "").split()[:2])


def markdown(rows: list[dict], steps: int, kept: list[str] = ()) -> str:
    """The table of `rows`, after the lines `kept` of an earlier table (configurations not run this time)."""
    kept = [line if line.count("|") == 9 else line + " not recorded |" for line in kept]  # tables before the CPU column
    lines = ["| model (Q4_0) | setting | method | tokens/seq | predicted MiB | measured MiB | error | CPU |",
             "|---|---|---|---|---|---|---|---|", *kept, *map(row_line, rows)]
    worst = max([abs(r["error"]) for r in rows] + [abs(float(line.split("|")[7].strip(" %"))) / 100 for line in kept])
    lines.append(f"\nWorst error {100 * worst:.1f} % (target {100 * TARGET_ERROR:.0f} %). Peak RSS = VmHWM of a fresh "
                 f"process running the command; {steps} training steps, seed 0, LoRA rank 16 on attn_k,attn_v, "
                 f"torch float32 (bp-quant: float32 compute on the Q4_0 file's blocks; -release: with "
                 f"--release-freed-memory). reviews-b8: movie-reviews, batch 8, --max-seq-len 256; long-b2: eight reviews "
                 f"per example, batch 2, --max-seq-len 512. Language modelling (loss on every completion / assistant "
                 f"token; synthetic tool calls from tool_data, 64 train / 32 valid records): calls-b16, one JSON call "
                 f"per completion (~28 tokens), plans-b16, {PLAN_CALLS} calls per completion (~111 tokens), chat-b16, "
                 f"two user/assistant turns in the GGUF's chat template; batch 16, --max-seq-len 256. tokens/seq: BP, "
                 f"the longest padded training batch; "
                 f"llama.cpp, the mean length in the fullest batch. Predictions: `edgezo memory` with the same "
                 f"arguments; the GGUF -> HF conversion of a model's first reference run was done beforehand.")
    return "\n".join(lines) + "\n"


def latest_rows() -> list[dict]:
    """The latest row of every (model, setting, method) in memory_validation.jsonl, in table order."""
    latest = {}
    for line in (RESULTS / "memory_validation.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "predicted_cmd" in row:
            latest[(row["model"], row["setting"], row["method"])] = row
    order = ({m: i for i, m in enumerate(MODELS)} | {s[0]: i for i, s in enumerate(SETTINGS + LM_SETTINGS)}
             | {m: i for i, m in enumerate(METHODS + RELEASE_METHODS)})
    return sorted(latest.values(), key=lambda r: (order.get(r["setting"], 99) >= len(SETTINGS), order.get(r["model"], 99),
                                                  order.get(r["setting"], 99), order.get(r["method"], 99)))


def repredict(args, work: Path) -> int:
    """Re-run only `edgezo memory` for the latest measurement of each configuration (after changing a constant)."""
    rows = []
    for row in latest_rows():
        argv = row["predicted_cmd"][1:] if row["predicted_cmd"][0] == "edgezo.cli" else row["predicted_cmd"]
        predicted = run([sys.executable, "-m", "edgezo.cli", *argv], work / "home")
        row.update(predicted_bytes=predicted["predicted_bytes"], breakdown=predicted["breakdown"],
                   error=predicted["predicted_bytes"] / row["measured_bytes"] - 1, seq_len=predicted.get("seq_len"))
        rows.append(row)
    table = markdown(rows, rows[0]["steps"])
    if not args.no_write:
        (RESULTS / "memory_validation.md").write_text(TABLE_TITLE + table)
    print(table)
    return 0 if all(abs(r["error"]) <= TARGET_ERROR for r in rows) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=common.work_dir, default="/tmp/edgezo-memory-validation",
                   help="models, data and runs [%(default)s]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS), help=f"[%(default)s]; also {','.join(RELEASE_METHODS)}")
    p.add_argument("--settings", default=",".join(s[0] for s in SETTINGS),
                   help=f"[%(default)s]; language modelling: {','.join(s[0] for s in LM_SETTINGS)}")
    p.add_argument("--no-write", action="store_true", help="print the table only (trial runs)")
    p.add_argument("--repredict", action="store_true",
                   help="keep the measurements of the latest rows in memory_validation.jsonl, predict them again")
    args = p.parse_args()
    work = args.work_dir
    if args.repredict:
        return repredict(args, work)
    (work / "home").mkdir(parents=True, exist_ok=True)
    prepare(work, args.models.split(","))
    rows = []
    settings = [s for s in SETTINGS + LM_SETTINGS if s[0] in args.settings.split(",")]
    for model in args.models.split(","):
        for setting in settings:
            for method in args.methods.split(","):
                row = validate(args, work, model, setting, method)
                rows.append(row)
                if not args.no_write:
                    RESULTS.mkdir(parents=True, exist_ok=True)
                    with open(RESULTS / "memory_validation.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                print(f"{model} {setting[0]} {method}: predicted {row['predicted_bytes'] / 2**20:.1f} MiB, "
                      f"measured {row['measured_bytes'] / 2**20:.1f} MiB ({100 * row['error']:+.1f} %)", flush=True)
    table = markdown(rows, args.steps)
    if not args.no_write:  # the earlier table's rows of configurations not run this time stay, this run's follow
        md = RESULTS / "memory_validation.md"
        run_keys = {(r["model"], r["setting"], r["method"]) for r in rows}
        kept = [line for line in (md.read_text().splitlines() if md.exists() else [])
                if line.startswith("| ") and not line.startswith("| model")
                and tuple(c.strip() for c in line.split("|")[1:4]) not in run_keys]
        md.write_text(TABLE_TITLE + markdown(rows, args.steps, kept))
    print(table)
    return 0 if all(abs(r["error"]) <= TARGET_ERROR for r in rows) else 1


if __name__ == "__main__":
    sys.exit(common.run_main(main))
