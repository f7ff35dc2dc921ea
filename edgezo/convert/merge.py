"""Fold a LoRA adapter into its base GGUF: one model file that llama.cpp runs with no adapter.

For every adapted linear tensor W (numpy (n_out, n_in); ggml ne (n_in, n_out)):
    W' = W + (alpha / r) * B @ A,   A: (r, n_in), B: (n_out, r)
which is exactly what llama.cpp computes at run time (W x + scale * B (A x)), up to float rounding.
Every other tensor and all metadata are copied; 2-D weights are stored in the requested type.

The base is memory-mapped by gguf.GGUFReader and written one tensor at a time, so peak memory is about one
dequantized tensor (the largest is usually token_embd: n_vocab x n_embd float32). Quantization uses gguf-py's
numpy quantizers (tested bit-for-bit against ggml by gguf-py); the k-quants have no numpy quantizer, so for
those the merge is written as f16 and then requantized by llama.cpp's own quantizer (edgezo.engine.quantize_gguf).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgezo.adapter import LoraAdapter
from edgezo.files import EdgezoError, atomic_path
from edgezo.formats import QUANT_FTYPES, copy_gguf_fields, gguf_field

# Output types gguf.quants can produce (--quant names; upper-cased, gguf.GGMLQuantizationType names).
NUMPY_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# Everything else llama.cpp's quantizer offers goes through an f16 merge first.
LLAMA_CPP_TYPES = tuple(t for t in QUANT_FTYPES if t not in NUMPY_TYPES)
OUTTYPES = NUMPY_TYPES + LLAMA_CPP_TYPES
# Where the requested type cannot hold a tensor, the type used instead and why it is this one.
ROW_FALLBACK = "F16"  # convert_hf_to_gguf.py falls back to F16 when a row is not a whole number of blocks
# llama.cpp keeps the output projection (or tied token_embd) at Q6_K in its 4/5-bit files because its error costs
# most; Q6_K has no numpy quantizer, so the nearest type above it, Q8_0, stands in.
OUTPUT_TYPE_FOR_LOW_BIT = "Q8_0"
LOW_BIT = {"Q4_0", "Q4_1", "Q5_0", "Q5_1"}

ProgressFn = Callable[[int, int, str], None]  # (n_tensors_done, n_tensors, tensor_name)


@dataclass(frozen=True)
class TensorPlan:
    """How one base tensor is written: `shape` in numpy order (..., n_in), the type, its byte size, and why the
    type differs from the requested one (None if it does not)."""

    name: str
    shape: tuple[int, ...]
    out_type: object  # gguf.GGMLQuantizationType
    n_bytes: int
    adapted: bool
    fallback: str | None = None


def merge_adapter(base_gguf: str | os.PathLike, adapter: LoraAdapter, out_gguf: str | os.PathLike,
                  outtype: str = "q8_0", progress: ProgressFn | None = None) -> Path:
    """Write base + adapter as one GGUF of `outtype` (one of OUTTYPES) to `out_gguf`, atomically."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise EdgezoError(f"unknown merge type {outtype!r}; choose from {', '.join(OUTTYPES)}")
    out_gguf = Path(out_gguf)
    if outtype in NUMPY_TYPES:
        with atomic_path(out_gguf) as tmp:
            _merge_numpy(Path(base_gguf), adapter, tmp, outtype, progress)
        return out_gguf
    from edgezo.engine import quantize_gguf  # imports llama_cpp: only for the k-quants

    out_gguf.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out_gguf.name}.", suffix=".f16.tmp", dir=out_gguf.parent)
    os.close(fd)
    f16 = Path(name)
    try:
        _merge_numpy(Path(base_gguf), adapter, f16, "f16", progress)
        with atomic_path(out_gguf) as tmp:
            quantize_gguf(f16, tmp, outtype)
    finally:
        f16.unlink(missing_ok=True)
    return out_gguf


def _open(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise EdgezoError(f"{path}: no such model file")
    try:
        return GGUFReader(path)  # memory-mapped, read-only
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on a bad file
        raise EdgezoError(f"{path} is not a readable GGUF file: {exc}") from exc


def _merge_numpy(base_path: Path, adapter: LoraAdapter, out_path: Path, outtype: str,
                 progress: ProgressFn | None) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    reader = _open(base_path)
    arch = gguf_field(reader, "general.architecture")
    _check_adapter(base_path, reader, arch, adapter)
    plans = _plan(reader, GGMLQuantizationType[outtype.upper()], adapter)

    writer = GGUFWriter(out_path, arch)
    _copy_metadata(reader, writer, outtype, adapter, plans)
    for plan in plans:
        # numpy-order shape with a non-uint8 dtype: the writer takes the shape as the element shape.
        writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.n_bytes, raw_dtype=plan.out_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (tensor, plan) in enumerate(zip(reader.tensors, plans)):
        writer.write_tensor_data(_tensor_bytes(tensor, plan, adapter))
        if progress is not None:
            progress(i + 1, len(plans), plan.name)
    writer.close()


def _check_adapter(path: Path, reader, arch: str, adapter: LoraAdapter) -> None:
    """Every adapter pair must sit on a 2-D tensor of the base with matching (n_out, n_in); all problems at once."""
    problems = []
    if adapter.architecture != arch:
        problems.append(f"adapter architecture {adapter.architecture!r}, the model's is {arch!r}")
    shapes = {t.name: (int(t.shape[1]), int(t.shape[0])) for t in reader.tensors if len(t.shape) == 2}
    for name, value in adapter.tensors.items():
        stem, _, half = name.rpartition(".")
        other = stem + (".lora_b" if half == "lora_a" else ".lora_a")
        expected = shapes.get(stem)
        if half not in ("lora_a", "lora_b") or other not in adapter.tensors:
            problems.append(f"{name}: not one half of a .lora_a/.lora_b pair")
        elif expected is None:
            problems.append(f"{name}: no 2-D tensor {stem} in the model")
        elif half == "lora_a" and value.shape != (adapter.config.rank, expected[1]):
            problems.append(f"{name}: shape {value.shape}, expected {(adapter.config.rank, expected[1])}")
        elif half == "lora_b" and value.shape != (expected[0], adapter.config.rank):
            problems.append(f"{name}: shape {value.shape}, expected {(expected[0], adapter.config.rank)}")
    if problems:
        raise EdgezoError(f"{path}: the adapter does not fit this model:\n  " + "\n  ".join(problems))


def _plan(reader, qtype, adapter: LoraAdapter) -> list[TensorPlan]:
    from gguf import GGML_QUANT_SIZES

    names = {t.name for t in reader.tensors}
    output = "output.weight" if "output.weight" in names else "token_embd.weight"  # tied embeddings
    plans = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml ne (n_in, n_out) -> numpy (n_out, n_in)
        out_type, why = _choose_type(t, shape, qtype, is_output=t.name == output)
        block, type_bytes = GGML_QUANT_SIZES[out_type]
        n_bytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_bytes
        adapted = t.name + ".lora_a" in adapter.tensors
        plans.append(TensorPlan(t.name, shape, out_type, n_bytes, adapted, why))
    return plans


def _choose_type(t, shape: tuple[int, ...], qtype, is_output: bool):
    """(type, reason or None). Like llama.cpp's quantizer, only 2-D+ `*weight` tensors of float types are
    converted; 1-D tensors (norms, biases) stay F32 whatever their input type; integer tensors are copied."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    if t.tensor_type in (T.I8, T.I16, T.I32, T.I64, T.F64):
        return t.tensor_type, None
    if len(shape) < 2 or not t.name.endswith("weight"):
        return T.F32, None
    if is_output and qtype.name in LOW_BIT:
        return T[OUTPUT_TYPE_FOR_LOW_BIT], f"output projection kept at {OUTPUT_TYPE_FOR_LOW_BIT} (llama.cpp keeps Q6_K)"
    block = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return T[ROW_FALLBACK], f"rows of {shape[-1]} are not a multiple of the {qtype.name} block of {block}"
    return qtype, None


def _tensor_bytes(tensor, plan: TensorPlan, adapter: LoraAdapter) -> np.ndarray:
    """The output data of one tensor: the mmapped input itself when nothing changes, else (dequantize, add
    the LoRA delta, quantize)."""
    from gguf import quants

    if tensor.tensor_type == plan.out_type and not plan.adapted:
        return tensor.data  # bit-exact copy, no rounding twice
    w = np.array(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(plan.shape)
    if plan.adapted:
        a = adapter.tensors[plan.name + ".lora_a"]  # (r, n_in)
        b = adapter.tensors[plan.name + ".lora_b"]  # (n_out, r)
        w += np.float32(adapter.config.scale) * (b @ a)  # (n_out, n_in), float32 like llama.cpp's runtime path
    return quants.quantize(w, plan.out_type)


def _copy_metadata(reader, writer, outtype: str, adapter: LoraAdapter, plans: list[TensorPlan]) -> None:
    """All key/values of the base, with general.file_type set to the new type and a record of the merge."""
    from gguf import LlamaFileType

    copy_gguf_fields(reader, writer, skip={"general.file_type", "general.quantization_version"})
    writer.add_file_type(int(LlamaFileType["ALL_F32" if outtype == "f32" else f"MOSTLY_{outtype.upper()}"]))
    if any(p.out_type.name not in ("F32", "F16", "BF16") for p in plans):
        writer.add_quantization_version(2)  # GGML_QNT_VERSION
    writer.add_uint32("edgezo.merge.lora_rank", adapter.config.rank)
    writer.add_float32("edgezo.merge.lora_alpha", adapter.config.alpha)
    writer.add_array("edgezo.merge.lora_targets", list(adapter.config.targets))
    fallbacks = [f"{p.name}: {p.out_type.name}, {p.fallback}" for p in plans if p.fallback]
    if fallbacks:
        writer.add_array("edgezo.merge.type_fallbacks", fallbacks)


def merge_report(merged_gguf: str | os.PathLike) -> dict:
    """What merge_adapter recorded in a merged file: file type, LoRA rank/alpha/targets, type fallbacks."""
    reader = _open(Path(merged_gguf))
    return {
        "file_type": gguf_field(reader, "general.file_type"),
        "lora_rank": gguf_field(reader, "edgezo.merge.lora_rank"),
        "lora_alpha": gguf_field(reader, "edgezo.merge.lora_alpha"),
        "lora_targets": gguf_field(reader, "edgezo.merge.lora_targets"),
        "type_fallbacks": gguf_field(reader, "edgezo.merge.type_fallbacks") or [],
        "tensor_types": {t.name: t.tensor_type.name for t in reader.tensors},
    }
