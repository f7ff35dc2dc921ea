"""The parts of tools/arm64-check that run inside the emulated arm64 userland (and on the host, for the x86 side).

    python tools/arm64_inner.py system                       # build, CPU, repack plan: one JSON line
    python tools/arm64_inner.py quants Q [Q ...]             # each quant decodes the real model in a child process
    python tools/arm64_inner.py logits QUANT ADAPTER OUT.npy # last-position logits of PROMPTS with the adapter
    python tools/arm64_inner.py dequantize QUANT ADAPTER OUT.gguf  # the model with the adapter merged, all float32
    python tools/arm64_inner.py rss QUANT                    # peak RSS of imports, then of decodes, beside predictions

Each command prints one JSON object as its last line of stdout (a script, not library code: printing is its job).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time

MODEL = "smollm2-135m"
PROMPTS = ("Review: a tender, funny film that earns every tear\nSentiment:",
           "Review: dull, long and far too pleased with itself\nSentiment:",
           "The capital of France is", "def fibonacci(n):\n    ")


def system() -> dict:
    from edgezo import store
    from edgezo.doctor import environment

    env = environment(store.home(), n_threads=1)
    return {"system_info": env["llama_cpp_system_info"].strip(), "machine": env["cpu"]["machine"],
            "cpu_flags": env["cpu"]["flags"], "kernels": env["kernels"]}


def quants(names: list[str]) -> dict:
    """Per quant: a decode in a child process as llama.cpp places the weights, and again with edgezo's mirror of
    llama.cpp's repack rules placing them (EDGEZO_AMX=avoid): the same buffers and bit-identical logits mean the
    mirror chose as llama.cpp did."""
    import subprocess

    from edgezo import doctor, kernels, store
    from edgezo.doctor import MATMUL_TYPES, probe_in_child
    from edgezo.engine import system_info

    doctor.PROBE_TIMEOUT_S = 3600  # a decode of F32 weights under qemu on a loaded host took over doctor's 5 min

    features = kernels.build_features(system_info())
    results = {}
    for quant in names:
        path = store.resolve_model(MODEL, quant)
        start = time.monotonic()
        try:
            default = probe_in_child(path, n_threads=1, env={kernels.AMX_ENV: "auto"})
            guarded = probe_in_child(path, n_threads=1, env={kernels.AMX_ENV: "avoid"})
        except subprocess.TimeoutExpired as exc:
            results[quant] = {"ok": False, "mirror_matches": False, "weight_buffers_mib": None, "predicted_layout": None,
                              "failure": f"timed out after {exc.timeout} s"}
            continue
        ok = default["ok"] and guarded["ok"] and default["finite"] and guarded["finite"]
        results[quant] = {
            "ok": ok, "seconds": round(time.monotonic() - start, 1),
            "weight_buffers_mib": default.get("weight_buffers_mib"),
            "predicted_layout": kernels.repack_layout(MATMUL_TYPES[quant], 8 * 64, features) if quant in MATMUL_TYPES
            else None,
            "mirror_matches": ok and default["weight_buffers_mib"] == guarded["weight_buffers_mib"]
            and default["logits_sha256"] == guarded["logits_sha256"],
            **({} if ok else {"failure": default if not default["ok"] else guarded}),
        }
    return results


def logits(model: str, adapter_path: str, out: str) -> dict:
    """model: a quant of MODEL, or a GGUF file (then without the adapter: `dequantize` merged it)."""
    import numpy as np

    from edgezo import store
    from edgezo.adapter import LoraAdapter
    from edgezo.engine import Engine, EngineConfig

    merged = model.endswith(".gguf")
    path = model if merged else store.resolve_model(MODEL, model)
    config = EngineConfig(n_seq_max=len(PROMPTS), n_ctx_per_seq=64, n_threads=1)
    with Engine(path, config) as engine:
        if not merged:
            engine.set_adapter(LoraAdapter.load(adapter_path), in_place=False)
        sequences = [engine.tokenize(text, add_special=True) for text in PROMPTS]
        values = engine.logits(sequences, [[len(s) - 1] for s in sequences])
    np.save(out, values)
    return {"model": model, "shape": list(values.shape), "sha256": hashlib.sha256(values.tobytes()).hexdigest()}


def dequantize(quant: str, adapter_path: str, out: str) -> dict:
    """The same function without 8-bit activations: the adapter merged into the dequantized weights, all float32
    (llama.cpp multiplies float32 weights by float32 activations; the quantized model quantizes every matmul's
    activations to Q8_0 blocks first)."""
    from edgezo import store
    from edgezo.adapter import LoraAdapter
    from edgezo.convert.merge import merge_adapter

    merge_adapter(store.resolve_model(MODEL, quant), LoraAdapter.load(adapter_path), out, "f32")
    return {"quant": quant, "out": out}


def rss(quant: str) -> dict:
    """Peak RSS (VmHWM) of this fresh process at two points, beside the accountant's prediction for each: after
    what every edgezo process imports and reads before loading a model (RUNTIME_BASELINE_BYTES), and after loading
    MODEL at `quant` and 3 decodes of 4 x 24 tokens (tests/test_memory.py's measurement, on the real model)."""
    from edgezo import adapter, data, mezo, objective, store  # noqa: F401 (what an edgezo process imports)
    from edgezo.engine import Engine, EngineConfig, system_info
    from edgezo.files import peak_rss_bytes
    from edgezo.memory import RUNTIME_BASELINE_BYTES, predict_llama_cpp

    path = store.resolve_model(MODEL, quant)
    adapter.read_base_model_info(path)
    baseline = peak_rss_bytes()
    batch_size, n_ctx, n_tokens = 4, 64, 24
    with Engine(path, EngineConfig(n_seq_max=batch_size, n_ctx_per_seq=n_ctx, n_threads=1)) as engine:
        tokens = [[10 + (i + j) % 200 for j in range(n_tokens)] for i in range(batch_size)]
        for _ in range(3):
            engine.logits(tokens, [[n_tokens - 1]] * batch_size)
    predicted = predict_llama_cpp(path, "inference", batch_size, n_ctx, n_tokens_per_seq=n_tokens,
                                  system_info=system_info())
    return {"quant": quant, "baseline_bytes": baseline, "baseline_predicted_bytes": RUNTIME_BASELINE_BYTES,
            "decode_bytes": peak_rss_bytes(), "decode_predicted_bytes": predicted.total_bytes,
            "breakdown": predicted.breakdown}


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    result = {"system": lambda: system(), "quants": lambda: quants(args), "logits": lambda: logits(*args),
              "dequantize": lambda: dequantize(*args), "rss": lambda: rss(*args)}[command]()
    print(json.dumps(result))
