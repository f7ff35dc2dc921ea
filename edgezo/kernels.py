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
into CPU_REPACK. `repacked_by_llama_cpp` mirrors ggml_repack_get_optimal_repack_type (repack.cpp) for x86 and
ARM. The same rules tell the memory accountant which weights llama.cpp keeps a second, repacked copy of
(`repacked_tensors`), on any build, and `edgezo doctor` which kernels run. The tests check them against llama.cpp's
own choice and CPU_REPACK buffer on the real model for every quant type edgezo offers, on x86 and, under emulation,
on two ARM builds (tools/arm64-check).
"""

from __future__ import annotations

import os
import platform
import re
import sys
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
    """The CPU's feature flags (Linux /proc/cpuinfo: x86's 'flags' line, ARM's 'Features'), None where they cannot be
    read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else None


def cpu_model_name(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str | None:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    if match:
        return match.group(1).strip()
    # ARM Linux names no model: the implementer and part numbers do (0x41 is Arm Ltd; Linux's cputype.h)
    implementer = re.search(r"^CPU implementer\s*:\s*(0x[0-9a-f]+)", text, re.MULTILINE | re.IGNORECASE)
    part = re.search(r"^CPU part\s*:\s*(0x[0-9a-f]+)", text, re.MULTILINE | re.IGNORECASE)
    if not (implementer and part):
        return None
    key = (int(implementer.group(1), 16), int(part.group(1), 16))
    return ARM_CPU_PARTS.get(key, f"ARM implementer {implementer.group(1)} part {part.group(1)}")


ARM_CPU_PARTS = {(0x41, 0xD03): "Cortex-A53", (0x41, 0xD08): "Cortex-A72", (0x41, 0xD0B): "Cortex-A76",
                 (0x41, 0xD0C): "Neoverse-N1", (0x41, 0xD40): "Neoverse-V1", (0x41, 0xD41): "Cortex-A78",
                 (0x41, 0xD44): "Cortex-X1", (0x41, 0xD46): "Cortex-A510", (0x41, 0xD47): "Cortex-A710",
                 (0x41, 0xD48): "Cortex-X2", (0x41, 0xD49): "Neoverse-N2", (0x41, 0xD4D): "Cortex-A715",
                 (0x41, 0xD4E): "Cortex-X3", (0x41, 0xD4F): "Neoverse-V2", (0x41, 0xD80): "Cortex-A520",
                 (0x41, 0xD81): "Cortex-A720", (0x41, 0xD82): "Cortex-X4"}


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


# ---- which weights llama.cpp's CPU_REPACK buffer type takes, and in which layout --------------------------------
# ggml_repack_get_optimal_repack_type (ggml-cpu/repack.cpp of llama-cpp-python 0.3.36's llama.cpp), as data: per ggml
# type, llama.cpp's checks in its order as (features the build needs, output rows must be a multiple of, layout).
# The first rule whose features the build has and whose row count divides ne[1] wins; if none, no repack. x86 checks
# AVX2 / AVX512; ARM checks the build's NEON, DOTPROD (dotprod), MATMUL_INT8 (i8mm), SVE and the SVE vector length
# in bytes read at start-up (SVE_CNT): all compile-time but SVE_CNT, so a build's system info decides everything.
# The layout is llama.cpp's interleave (columns x rows per block group), e.g. Q4_0 "4x8" = q4_0_4x8_q8_0.
_DOTPROD, _I8MM = {"NEON": "1", "DOTPROD": "1"}, {"NEON": "1", "MATMUL_INT8": "1"}
_REPACK_RULES: dict[int, tuple[tuple[dict[str, str], int, str], ...]] = {
    Q.Q4_0: (({"AVX2": "1"}, 8, "8x8"), ({"SVE": "1", "MATMUL_INT8": "1", "SVE_CNT": "32"}, 8, "8x8"),
             (_I8MM, 4, "4x8"), (_DOTPROD, 4, "4x4")),
    Q.Q4_K: (({"AVX2": "1"}, 8, "8x8"), (_I8MM, 8, "8x8"), (_DOTPROD, 8, "8x4")),
    Q.Q2_K: (({"AVX512": "1"}, 8, "8x8"),),
    Q.Q5_K: ((_I8MM, 8, "8x8"), (_DOTPROD, 8, "8x4")),
    Q.Q6_K: ((_I8MM, 8, "8x8"), (_DOTPROD, 8, "8x4")),
    Q.IQ4_NL: (({"AVX2": "1"}, 8, "8x8"), (_DOTPROD, 4, "4x4")),
    Q.MXFP4: (({"AVX2": "1"}, 8, "8x8"), (_DOTPROD, 4, "4x4")),
    Q.Q8_0: ((_I8MM, 4, "4x8"), (_DOTPROD, 4, "4x4")),
}
_MATMUL_WEIGHT = re.compile(r"^(blk\.\d+\.[a-z0-9_]+|output)\.weight$")


def repack_layout(ggml_type: int, n_rows: int, features: dict[str, str]) -> str | None:
    """The interleave llama.cpp repacks a matmul weight of `ggml_type` with `n_rows` output rows (ne[1]) into on a
    build with these system-info `features`, e.g. "4x8"; None if it stays in its GGUF layout."""
    for needs, rows, layout in _REPACK_RULES.get(ggml_type, ()):
        if all(features.get(name) == value for name, value in needs.items()) and n_rows % rows == 0:
            return layout
    return None


def repacked_by_llama_cpp(name: str, ggml_type: int, dims: tuple[int, ...], features: dict[str, str]) -> bool:
    """Whether CPU_REPACK would take tensor `name` on this build (x86 or ARM). Only 2-D matmul weights of the listed
    types; token_embd is excluded because llama.cpp reads it with get_rows, which repacked data cannot serve."""
    if len(dims) != 2 or not _MATMUL_WEIGHT.match(name):
        return False
    return repack_layout(ggml_type, dims[1], features) is not None


def repacked_tensors(tensor_types: dict[str, int], tensor_dims: dict[str, tuple[int, ...]],
                     features: dict[str, str]) -> list[str]:
    """The tensors of a GGUF (ggml dims: (n_in, n_out) for a matrix) of which llama.cpp keeps a CPU_REPACK copy on
    this build. With tied embeddings (no output.weight) llama.cpp loads token_embd a second time as the output
    matrix: the input copy stays as mapped (get_rows), the output copy goes where any output weight of its type goes,
    so token_embd is listed when the output rule takes it (ARM repacks Q8_0 and Q6_K; x86 never does for the types
    llama.cpp gives an output matrix). The guard (engine.buffers) cannot place that copy by name without moving the
    input copy too, so it leaves it unrepacked."""
    if features.get("REPACK") != "1":
        return []
    names = [n for n, t in tensor_types.items() if repacked_by_llama_cpp(n, t, tensor_dims[n], features)]
    embd = "token_embd.weight"
    if "output.weight" not in tensor_types and embd in tensor_types and \
            repacked_by_llama_cpp("output.weight", tensor_types[embd], tensor_dims[embd], features):
        names.append(embd)
    return names


def repack_plan(features: dict[str, str], ggml_types: dict[str, int]) -> dict[str, str | None]:
    """{name: layout or None} for each ggml type (a matmul weight with rows a multiple of 8, as every model edgezo
    ships has): which kernels the matmuls of a model in that type run on this build, for `edgezo doctor`."""
    if features.get("REPACK") != "1":
        return {name: None for name in ggml_types}
    return {name: repack_layout(ggml_type, 8 * 64, features) for name, ggml_type in ggml_types.items()}


# ---- ARM CPU features: what the CPU offers (the kernel's HWCAP bits), beside what a build uses -------------------
# Linux arch/arm64/include/uapi/asm/hwcap.h, named as /proc/cpuinfo's Features line spells them
ARM_HWCAP = {"fp": 0, "asimd": 1, "fphp": 9, "asimdhp": 10, "asimdrdm": 12, "asimddp": 20, "sve": 22}
ARM_HWCAP2 = {"sve2": 1, "i8mm": 13, "bf16": 14, "sme": 23}
AT_HWCAP, AT_HWCAP2 = 16, 26
# system-info feature of a build -> the CPU feature it executes (a build using one the CPU lacks dies with SIGILL)
ARM_BUILD_NEEDS = {"NEON": "asimd", "FP16_VA": "asimdhp", "DOTPROD": "asimddp", "MATMUL_INT8": "i8mm", "SVE": "sve",
                   "SME": "sme"}


def arm_features(hwcap: int, hwcap2: int) -> frozenset[str]:
    return frozenset({n for n, bit in ARM_HWCAP.items() if hwcap >> bit & 1} |
                     {n for n, bit in ARM_HWCAP2.items() if hwcap2 >> bit & 1})


def cpu_arm_features() -> frozenset[str] | None:
    """This ARM CPU's features from getauxval (what llama.cpp itself asks at run time; under qemu-user these are the
    emulated CPU's, while /proc/cpuinfo is the host's). None off aarch64 Linux."""
    if platform.machine() not in ("aarch64", "arm64") or not sys.platform.startswith("linux"):
        return None
    import ctypes

    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return arm_features(getauxval(AT_HWCAP), getauxval(AT_HWCAP2))


def arm_features_missing(features: dict[str, str], cpu: frozenset[str]) -> list[str]:
    """The build's ARM features (system info) that this CPU does not execute."""
    return [name for name, flag in ARM_BUILD_NEEDS.items() if features.get(name) == "1" and flag not in cpu]


def override_patterns(names: list[str]) -> list[str]:
    """Anchored regexes matching exactly `names`, one per block: llama.cpp compiles every pattern for every tensor,
    so one pattern per tensor would cost (tensors x tensors) regex compilations at load."""
    kinds_by_block: dict[str, list[str]] = {}
    for name in names:
        block, _, kind = name.removesuffix(".weight").rpartition(".")  # ("blk.3", "attn_q") or ("", "output")
        kinds_by_block.setdefault(block, []).append(re.escape(kind))
    return [f"^{re.escape(block + '.') if block else ''}({'|'.join(sorted(kinds))})\\.weight$"
            for block, kinds in sorted(kinds_by_block.items())]
