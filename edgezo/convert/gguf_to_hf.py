"""GGUF (F32, F16, BF16 or quantized) -> a transformers-loadable directory: config.json, model.safetensors, tokenizer.

Weights are dequantized with gguf-py (`gguf.quants.dequantize`) to float32 and put back in HF's layout (the inverse
Q/K permutation for llama, 1 + w -> w for Gemma's norms). model.safetensors is written as a stream: its header is
computed from the GGUF's tensor shapes, then one tensor at a time is dequantized and appended, so peak memory stays
near the largest tensor. The tokenizer is rebuilt from the GGUF vocabulary by transformers' own GGUF converter.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgezo.files import EdgezoError, atomic_path

from .architectures import HParams, for_gguf
from .tokenizer import save_hf_tokenizer

Progress = Callable[[int, int], None]  # (tensors done, tensors total)


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: Progress | None = None) -> Path:
    """Write an HF model directory for `gguf_path` into `out_dir` (created if needed) and return it."""
    from gguf import GGUFReader

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    try:
        reader = GGUFReader(gguf_path)
    except Exception as exc:  # gguf raises ValueError, struct.error, ... on a bad file
        raise EdgezoError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc
    meta = _metadata(reader)
    names = {t.name for t in reader.tensors}
    arch, config = hf_config(meta, names, _n_vocab(reader), str(gguf_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    hp = HParams(config.to_dict())
    _write_safetensors(reader, arch, hp, out_dir / "model.safetensors", progress)
    with atomic_path(out_dir / "config.json") as tmp:
        tmp.write_text(config.to_json_string())
    save_hf_tokenizer(gguf_path, out_dir, meta.get("tokenizer.ggml.pre"))
    return out_dir


def hf_config(meta: dict[str, Any], tensor_names: set[str], n_vocab: int, source: str):
    """(convert's Architecture, the transformers config) of a GGUF model: `meta` holds its scalar and string keys
    and the sliding-window pattern as a list (what _metadata gives), `n_vocab` the rows of token_embd."""
    arch = for_gguf(str(meta.get("general.architecture")), source)
    if meta.get("general.type") == "adapter":
        raise EdgezoError(f"{source} is a LoRA adapter, not a model")
    prefix = arch.gguf_arch + "."
    arch_meta = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
    arch_meta["n_vocab"] = n_vocab
    return arch, _hf_config(arch, arch_meta, tensor_names, meta)


def _metadata(reader) -> dict[str, Any]:
    """Scalar and string fields by key, plus the few arrays we need (the sliding-window pattern); token lists
    are left to the tokenizer converter."""
    from gguf import GGUFValueType

    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types or (key.startswith("tokenizer.ggml.") and field.types[0] == GGUFValueType.ARRAY):
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            if key.endswith("sliding_window_pattern"):
                out[key] = [bool(field.parts[i][0]) for i in field.data]
            continue
        value = field.contents()
        out[key] = value
    return out


def _n_vocab(reader) -> int:
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            return int(t.shape[1])  # ggml ne = (n_embd, n_vocab)
    raise EdgezoError("GGUF has no token_embd.weight")


def _hf_config(arch, arch_meta: dict[str, Any], names: set[str], meta: dict[str, Any]):
    from transformers import AutoConfig

    kwargs = arch.hf_config(arch_meta, names)
    for key, gguf_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                          ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if gguf_key in meta:
            kwargs[key] = int(meta[gguf_key])
    config = AutoConfig.for_model(arch.hf_model_type, **kwargs)
    config.architectures = list(arch.hf_architectures[:1])
    config.dtype = "float32"
    return config


# ---- model.safetensors, streamed ------------------------------------------------------------------------------
def _write_safetensors(reader, arch, hp: HParams, path: Path, progress: Progress | None) -> None:
    """safetensors layout: u64 little-endian header length, JSON header (dtype, shape, byte offsets), raw data."""
    tensors = sorted(reader.tensors, key=lambda t: arch.hf_name(t.name))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        shape = [int(n) for n in reversed(t.shape)]  # ggml ne is innermost first; numpy is outermost first
        nbytes = int(np.prod(shape)) * 4
        header[arch.hf_name(t.name)] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, t in enumerate(tensors):
            f.write(memoryview(dequantize_to_hf(t, arch, hp)).cast("B"))  # no bytes copy of the tensor
            if progress is not None:
                progress(i + 1, len(tensors))


def dequantize_to_hf(t, arch, hp: HParams, chunk_rows: int = 1024) -> np.ndarray:
    """One tensor (gguf-py's ReaderTensor, or anything with its name, shape, tensor_type and data) as float32 in HF's
    layout. gguf-py's dequantizers hold several full-size temporaries, so rows are dequantized in chunks into one
    output array: peak memory ~ the float32 tensor plus a chunk."""
    from gguf import quants

    shape = tuple(int(n) for n in reversed(t.shape))  # numpy order, (n_out, n_in) for a linear weight
    raw = np.asarray(t.data)  # (rows, bytes per row) for block types, (rows, n_in) for F32/F16
    rows = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
    out = np.empty((rows.shape[0], shape[-1]), dtype=np.float32)
    for r0 in range(0, rows.shape[0], chunk_rows):
        out[r0 : r0 + chunk_rows] = quants.dequantize(rows[r0 : r0 + chunk_rows], t.tensor_type)
    return np.ascontiguousarray(arch.to_hf(t.name, out.reshape(shape), hp), dtype=np.float32)
