"""Which of llama.cpp's CPU kernels the engine lets run, decided from the build's system info and this CPU's flags.

Why this exists (read in the ggml sources that llama-cpp-python 0.3.36 vendors):
* A native build (`-march=native`, llama-cpp-python's default) on an Intel Xeon with AMX defines __AMX_INT8__, and
  ggml-cpu/amx/amx.cpp is compiled when `__AMX_INT8__ && __AVX512VNNI__`. Its buffer type ("AMX") is then the first
  of the CPU's extra buffer types (ggml-cpu.cpp, ggml_backend_cpu_get_extra_buffer_types), ahead of "CPU_REPACK".
* llama.cpp puts every matmul weight into the first buffer type whose supports_op accepts it: for AMX that is
  Q4_0, Q4_1, Q8_0 (rows a multiple of 32) and Q4_K, Q5_K, Q6_K, IQ4_XS (rows a multiple of 256), output rows a
  multiple of 32, contiguous, F32 activations: nearly every weight of every model edgezo runs.
* The first decode then crashed in ggml_backend_amx_mul_mat on a Sapphire Rapids VM (llama.cpp issue 20824 shows
  the same trace; a pending fix requests the tile-data permission per thread, arch_prctl(ARCH_REQ_XCOMP_PERM),
  which ggml_amx_init does for the loading thread only). `AMX_INT8 = 1` in llama_print_system_info is exactly
  "compiled with __AMX_INT8__" (ggml_cpu_has_amx_int8), so the build can be recognised from Python.

edgezo's install builds without AMX (-mno-amx-*, see the Makefile). For any other build on an AMX CPU the engine
loads the model with llama.cpp's extra buffer types off (so nothing reaches the AMX buffer type) and gives back the
repacked kernels by placing, through tensor buffer-type overrides, exactly the weights CPU_REPACK would have taken
into CPU_REPACK. `repacked_by_llama_cpp` mirrors ggml_repack_get_optimal_repack_type for x86 (repack.cpp); the
tests check it against llama.cpp's own choice on the real model for every quant type edgezo offers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from gguf import GGMLQuantizationType as Q

AMX_ENV = "EDGEZO_AMX"  # auto | avoid | allow


class AmxMode(str, Enum):
    AUTO = "auto"    # avoid AMX kernels when they are compiled in and the CPU has (or may have) AMX
    AVOID = "avoid"  # always load as if they were: the guarded path, also on CPUs without AMX (tests, doubt)
    ALLOW = "allow"  # llama.cpp's own choice even on an AMX CPU (to measure the AMX kernels, at your own risk)


AMX_CPU_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class KernelPlan:
    amx_built: bool         # the build has ggml's AMX kernels (system info AMX_INT8 = 1)
    amx_cpu: bool | None    # this CPU has AMX (None: could not read the CPU's flags)
    avoid_amx: bool         # load with extra buffer types off plus CPU_REPACK overrides
    reason: str


def build_features(system_info: str) -> dict[str, str]:
    """`NAME = VALUE` pairs of llama_print_system_info(), e.g. {'AVX2': '1', 'AMX_INT8': '1', 'REPACK': '1'}."""
    return {name: value for name, value in re.findall(r"([A-Z][A-Z0-9_]*) = ([^|]+?)\s*(?:\||$)", system_info)}


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags (Linux /proc/cpuinfo 'flags' line), None where they cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else None


def cpu_model_name(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str | None:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def amx_mode(value: str | None = None) -> AmxMode:
    """The mode from `value` or $EDGEZO_AMX (default auto); ValueError names the choices."""
    text = (value if value is not None else os.environ.get(AMX_ENV, AmxMode.AUTO.value)).strip().lower()
    try:
        return AmxMode(text)
    except ValueError:
        raise ValueError(f"{AMX_ENV}={text!r}: choose {', '.join(m.value for m in AmxMode)}") from None


def plan_kernels(system_info: str, flags: frozenset[str] | None, mode: AmxMode = AmxMode.AUTO) -> KernelPlan:
    amx_built = build_features(system_info).get("AMX_INT8") == "1"
    amx_cpu = None if flags is None else any(f in flags for f in AMX_CPU_FLAGS)
    if mode is AmxMode.ALLOW:
        return KernelPlan(amx_built, amx_cpu, False, f"{AMX_ENV}=allow: llama.cpp chooses its kernels")
    if mode is AmxMode.AVOID:
        return KernelPlan(amx_built, amx_cpu, True, f"{AMX_ENV}=avoid: AMX buffer type bypassed")
    if not amx_built:
        return KernelPlan(False, amx_cpu, False, "this llama.cpp build has no AMX kernels")
    if amx_cpu is False:
        return KernelPlan(True, False, False, "AMX kernels are built in but this CPU has no AMX, so llama.cpp does not use them")
    return KernelPlan(True, amx_cpu, True, (
        "this llama.cpp build has AMX kernels, which crashed on AMX CPUs (ggml_backend_amx_mul_mat); "
        "loading without them, repacked kernels kept (a build without AMX: `make install-llama-cpp`)"))


# ---- which weights llama.cpp's CPU_REPACK buffer type takes on x86 (ggml_repack_get_optimal_repack_type) ----------
_REPACK_WITH_AVX2 = {Q.Q4_0, Q.Q4_K, Q.IQ4_NL, Q.MXFP4}  # each when ne[1] % 8 == 0
_REPACK_WITH_AVX512 = {Q.Q2_K}
_REPACK_ROWS = 8
_MATMUL_WEIGHT = re.compile(r"^(blk\.\d+\.[a-z0-9_]+|output)\.weight$")


def repacked_by_llama_cpp(name: str, ggml_type: int, dims: tuple[int, ...], features: dict[str, str]) -> bool:
    """Whether CPU_REPACK would take tensor `name` on this x86 build. Only 2-D matmul weights of the listed types;
    token_embd is excluded because llama.cpp reads it with get_rows, which repacked data cannot serve."""
    if len(dims) != 2 or dims[1] % _REPACK_ROWS or not _MATMUL_WEIGHT.match(name):
        return False
    has = lambda feature: features.get(feature) == "1"  # noqa: E731
    return (has("AVX2") and ggml_type in _REPACK_WITH_AVX2) or (has("AVX512") and ggml_type in _REPACK_WITH_AVX512)


def override_patterns(names: list[str]) -> list[str]:
    """Anchored regexes matching exactly `names`, one per block: llama.cpp compiles every pattern for every tensor,
    so one pattern per tensor would cost (tensors x tensors) regex compilations at load."""
    kinds_by_block: dict[str, list[str]] = {}
    for name in names:
        block, _, kind = name.removesuffix(".weight").rpartition(".")  # ("blk.3", "attn_q") or ("", "output")
        kinds_by_block.setdefault(block, []).append(re.escape(kind))
    return [f"^{re.escape(block + '.') if block else ''}({'|'.join(sorted(kinds))})\\.weight$"
            for block, kinds in sorted(kinds_by_block.items())]
