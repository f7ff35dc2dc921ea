"""A model's shape for the accountant: read from a GGUF header, or built from an architecture alone (the
capacity analysis)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import QK_K, GGMLQuantizationType

from ..files import EdgezoError
from ..formats import GGML_TYPE_OF_QUANT, GgufHeader, read_header, tensor_nbytes

MIB = 2**20
F16_BYTES, F32_BYTES, F64_BYTES = 2, 4, 8


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a GGUF the accountant needs, read from its header (no weights loaded)."""

    architecture: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_vocab: int
    tensor_bytes: dict[str, int] = field(repr=False)  # tensor name -> bytes of its data in the file
    tensor_types: dict[str, int] = field(repr=False)  # tensor name -> ggml type number
    linear_shapes: dict[str, tuple[int, int]] = field(repr=False)  # 2-D tensor name -> (n_out, n_in)
    tensor_numel: dict[str, int] = field(default_factory=dict, repr=False)  # tensor name -> number of elements

    @property
    def n_params(self) -> int:
        return sum(self.tensor_numel.values())

    @property
    def tied_embeddings(self) -> bool:
        """No output.weight: the LM head reuses token_embd (SmolLM2, Gemma 3, small Qwen2.5 / Llama 3.2)."""
        return "output.weight" not in self.tensor_bytes


@dataclass(frozen=True)
class Prediction:
    total_bytes: int
    breakdown: dict[str, int]  # term name (ending in _bytes) -> bytes; sums to total_bytes


def read_model_shape(path: str | os.PathLike) -> ModelShape:
    header = read_header(Path(path))
    return model_shape(header, Path(path))


def model_shape(header: GgufHeader, path: Path) -> ModelShape:
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise EdgezoError(f"{path} has no general.architecture; is it a GGUF model?")

    def number(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if not isinstance(value, int):  # missing, or a per-layer array (skipped by the header walk)
            raise EdgezoError(f"{path}: {arch}.{key} is missing or not a single integer; cannot size its memory")
        return value

    n_embd, n_head = number("embedding_length"), number("attention.head_count")
    head_dim = n_embd // n_head  # llama.cpp's default when the file does not give key/value lengths
    embd = header.tensor_dims.get("token_embd.weight")
    if embd is None or len(embd) != 2:
        raise EdgezoError(f"{path} has no 2-D token_embd.weight; cannot tell its vocabulary size")
    return ModelShape(
        architecture=arch, n_layers=number("block_count"), n_embd=n_embd, n_ff=number("feed_forward_length"),
        n_head=n_head, n_head_kv=number("attention.head_count_kv", n_head),
        key_length=number("attention.key_length", head_dim), value_length=number("attention.value_length", head_dim),
        n_vocab=int(embd[1]),
        tensor_bytes={n: tensor_nbytes(d, header.tensor_types[n]) for n, d in header.tensor_dims.items()},
        tensor_types=dict(header.tensor_types),
        linear_shapes={n: (int(d[1]), int(d[0])) for n, d in header.tensor_dims.items() if len(d) == 2},
        tensor_numel={n: math.prod(int(x) for x in d) for n, d in header.tensor_dims.items()},
    )


# ---- shapes from an architecture, without a GGUF file (the capacity analysis) ----------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A model's architecture as its Hugging Face config.json gives it (edgezo/model_families.toml)."""

    name: str
    architecture: str  # GGUF architecture name: llama, qwen2, gemma3
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    family: str = ""
    hf_repo: str = ""
    params: int = 0  # the published total, checked against the architecture in tests


SPEC_ARCHITECTURES = ("llama", "qwen2", "gemma3")
GGML_F32, GGML_Q8_0, GGML_Q6_K = GGMLQuantizationType.F32, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q6_K


def gguf_tensor_dims(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The tensors llama.cpp's converter writes for `spec`, in ggml order ((n_in, n_out) for a matrix)."""
    if spec.architecture not in SPEC_ARCHITECTURES:
        raise EdgezoError(f"{spec.name}: architecture {spec.architecture!r} is not one of {', '.join(SPEC_ARCHITECTURES)}")
    h, ff, q, kv = spec.hidden, spec.intermediate, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    dims: dict[str, tuple[int, ...]] = {"token_embd.weight": (h, spec.vocab), "output_norm.weight": (h,)}
    if not spec.tied:
        dims["output.weight"] = (h, spec.vocab)
    for i in range(spec.n_layers):
        b = f"blk.{i}."
        dims.update({b + "attn_norm.weight": (h,), b + "attn_q.weight": (h, q), b + "attn_k.weight": (h, kv),
                     b + "attn_v.weight": (h, kv), b + "attn_output.weight": (q, h), b + "ffn_norm.weight": (h,),
                     b + "ffn_gate.weight": (h, ff), b + "ffn_up.weight": (h, ff), b + "ffn_down.weight": (ff, h)})
        if spec.architecture == "qwen2":  # Qwen2 has biases on q, k and v
            dims.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
        if spec.architecture == "gemma3":  # q/k norms and the norms after attention and after the FFN
            dims.update({b + "attn_q_norm.weight": (spec.head_dim,), b + "attn_k_norm.weight": (spec.head_dim,),
                         b + "post_attention_norm.weight": (h,), b + "post_ffw_norm.weight": (h,)})
    return dims


def quantized_tensor_type(name: str, dims: tuple[int, ...], quant: str, tied: bool) -> int:
    """The type llama.cpp's quantizer (llama_tensor_get_type, vendored commit) gives a tensor for `--quant`.

    1-D tensors stay F32. For a quantized file type the output matrix (output.weight, or token_embd when the
    embeddings are tied) becomes Q8_0 if its rows do not split into 256-wide K-quant blocks, else Q6_K (Q8_0 stays
    Q8_0); checked against the Q4_0 / Q8_0 files of SmolLM2-135M and Gemma-3-270M."""
    if quant not in GGML_TYPE_OF_QUANT:
        raise EdgezoError(f"--quant {quant!r} cannot be sized from an architecture alone; "
                          f"choose from {', '.join(GGML_TYPE_OF_QUANT)}")
    ggml_type = GGML_TYPE_OF_QUANT[quant]
    if len(dims) < 2:
        return GGML_F32
    quantized = quant.startswith("q")
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if quantized and is_output:
        return GGML_Q8_0 if dims[0] % QK_K or ggml_type == GGML_Q8_0 else GGML_Q6_K
    return ggml_type


def shape_from_spec(spec: ModelSpec, quant: str = "q4_0") -> ModelShape:
    """The ModelShape read_model_shape would give for `spec` converted by llama.cpp and quantized to `quant`."""
    dims = gguf_tensor_dims(spec)
    types = {n: quantized_tensor_type(n, d, quant.lower(), spec.tied) for n, d in dims.items()}
    return ModelShape(
        architecture=spec.architecture, n_layers=spec.n_layers, n_embd=spec.hidden, n_ff=spec.intermediate,
        n_head=spec.n_heads, n_head_kv=spec.n_kv_heads, key_length=spec.head_dim, value_length=spec.head_dim,
        n_vocab=spec.vocab, tensor_bytes={n: tensor_nbytes(d, types[n]) for n, d in dims.items()}, tensor_types=types,
        linear_shapes={n: (d[1], d[0]) for n, d in dims.items() if len(d) == 2},
        tensor_numel={n: math.prod(d) for n, d in dims.items()},
    )
