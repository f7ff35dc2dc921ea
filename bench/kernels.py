"""What the engine's AMX guard costs: decode time with llama.cpp's own kernel choice vs the guarded load.

    python -m bench.kernels            # ~3 min on 2 cores; --json prints the result line

The guarded load (EDGEZO_AMX=avoid, what the engine does on an AMX CPU whose llama.cpp has AMX kernels) turns
llama.cpp's extra buffer types off and puts back, by tensor overrides, the weights CPU_REPACK takes. The third
configuration is the last resort the guard avoids: extra buffer types off and no overrides (no repacked kernels).
All three engines live in one process and are timed in alternating rounds on the same batch, so each ratio is
measured side by side. On an AMX CPU, `EDGEZO_AMX=allow` in the first configuration times the AMX kernels
themselves (at the risk of the crash the guard exists for).
"""

from __future__ import annotations

import argparse
import os
import sys

from bench import common

NAME, TITLE = "kernels", "The AMX guard: llama.cpp's kernel choice vs the guarded load"
QUANTS = ("q4_0", "q4_k_m", "q8_0")
CONFIGS = (("llama.cpp's choice", "allow", True), ("guarded (AMX avoided, repack kept)", "avoid", True),
           ("no extra buffer types (last resort)", "avoid", False))
N_SEQ, TOKENS_PER_SEQ = 16, 32


def measure(quant: str, rounds: int, repeats: int) -> dict:
    import numpy as np

    from edgezo.engine import buffers
    from edgezo import store
    from edgezo.engine import Engine, EngineConfig

    path = store.resolve_model("smollm2-135m", quant)
    config = EngineConfig(n_seq_max=N_SEQ, n_ctx_per_seq=64)
    find_repack = buffers.cpu_extra_buffer_type
    engines = []
    for _, mode, repack in CONFIGS:
        os.environ["EDGEZO_AMX"] = mode
        buffers.cpu_extra_buffer_type = find_repack if repack else (lambda name: None)
        engines.append(Engine(path, config))
    buffers.cpu_extra_buffer_type = find_repack
    rng = np.random.default_rng(0)
    batch = [list(rng.integers(100, 40000, TOKENS_PER_SEQ)) for _ in range(N_SEQ)]
    positions = [[TOKENS_PER_SEQ - 1]] * N_SEQ
    times = [[] for _ in CONFIGS]
    logits = [e.logits(batch, positions) for e in engines]  # warm-up, and the outputs compared below
    for _ in range(rounds):
        for i, e in enumerate(engines):
            times[i] += common.timed(lambda e=e: e.logits(batch, positions), warmup=0, repeats=repeats)
    out = {"quant": quant, "weight_buffers_mib": [e.weight_buffers_mib for e in engines],
           "seconds": [common.summary(t) for t in times],
           "guarded_equals_default": bool(np.array_equal(logits[0], logits[1]))}
    out["guarded_over_default"] = common.ratio(out["seconds"][1]["median"], out["seconds"][0]["median"])
    out["no_extras_over_default"] = common.ratio(out["seconds"][2]["median"], out["seconds"][0]["median"])
    for e in engines:
        e.close()
    return out


def render(result: dict) -> str:
    rows = []
    for q in result["quants"]:
        for i, (label, _, _) in enumerate(CONFIGS):
            buffers = ", ".join(f"{k} {v:.1f}" for k, v in q["weight_buffers_mib"][i].items())
            ratio = {0: "1", 1: common.fmt(q["guarded_over_default"]), 2: common.fmt(q["no_extras_over_default"])}[i]
            rows.append([q["quant"], label, buffers, common.spread(q["seconds"][i]), ratio])
    text = common.table(["weights", "load", "weight buffers, MiB", "decode s: median (min-max)", "over llama.cpp's choice"], rows)
    same = all(q["guarded_equals_default"] for q in result["quants"])
    text += (f"\nsmollm2-135m, one decode of {N_SEQ} sequences x {TOKENS_PER_SEQ} tokens (logits at the last position), "
             f"threads all; the three engines in one process, {result['rounds']} alternating rounds of "
             f"{result['repeats']} decodes after one warm-up. Guarded logits bit-identical to llama.cpp's choice: "
             f"{'yes' if same else 'NO'}.\n\n")
    return text + common.provenance(result) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    machine = common.machine_info()
    quants = [measure(q, args.rounds, args.repeats) for q in QUANTS]
    result = {"benchmark": NAME, "time": common.utc_now(), "machine": machine, "rounds": args.rounds,
              "repeats": args.repeats, "quants": quants}
    common.publish(NAME, TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
