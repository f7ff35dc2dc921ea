"""Inference throughput: edgezo's engine against bare llama-cpp-python on the same GGUF, same settings, same work.

    python bench/throughput.py [--quants f32,f16,q8_0,q4_0,none] [--n-seqs 1,16] [--prompt-tokens 128]
                               [--gen-tokens 64] [--repeats 5] [--warmup 1] [--threads 0] [--quick] [--json]

For every quant (none = the original Q4_1 file) and number of sequences B, two fresh processes do the same work:
  edgezo: edgezo.engine.Engine: prompt processing = Engine.logits over B sequences of T tokens (one llama_decode,
          logits at each sequence's last token, copied out); generation (B = 1) = Engine.generate, greedy.
  bare:   llama_cpp's low-level API and nothing else: a context with the engine's parameters (n_ctx = B x
          ctx-per-seq, n_batch = n_ctx, n_ubatch = min(1024, n_ctx), n_seq_max = B, split KV cache, flash
          attention, F16 KV, same threads), the batch filled once outside the timer, then per repetition
          llama_memory_clear + llama_decode; generation = greedy argmax over the logits row, one-token decodes,
          stopping at end of generation as the engine does. For B = 16 it also generates one token per sequence
          per decode (fixed length), which edgezo's engine does not offer (Engine.generate is single-sequence).
The high-level llama_cpp.Llama class is not used: it has one sequence and a unified KV cache, so it could not
run the 16-sequence batch the way the engine does. Prompts are the first movie-review training texts joined and
cut into T-token pieces, tokenized by each side with llama_tokenize; both sides report a hash of their tokens.
Reported: tokens/s (median, min/max over repetitions) and edgezo / bare (target >= 0.97: within 3 %).
Writes bench/results/throughput.jsonl (appended) and bench/results/throughput.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

NAME = "throughput"
TITLE = "Inference throughput: edgezo engine vs bare llama-cpp-python"
QUANTS = ("f32", "f16", "q8_0", "q4_0", "none")
TARGET = 0.97  # edgezo tokens/s over bare tokens/s


# ---- child processes ------------------------------------------------------------------------------------------
def prompt_text() -> str:
    """The same text on both sides: movie-review training sentences joined (the dataset edgezo trains on)."""
    from edgezo import store
    from edgezo.data import read_jsonl

    files, _ = store.resolve_data("movie-reviews")
    return " ".join(r["text"] for r in read_jsonl(files.train)[:400])


def prompts(tokens: list[int], n_seq: int, n_tokens: int) -> list[list[int]]:
    if len(tokens) < n_seq * n_tokens:
        raise SystemExit(f"prompt text has {len(tokens)} tokens, {n_seq} x {n_tokens} needed")
    return [tokens[i * n_tokens:(i + 1) * n_tokens] for i in range(n_seq)]


def token_hash(seqs: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(seqs).encode()).hexdigest()[:16]


def time_generation(run) -> tuple[float, int]:
    """run() yields generated tokens; time from the first token (prompt already decoded) to the last."""
    it = iter(run())
    next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return time.perf_counter() - t0, n


def child_edgezo(args, model_path: Path, text: str) -> dict:
    from edgezo.engine import Engine, EngineConfig

    engine = Engine(model_path, EngineConfig(n_seq_max=args.n_seq, n_ctx_per_seq=args.ctx_per_seq, n_threads=args.threads))
    seqs = prompts(engine.tokenize(text, add_special=False), args.n_seq, args.prompt_tokens)
    last = [[len(s) - 1] for s in seqs]
    pp = common.timed(lambda: engine.logits(seqs, last), args.warmup, args.repeats)
    out = {"pp_seconds": pp, "token_hash": token_hash(seqs)}
    if args.n_seq == 1:
        gen = [time_generation(lambda: engine.generate(seqs[0], args.gen_tokens)) for _ in range(args.warmup + args.repeats)]
        out.update(gen_seconds=[s for s, _ in gen[args.warmup:]], gen_tokens=gen[-1][1])
    engine.close()
    return out


def child_bare(args, model_path: Path, text: str) -> dict:
    import ctypes

    import llama_cpp
    import numpy as np

    global _quiet
    _quiet = llama_cpp.llama_log_callback(lambda level, msg, data: None)  # kept referenced: llama.cpp calls it later
    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), llama_cpp.llama_model_default_params())
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    n_ctx = args.n_seq * args.ctx_per_seq
    p = llama_cpp.llama_context_default_params()  # the fields edgezo.engine.Engine sets, to the same values
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_ctx, min(1024, n_ctx), args.n_seq
    p.kv_unified, p.flash_attn_type, p.no_perf = False, 1, True
    p.n_threads = p.n_threads_batch = args.threads or os.cpu_count()
    ctx = llama_cpp.llama_init_from_model(model, p)
    memory = llama_cpp.llama_get_memory(ctx)
    data = text.encode()
    buf = (llama_cpp.llama_token * (len(data) + 8))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), False, True)
    seqs = prompts(list(buf[:n]), args.n_seq, args.prompt_tokens)
    batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def fill(items):  # items: (token, pos, seq, wants_logits)
        for j, (tok, pos, seq, want) in enumerate(items):
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = tok, pos, 1, want
            batch.seq_id[j][0] = seq
        batch.n_tokens = len(items)

    def decode():
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    def fill_prompts(chosen):
        fill([(t, i, s, int(i == len(seq) - 1)) for s, seq in enumerate(chosen) for i, t in enumerate(seq)])

    fill_prompts(seqs)

    def prompt_processing():
        llama_cpp.llama_memory_clear(memory, True)
        decode()

    pp = common.timed(prompt_processing, args.warmup, args.repeats)
    out = {"pp_seconds": pp, "token_hash": token_hash(seqs)}

    def generate():
        """Greedy, as Engine.generate: decode, argmax over each sequence's logits row, one token per sequence."""
        llama_cpp.llama_memory_clear(memory, True)
        fill_prompts(seqs)
        pos = [len(s) for s in seqs]
        for _ in range(args.gen_tokens):
            decode()
            rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(args.n_seq, n_vocab))
            nxt = [int(t) for t in rows.argmax(axis=1)]
            if args.n_seq == 1 and llama_cpp.llama_vocab_is_eog(vocab, nxt[0]):
                return  # Engine.generate stops there too
            yield nxt
            fill([(t, pos[s], s, 1) for s, t in enumerate(nxt)])
            pos = [q + 1 for q in pos]

    gen = [time_generation(generate) for _ in range(args.warmup + args.repeats)]
    out.update(gen_seconds=[s for s, _ in gen[args.warmup:]], gen_tokens=gen[-1][1] * args.n_seq)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return out


def child(args) -> dict:
    from edgezo import store
    from edgezo.files import peak_rss_bytes

    model_path = store.resolve_model(args.model, args.quant)
    text = prompt_text()
    out = (child_edgezo if args.child == "edgezo" else child_bare)(args, model_path, text)
    out.update(side=args.child, model_path=str(model_path), peak_rss_bytes=peak_rss_bytes())
    return out


# ---- parent ---------------------------------------------------------------------------------------------------
def rates(seconds: list[float], n_tokens: int) -> dict:
    """tokens/s of each repetition, summarised (median of rates = n / median of times for odd counts)."""
    return common.summary([n_tokens / s for s in seconds])


def measure(args, quant: str, n_seq: int, side: str) -> dict:
    cmd = common.python_cmd(__file__, "--child", side, "--model", args.model, "--quant", quant, "--n-seq", n_seq,
                            "--prompt-tokens", args.prompt_tokens, "--gen-tokens", args.gen_tokens,
                            "--ctx-per-seq", args.ctx_per_seq, "--threads", args.threads, "--warmup", args.warmup,
                            "--repeats", args.repeats)
    raw = common.run_json(cmd, f"{side} {quant} B={n_seq}")
    row = {"pp_tokens_per_s": rates(raw["pp_seconds"], n_seq * args.prompt_tokens), "token_hash": raw["token_hash"],
           "peak_rss_bytes": raw["_process"]["peak_rss_bytes"], "model_path": raw["model_path"], "raw": raw}
    if "gen_seconds" in raw:
        row["gen_tokens"] = raw["gen_tokens"]
        row["gen_tokens_per_s"] = rates(raw["gen_seconds"], raw["gen_tokens"]) if raw["gen_tokens"] else None
    return row


def compare_sides(bare: dict, edgezo: dict) -> dict:
    def r(key):
        if not edgezo.get(key) or not bare.get(key):
            return None
        return edgezo[key]["median"] / bare[key]["median"]

    return {"pp_edgezo_over_bare": r("pp_tokens_per_s"), "gen_edgezo_over_bare": r("gen_tokens_per_s"),
            "same_tokens": bare["token_hash"] == edgezo["token_hash"],
            "same_gen_length": bare.get("gen_tokens") == edgezo.get("gen_tokens") if "gen_tokens" in edgezo else None}


def run(args) -> dict:
    from edgezo import store

    machine = common.machine_info()
    rows = []
    for quant in args.quants:
        path = store.resolve_model(args.model, quant)  # requantize (cached) before any timing
        for n_seq in args.n_seqs:
            bare = measure(args, quant, n_seq, "bare")
            edgezo = measure(args, quant, n_seq, "edgezo")
            row = {"quant": quant, "n_seq": n_seq, "model_sha256": common.sha256(path), "bare": bare, "edgezo": edgezo,
                   **compare_sides(bare, edgezo)}
            rows.append(row)
            print(f"{quant} B={n_seq}: pp {bare['pp_tokens_per_s']['median']:.0f} (bare) vs "
                  f"{edgezo['pp_tokens_per_s']['median']:.0f} (edgezo) tok/s, ratio {common.fmt(row['pp_edgezo_over_bare'])}"
                  + (f"; gen ratio {common.fmt(row['gen_edgezo_over_bare'])}" if row["gen_edgezo_over_bare"] else ""),
                  file=sys.stderr, flush=True)
    ratios = [r[k] for r in rows for k in ("pp_edgezo_over_bare", "gen_edgezo_over_bare") if r[k] is not None]
    return {"benchmark": NAME, "model": args.model, "rows": rows, "min_edgezo_over_bare": min(ratios) if ratios else None,
            "target_edgezo_over_bare": TARGET, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
            "ctx_per_seq": args.ctx_per_seq, "threads": args.threads or os.cpu_count(), "warmup": args.warmup,
            "repeats": args.repeats, "seed": None, "quick": args.quick, "note": args.note, "machine": machine,
            "load_average_end": common.load_average(), "time": common.utc_now()}


def render(result: dict) -> str:
    """Markdown table of one throughput result (also used by bench/report.py for the README)."""
    rows = []
    for r in result["rows"]:
        quant = "q4_1 (original)" if r["quant"] == "none" else r["quant"]
        b, e = r["bare"], r["edgezo"]
        rows.append([quant, r["n_seq"], common.spread(b["pp_tokens_per_s"], 0), common.spread(e["pp_tokens_per_s"], 0),
                     common.fmt(r["pp_edgezo_over_bare"]),
                     common.spread(b["gen_tokens_per_s"], 1) if b.get("gen_tokens_per_s") else "n/a",
                     common.spread(e["gen_tokens_per_s"], 1) if e.get("gen_tokens_per_s") else "-",
                     common.fmt(r["gen_edgezo_over_bare"])])
    head = ["weights", "seqs", "prompt tok/s bare", "prompt tok/s edgezo", "edgezo/bare", "gen tok/s bare",
            "gen tok/s edgezo", "edgezo/bare"]
    return (common.table(head, rows)
            + f"\n{result['model']}; prompts of {result['prompt_tokens']} tokens per sequence, {result['gen_tokens']} "
              f"generated (greedy), {result['threads']} threads, flash attention, split F16 KV cache; median "
              f"(min-max) of {result['repeats']} repetitions after {result['warmup']} warm-up, each configuration in a "
              f"fresh process. Lowest edgezo/bare {common.fmt(result['min_edgezo_over_bare'])} (target >= "
              f"{result['target_edgezo_over_bare']}). Generation with 16 sequences: bare llama.cpp only (edgezo's "
              f"Engine.generate is single-sequence).\n\n{common.provenance(result)}\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quants", default=",".join(QUANTS), help="comma-separated; none = the original file [%(default)s]")
    p.add_argument("--n-seqs", default="1,16", help="sequences per decode [%(default)s]")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--ctx-per-seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads, 0: all cores [%(default)s]")
    p.add_argument("--quick", action="store_true", help="2 repetitions, 64-token prompts, 32 generated tokens")
    p.add_argument("--note", default="", help="free text stored with the result (e.g. 'measured under load')")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--child", choices=["edgezo", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--quant", help=argparse.SUPPRESS)
    p.add_argument("--n-seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.prompt_tokens, args.gen_tokens = 2, 64, 32
    args.quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    args.n_seqs = [int(n) for n in args.n_seqs.split(",")]
    if args.prompt_tokens + args.gen_tokens > args.ctx_per_seq:
        p.error(f"--prompt-tokens + --gen-tokens must fit in --ctx-per-seq ({args.ctx_per_seq})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    result = run(args)
    common.publish(NAME, TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
