"""What a bug report needs: versions, the llama.cpp build, this CPU, which kernels the engine will use, and whether
a decode of a real model survives (run in a child process, so a crash is reported instead of suffered)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gguf import GGMLQuantizationType as Q

from . import __version__, kernels, threads
from .formats import GGML_TYPE_OF_QUANT

# CPU flags that decide llama.cpp's kernels (x86 and ARM names as /proc/cpuinfo spells them)
RELEVANT_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                      "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimdhp", "asimddp", "i8mm", "sve", "sve2",
                      "bf16")
ARM_BUILD_FEATURES = ("NEON", "ARM_FMA", "FP16_VA", "DOTPROD", "MATMUL_INT8", "SVE", "SVE_CNT", "SME")
# --quant name -> the ggml type of its matmul weights (a k-quant file mixes types: its main ones listed)
MATMUL_TYPES = {**GGML_TYPE_OF_QUANT, "q4_k": int(Q.Q4_K), "q5_k": int(Q.Q5_K), "q6_k": int(Q.Q6_K)}
PROBE_TEXTS = ("Review: a tender, funny film\nSentiment:", "Review: dull and far too long\nSentiment:",
               "The capital of France is", "def fibonacci(n):")
PROBE_TIMEOUT_S = 300


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def environment(cache_dir: Path, n_threads: int = 0) -> dict:
    """Everything but the probe. Imports llama.cpp (through the engine) but never torch."""
    from .engine import EngineConfig, system_info

    info = system_info()
    # on ARM, the kernel's HWCAP (what /proc/cpuinfo's Features shows, and right under qemu-user, where cpuinfo is the
    # host's)
    arm_cpu = kernels.cpu_arm_features()
    flags = arm_cpu if arm_cpu is not None else kernels.cpu_flags()
    plan = kernels.plan_kernels(info, flags, kernels.amx_mode())
    features = kernels.build_features(info)
    return {
        "edgezo": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: installed_version(name)
                     for name in ("llama-cpp-python", "gguf", "numpy", "torch", "transformers", "peft")},
        "torch_installed": importlib.util.find_spec("torch") is not None,
        "cpu": {
            "model": kernels.cpu_model_name(),
            "machine": platform.machine(),
            "n_cores": os.cpu_count(),
            "usable_cores": threads.usable_cores(),
            "flags": None if flags is None else [f for f in RELEVANT_CPU_FLAGS if f in flags],
        },
        "llama_cpp_system_info": info,
        "kernels": {
            "amx_mode": kernels.amx_mode().value,
            "amx_kernels_built": plan.amx_built,
            "cpu_has_amx": plan.amx_cpu,
            "avoid_amx": plan.avoid_amx,
            "decision": plan.reason,
            "repack_built": features.get("REPACK") == "1",
            "flash_attention": EngineConfig().flash_attn,
            # per --quant: the interleaved layout llama.cpp repacks its matmul weights into (None: the GGUF's own)
            "repack": kernels.repack_plan(features, MATMUL_TYPES),
            "arm": None if "NEON" not in features and arm_cpu is None else {
                "build": {name: features[name] for name in ARM_BUILD_FEATURES if name in features},
                "cpu": None if arm_cpu is None else sorted(arm_cpu),
                "missing_on_cpu": None if arm_cpu is None else kernels.arm_features_missing(features, arm_cpu),
            },
        },
        "threads": thread_choice(n_threads),
        "cache": {"path": str(cache_dir), "free_bytes": _free_bytes(cache_dir)},
    }


def thread_choice(n_threads: int = 0) -> dict:
    """The thread count the engine would start with now, and why: the one given, or what the load leaves free (the
    engine measures again before every decode), and OpenMP's wait settings (edgezo's, unless the user set them).
    Call after importing the engine, which sets them."""
    openmp = {name: os.environ.get(name) for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if n_threads:
        return {"n_threads": n_threads, "chosen_by": "--threads", "openmp": openmp}
    others_busy, chosen = threads.sample_load()
    return {"n_threads": chosen, "chosen_by": "load", "others_busy_cores": others_busy,
            "load_average": list(os.getloadavg()), "openmp": openmp}


def probe_decode(model_path: str | os.PathLike, n_threads: int = 0) -> dict:
    """Load `model_path` in the engine and score a batch of short prompts; meant to run in a child process."""
    import numpy as np

    from .engine import Engine, EngineConfig

    start = time.perf_counter()
    with Engine(model_path, EngineConfig(n_seq_max=len(PROBE_TEXTS), n_ctx_per_seq=64, n_threads=n_threads)) as engine:
        sequences = [engine.tokenize(text, add_special=True) for text in PROBE_TEXTS]
        logits = engine.logits(sequences, [[len(s) - 1] for s in sequences])
        return {
            "weight_buffers_mib": engine.weight_buffers_mib,
            "avoid_amx": engine.kernel_plan.avoid_amx,
            "n_sequences": len(sequences),
            "finite": bool(np.isfinite(logits).all()),
            "logits_sha256": hashlib.sha256(logits.tobytes()).hexdigest(),
            "seconds": round(time.perf_counter() - start, 3),
        }


def probe_in_child(model_path: str | os.PathLike, n_threads: int = 0, env: dict | None = None) -> dict:
    """probe_decode in a fresh interpreter. A crash comes back as {"ok": False, "signal": N} with stderr's tail."""
    code = ("import json, sys; from edgezo.doctor import probe_decode; "
            "print(json.dumps(probe_decode(sys.argv[1], int(sys.argv[2]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(model_path), str(n_threads)], capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT_S, env={**os.environ, **(env or {})})
    if proc.returncode == 0:
        return {"ok": True, **json.loads(proc.stdout.strip().splitlines()[-1])}
    failure = {"ok": False, "returncode": proc.returncode, "stderr_tail": proc.stderr.strip().splitlines()[-5:]}
    if proc.returncode < 0:
        failure["signal"] = -proc.returncode
    return failure
