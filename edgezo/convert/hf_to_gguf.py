"""Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer) -> one GGUF file llama.cpp loads.

Streaming: the GGUF header (metadata and every tensor's name, shape and type) is written first from the
safetensors headers alone; then each tensor is read, transformed, quantized and appended one at a time, so
peak memory stays near the largest tensor (a few copies of it), not the model.

Types follow llama.cpp's converter: 1-D tensors and norms stay F32; everything else gets `outtype`, quantized
with gguf-py's reference quantizers (bit-identical to ggml's, tests/test_convert_hf.py); a tensor whose rows do
not split into whole quantization blocks falls back to F16, as llama.cpp does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgezo.files import EdgezoError, atomic_path

from .architectures import Architecture, HParams, for_hf_config
from .tokenizer import read_vocab, write_vocab

Progress = Callable[[int, int], None]  # (tensors done, tensors total)

# outtype -> (GGMLQuantizationType name, LlamaFileType value written as general.file_type)
OUTTYPES: dict[str, tuple[str, int]] = {
    "f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7),
    "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3), "q5_0": ("Q5_0", 8), "q5_1": ("Q5_1", 9),
}


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where its data comes from and what it becomes."""

    gguf_name: str
    shape: tuple[int, ...]  # numpy / HF order, (n_out, n_in) for a linear weight
    qtype: object  # gguf.GGMLQuantizationType
    source: Path | None  # safetensors file, None for a generated tensor
    hf_name: str | None


def convert_hf_to_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f32",
                       progress: Progress | None = None) -> Path:
    """Convert an HF model directory to a GGUF at `out_path` (written atomically) and return the path."""
    from gguf import GGUFWriter

    model_dir, out_path = Path(model_dir), Path(out_path)
    if outtype.lower() not in OUTTYPES:
        raise EdgezoError(f"unknown outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    qname, file_type = OUTTYPES[outtype.lower()]
    hp = HParams(_read_config(model_dir))
    arch = for_hf_config(hp.raw, str(model_dir / "config.json"))
    vocab = read_vocab(model_dir, int(hp.require("vocab_size")), arch.spm_add_space_prefix)
    plan = _plan(model_dir, arch, hp, qname)
    with atomic_path(out_path) as tmp:
        writer = GGUFWriter(tmp, arch.gguf_arch)
        try:
            _write_metadata(writer, model_dir, arch, hp, vocab, file_type)
            for p in plan:
                writer.add_tensor_info(p.gguf_name, *_stored_shape_dtype_nbytes(p), raw_dtype=p.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            extra = arch.extra_tensors(hp)
            for i, p in enumerate(plan):
                data = extra[p.gguf_name] if p.source is None else _load(p, arch, hp)
                writer.write_tensor_data(_quantize(data, p.qtype))
                if progress is not None:
                    progress(i + 1, len(plan))
        finally:
            writer.close()
    return out_path


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise EdgezoError(f"{model_dir}: no config.json; is it a Hugging Face model directory?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EdgezoError(f"{path}: invalid JSON ({exc})") from exc
    # Multimodal wrappers keep the language model's values under text_config (as llama.cpp's TextModel does).
    return {**config, **config.get("text_config", {})}


def _write_metadata(writer, model_dir: Path, arch: type[Architecture], hp: HParams, vocab, file_type: int) -> None:
    from gguf import GGML_QUANT_VERSION

    writer.add_name(model_dir.name)
    arch.write_hparams(writer, hp)
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    write_vocab(writer, model_dir, vocab)


# ---- the plan: names, shapes and types from the safetensors headers --------------------------------------------
def _safetensors_files(model_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise EdgezoError(f"{model_dir}: no *.safetensors weights (PyTorch .bin checkpoints are not supported)")
    out = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


def _plan(model_dir: Path, arch: type[Architecture], hp: HParams, qname: str) -> list[TensorPlan]:
    from safetensors import safe_open

    tied = bool(hp.get("tie_word_embeddings", default=False))
    plan, unknown = [], []
    for name, data in arch.extra_tensors(hp).items():
        plan.append(TensorPlan(name, data.shape, _qtype("F32"), None, None))
    for hf_name, file in _safetensors_files(model_dir).items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        try:
            gguf_name = arch.gguf_name(hf_name)
        except EdgezoError:
            unknown.append(hf_name)
            continue
        if gguf_name is None:
            continue
        with safe_open(file, framework="numpy") as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        plan.append(TensorPlan(gguf_name, shape, _output_qtype(gguf_name, shape, qname), file, hf_name))
    if unknown:
        raise EdgezoError(f"{model_dir}: {len(unknown)} tensor(s) the {arch.gguf_arch} converter does not know: "
                          + ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else ""))
    return sorted(plan, key=lambda p: _order(p.gguf_name))


def _order(name: str) -> tuple:
    """Write order: global tensors first, then blocks by index (llama.cpp does not care; readers like it)."""
    parts = name.split(".")
    return (1, int(parts[1]), name) if parts[0] == "blk" else (0, 0, name)


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def _output_qtype(gguf_name: str, shape: tuple[int, ...], qname: str):
    from gguf import GGML_QUANT_SIZES

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return _qtype("F32")  # llama.cpp's kernels take norms and biases in F32 only
    qtype = _qtype(qname)
    block_size = GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block_size == 0 else _qtype("F16")


def _stored_shape_dtype_nbytes(p: TensorPlan) -> tuple[tuple[int, ...], np.dtype, int]:
    """Arguments for GGUFWriter.add_tensor_info: quantized tensors are byte arrays (uint8) of their block rows."""
    from gguf import quant_shape_to_byte_shape

    name = p.qtype.name
    if name in ("F32", "F16"):
        dtype = np.dtype(np.float32 if name == "F32" else np.float16)
        return p.shape, dtype, int(np.prod(p.shape)) * dtype.itemsize
    byte_shape = quant_shape_to_byte_shape(p.shape, p.qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


# ---- one tensor at a time --------------------------------------------------------------------------------------
def _load(p: TensorPlan, arch: type[Architecture], hp: HParams) -> np.ndarray:
    """Read one HF tensor as float32 (bf16 has no numpy dtype: go through torch) and apply the architecture's rules."""
    from safetensors import safe_open

    with safe_open(p.source, framework="pt") as f:
        data = f.get_tensor(p.hf_name).float().numpy()
    return np.ascontiguousarray(arch.to_gguf(p.gguf_name, data, hp), dtype=np.float32)


def _quantize(data: np.ndarray, qtype) -> np.ndarray:
    from gguf import quants

    return quants.quantize(data, qtype)
