"""Inference throughput: edgezo's engine against bare llama-cpp-python on the same GGUF, same settings, same work.

    python -m bench.throughput [--quants f32,f16,q8_0,q4_0,none] [--n-seqs 1,16] [--prompt-tokens 128]
                               [--gen-tokens 64] [--repeats 5] [--warmup 1] [--rounds 2] [--threads 0] [--quick]

For every quant (none = the original Q4_1 file) and number of sequences B, `--rounds` fresh processes each hold
both sides on the same memory-mapped file and run them in turn, repetition by repetition (which side goes first
alternates). Two fresh processes doing identical work differed by up to 20 % on this machine while each was
steady, and the machine's speed drifts by tens of percent within minutes, so only adjacent repetitions in one
process can resolve the 3 % target: the ratio is the median over those pairs. The two sides do the same work:
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
Reported: tokens/s (median, min/max over all repetitions) and edgezo / bare: median (min/max) over the pairs of
adjacent repetitions (target >= 0.97: within 3 %).
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

from bench import common

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


class EdgezoSide:
    """edgezo.engine.Engine: prompt processing = Engine.logits; generation (one sequence) = Engine.generate."""

    def __init__(self, args, model_path: Path, text: str):
        from edgezo.engine import Engine, EngineConfig

        self.engine = Engine(model_path, EngineConfig(n_seq_max=args.n_seq, n_ctx_per_seq=args.ctx_per_seq,
                                                      n_threads=args.threads))
        self.seqs = prompts(self.engine.tokenize(text, add_special=False), args.n_seq, args.prompt_tokens)
        self.gen_tokens = args.gen_tokens if args.n_seq == 1 else 0
        self._last = [[len(s) - 1] for s in self.seqs]

    def prompt_processing(self) -> None:
        self.engine.logits(self.seqs, self._last)

    def generate(self):
        return self.engine.generate(self.seqs[0], self.gen_tokens)

    def close(self) -> None:
        self.engine.close()


class BareSide:
    """llama_cpp's low-level API and nothing else, with the engine's context parameters."""

    def __init__(self, args, model_path: Path, text: str):
        import llama_cpp

        self.ll, self.n_seq, self.gen_tokens = llama_cpp, args.n_seq, args.gen_tokens
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(),
                                                          llama_cpp.llama_model_default_params())
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        n_ctx = args.n_seq * args.ctx_per_seq
        p = llama_cpp.llama_context_default_params()  # the fields edgezo.engine.Engine sets, to the same values
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_ctx, min(1024, n_ctx), args.n_seq
        p.kv_unified, p.flash_attn_type, p.no_perf = False, 1, True
        p.n_threads = p.n_threads_batch = args.threads or os.cpu_count()
        self.ctx = llama_cpp.llama_init_from_model(self.model, p)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, True)
        self.seqs = prompts(list(buf[:n]), args.n_seq, args.prompt_tokens)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self._fill_prompts()  # once, outside the timer: the bare side's figure is llama.cpp's floor
        self._filled = True

    def _fill(self, items) -> None:  # items: (token, pos, seq, wants_logits)
        b = self.batch
        for j, (tok, pos, seq, want) in enumerate(items):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, want
            b.seq_id[j][0] = seq
        b.n_tokens = len(items)

    def _fill_prompts(self) -> None:
        self._fill([(t, i, s, int(i == len(seq) - 1)) for s, seq in enumerate(self.seqs) for i, t in enumerate(seq)])

    def _decode(self) -> None:
        if self.ll.llama_decode(self.ctx, self.batch) != 0:
            raise SystemExit("llama_decode failed")

    def prompt_processing(self) -> None:
        if not self._filled:  # only after generate() reused the batch
            self._fill_prompts()
            self._filled = True
        self.ll.llama_memory_clear(self.memory, True)
        self._decode()

    def generate(self):
        """Greedy, as Engine.generate: decode, argmax over each sequence's logits row, one token per sequence."""
        import numpy as np

        self.ll.llama_memory_clear(self.memory, True)
        self._fill_prompts()
        self._filled = False
        pos = [len(s) for s in self.seqs]
        for _ in range(self.gen_tokens):
            self._decode()
            rows = np.ctypeslib.as_array(self.ll.llama_get_logits(self.ctx), shape=(self.n_seq, self.n_vocab))
            nxt = [int(t) for t in rows.argmax(axis=1)]
            if self.n_seq == 1 and self.ll.llama_vocab_is_eog(self.vocab, nxt[0]):
                return  # Engine.generate stops there too
            yield nxt
            self._fill([(t, pos[s], s, 1) for s, t in enumerate(nxt)])
            pos = [q + 1 for q in pos]

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


def alternate(sides: dict, fn, warmup: int, repeats: int) -> dict[str, list]:
    """fn(side) for each side in turn, `warmup + repeats` times, which side goes first alternating; the timed
    results per side. Adjacent calls see the same machine, so their ratio resists drift."""
    out = {name: [] for name in sides}
    for i in range(warmup + repeats):
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            value = fn(sides[name])
            if i >= warmup:
                out[name].append(value)
    return out


def child(args) -> dict:
    import edgezo.engine  # noqa: F401  (llama.cpp's backend initialised and its log quietened, for both sides)
    from edgezo import store
    from edgezo.files import peak_rss_bytes

    model_path = store.resolve_model(args.model, args.quant)
    text = prompt_text()
    sides = {"bare": BareSide(args, model_path, text), "edgezo": EdgezoSide(args, model_path, text)}
    pp = alternate(sides, lambda side: timed_call(side.prompt_processing), args.warmup, args.repeats)
    gen = alternate({k: v for k, v in sides.items() if v.gen_tokens}, lambda side: time_generation(side.generate),
                    args.warmup, args.repeats)
    out = {"model_path": str(model_path), "peak_rss_bytes": peak_rss_bytes()}
    for name, side in sides.items():
        out[name] = {"pp_seconds": pp[name], "token_hash": token_hash(side.seqs)}
        if name in gen:
            out[name].update(gen_seconds=[s for s, _ in gen[name]], gen_tokens=gen[name][-1][1] * side.n_seq
                             if name == "bare" else gen[name][-1][1])
        side.close()
    return out


def timed_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- parent ---------------------------------------------------------------------------------------------------
def rates(seconds: list[float], n_tokens: int) -> dict:
    """tokens/s of each repetition, summarised (median of rates = n / median of times for odd counts)."""
    return common.summary([n_tokens / s for s in seconds])


def paired(bare_seconds: list[float], edgezo_seconds: list[float]) -> list[float]:
    """edgezo tokens/s over bare tokens/s of each pair of adjacent repetitions (same work: bare s / edgezo s)."""
    return [b / e for b, e in zip(bare_seconds, edgezo_seconds)]


def measure(args, quant: str, n_seq: int) -> dict:
    """`--rounds` fresh processes, each running both sides; the repetitions of all rounds pooled (peak RSS is of
    the process holding both sides)."""
    cmd = common.python_cmd(__spec__.name, "--child", "pair", "--model", args.model, "--quant", quant, "--n-seq", n_seq,
                            "--prompt-tokens", args.prompt_tokens, "--gen-tokens", args.gen_tokens,
                            "--ctx-per-seq", args.ctx_per_seq, "--threads", args.threads, "--warmup", args.warmup,
                            "--repeats", args.repeats)
    raws = [common.run_json(cmd, f"{quant} B={n_seq} round {k + 1}") for k in range(args.rounds)]
    row = {"peak_rss_bytes": max(r["_process"]["peak_rss_bytes"] for r in raws), "model_path": raws[0]["model_path"]}
    for name in ("bare", "edgezo"):
        pp = [s for r in raws for s in r[name]["pp_seconds"]]
        side = {"pp_tokens_per_s": rates(pp, n_seq * args.prompt_tokens), "token_hash": raws[0][name]["token_hash"]}
        if "gen_seconds" in raws[0][name]:
            gen = [s for r in raws for s in r[name]["gen_seconds"]]
            side.update(gen_tokens=raws[0][name]["gen_tokens"],
                        gen_tokens_per_s=rates(gen, raws[0][name]["gen_tokens"]) if raws[0][name]["gen_tokens"] else None)
        row[name] = side
    row["pp_pairs"] = [x for r in raws for x in paired(r["bare"]["pp_seconds"], r["edgezo"]["pp_seconds"])]
    if "gen_seconds" in raws[0]["edgezo"]:
        row["gen_pairs"] = [x for r in raws for x in paired(r["bare"]["gen_seconds"], r["edgezo"]["gen_seconds"])]
    row["raw"] = raws
    return row


def compare_sides(row: dict) -> dict:
    """Median over the adjacent pairs of repetitions (not the ratio of pooled medians: the machine drifts)."""
    def r(key):
        pairs = row.get(key)
        return common.summary(pairs) if pairs else None

    bare, edgezo = row["bare"], row["edgezo"]
    return {"pp_edgezo_over_bare": r("pp_pairs"), "gen_edgezo_over_bare": r("gen_pairs"),
            "same_tokens": bare["token_hash"] == edgezo["token_hash"],
            "same_gen_length": bare.get("gen_tokens") == edgezo.get("gen_tokens") if "gen_tokens" in edgezo else None}


def run(args) -> dict:
    from edgezo import store

    machine = common.machine_info()
    rows = []
    for quant in args.quants:
        path = store.resolve_model(args.model, quant)  # requantize (cached) before any timing
        for n_seq in args.n_seqs:
            row = {"quant": quant, "n_seq": n_seq, "model_sha256": common.sha256(path), **measure(args, quant, n_seq)}
            row.update(compare_sides(row))
            rows.append(row)
            print(f"{quant} B={n_seq}: pp {row['bare']['pp_tokens_per_s']['median']:.0f} (bare) vs "
                  f"{row['edgezo']['pp_tokens_per_s']['median']:.0f} (edgezo) tok/s, ratio "
                  f"{ratio_cell(row, 'pp_edgezo_over_bare')}"
                  + (f"; gen ratio {ratio_cell(row, 'gen_edgezo_over_bare')}" if row["gen_edgezo_over_bare"] else ""),
                  file=sys.stderr, flush=True)
    ratios = [r[k]["median"] for r in rows for k in ("pp_edgezo_over_bare", "gen_edgezo_over_bare") if r[k]]
    return {"benchmark": NAME, "model": args.model, "rows": rows, "min_edgezo_over_bare": min(ratios) if ratios else None,
            "target_edgezo_over_bare": TARGET, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
            "ctx_per_seq": args.ctx_per_seq, "threads": args.threads or os.cpu_count(), "warmup": args.warmup,
            "repeats": args.repeats, "rounds": args.rounds, "seed": None, "quick": args.quick, "note": args.note,
            "machine": machine, "load_average_end": common.load_average(), "time": common.utc_now()}


def ratio_cell(row: dict, key: str) -> str:
    """median (min-max) of the paired ratios."""
    stats = row[key]
    return "n/a" if not stats else common.spread(stats)


def render(result: dict) -> str:
    """Markdown table of one throughput result (also used by bench/report.py for docs/benchmarks.md)."""
    rows = []
    for r in result["rows"]:
        quant = "q4_1 (original)" if r["quant"] == "none" else r["quant"]
        b, e = r["bare"], r["edgezo"]
        rows.append([quant, r["n_seq"], common.spread(b["pp_tokens_per_s"], 0), common.spread(e["pp_tokens_per_s"], 0),
                     ratio_cell(r, "pp_edgezo_over_bare"),
                     common.spread(b["gen_tokens_per_s"], 1) if b.get("gen_tokens_per_s") else "n/a",
                     common.spread(e["gen_tokens_per_s"], 1) if e.get("gen_tokens_per_s") else "-",
                     ratio_cell(r, "gen_edgezo_over_bare")])
    head = ["weights", "seqs", "prompt tok/s bare", "prompt tok/s edgezo", "edgezo/bare", "gen tok/s bare",
            "gen tok/s edgezo", "edgezo/bare"]
    return (common.table(head, rows)
            + f"\n{result['model']}; prompts of {result['prompt_tokens']} tokens per sequence, {result['gen_tokens']} "
              f"generated (greedy), {result['threads']} threads, flash attention, split F16 KV cache. "
              f"{result['rounds']} fresh process(es) per configuration, each running both sides in turn "
              f"(alternating which goes first), {result['repeats']} repetitions after {result['warmup']} warm-up; "
              f"tokens/s: median (min-max) of all repetitions; edgezo/bare: median (min-max) over the pairs of "
              f"adjacent repetitions. Lowest edgezo/bare {common.fmt(result['min_edgezo_over_bare'])} (target >= "
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
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per configuration [%(default)s]")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads, 0: all cores [%(default)s]")
    p.add_argument("--quick", action="store_true", help="1 round of 2 repetitions, 64-token prompts, 32 generated tokens")
    p.add_argument("--note", default="", help="free text stored with the result (e.g. 'measured under load')")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--child", choices=["pair"], help=argparse.SUPPRESS)
    p.add_argument("--quant", help=argparse.SUPPRESS)
    p.add_argument("--n-seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.prompt_tokens, args.gen_tokens, args.rounds = 2, 64, 32, 1
    args.quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    args.n_seqs = [int(n) for n in args.n_seqs.split(",")]
    if args.prompt_tokens + args.gen_tokens > args.ctx_per_seq:
        p.error(f"--prompt-tokens + --gen-tokens must fit in --ctx-per-seq ({args.ctx_per_seq})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.child_or_publish(args, NAME, TITLE, child, run, render)


if __name__ == "__main__":
    sys.exit(common.run_main(main))
