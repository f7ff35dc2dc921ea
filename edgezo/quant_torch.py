"""Backpropagation through a quantized GGUF base: linear layers that keep llama.cpp's own blocks and dequantize on use.

QLoRA-style BP (and Apple's MeBP on phones) keeps the frozen base quantized and trains only the LoRA tensors. Here the
base is the run's GGUF itself, so BP trains on exactly the weights MeZO sees through llama.cpp:

    QuantLinear        an nn.Linear whose weight is the GGUF tensor's raw blocks (uint8, `qweight`), never a float copy
    _DequantLinear     its autograd function: forward  y = x W^T (+ b), W dequantized for this call only (into a
                       float32 buffer shared by all layers of that shape); backward dx = dy W, W dequantized again;
                       W gets no gradient; only the blocks are saved
    dequantize         GGUF blocks -> float32 rows, vectorised torch ops for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and views for
                       F32 / F16 / BF16, bit-exact with gguf-py's `gguf.quants.dequantize` (tests/test_quant_torch.py);
                       any other type gguf-py knows (the K-quants, ...) goes through gguf-py itself, exact but slower
    causal_lm_from_gguf  the transformers model of a GGUF with every linear a QuantLinear on the file's blocks and the
                       rest (embeddings, norms, biases) dequantized to float32; the float linear weights never exist

Why not a library: bitsandbytes' 4-bit types are the NF4 / FP4 codebooks (not Q4_0's uniform (q - 8) d) and its int8
scales whole rows; torchao's CPU int4 path (tinygemm, `_weight_int4pack_mm_for_cpu`) stores bfloat16 scales and float
zero points, which cannot hold Q4_0's float16 scales exactly; hqq could express (q - z) s with group 32, but its CPU
backend is the same dequantize-then-matmul in torch, behind a repack into its own bit layout. None of them reads GGUF.

GGUF block layouts (ggml-common.h; 32 weights a block, d and m float16, little-endian):
    Q8_0  d | qs int8[32]                        w = d q
    Q4_0  d | qs u8[16]                          w = d (q - 8),   q = low nibble (elements 0..15) / high (16..31)
    Q4_1  d | m | qs u8[16]                      w = d q + m
    Q5_0  d | qh u32 | qs u8[16]                 w = d (q - 16),  q = nibble | (bit j of qh) << 4
    Q5_1  d | m | qh u32 | qs u8[16]             w = d q + m
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from .files import EdgezoError
from .formats import read_header, tensor_nbytes

Q = GGMLQuantizationType
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)  # bit i of a byte, little-endian


# ---- blocks -> float32 ---------------------------------------------------------------------------------------------
class Scratch(NamedTuple):
    """Reusable temporaries of one weight shape's dequantization, so a forward allocates nothing for it. Allocated
    per call, these ~2 bytes per weight were freed between the activations a step keeps, and glibc kept the holes:
    SmolLM2 Q4_0, batch 16 x 60, checkpointing: 1360 MiB after a step with them, 1117 MiB without."""

    codes: torch.Tensor  # (n_blocks, 32) uint8
    scale: torch.Tensor  # (n_blocks, 1) float32

    @classmethod
    def new(cls, n_blocks: int) -> Scratch:
        return cls(torch.empty(n_blocks, 32, dtype=torch.uint8), torch.empty(n_blocks, 1))


def _f16(blocks: torch.Tensor, at: int, s: Scratch | None) -> torch.Tensor:
    """The float16 at byte `at` of each block as float32, (n_blocks, 1): a view of the bytes, converted."""
    half = blocks[:, at : at + 2].view(torch.float16)
    return half.float() if s is None else s.scale.copy_(half)


def _nibbles(qs: torch.Tensor, s: Scratch | None) -> torch.Tensor:
    """(n_blocks, 16) bytes -> (n_blocks, 32) 4-bit values: the low nibbles are elements 0..15, the high 16..31."""
    if s is None:
        return torch.cat([qs & 0x0F, qs >> 4], dim=1)
    torch.bitwise_and(qs, 0x0F, out=s.codes[:, :16])
    torch.bitwise_right_shift(qs, 4, out=s.codes[:, 16:])
    return s.codes


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n_blocks, 4) bytes of a little-endian u32 -> (n_blocks, 32) values 0 or 16: bit j is element j's fifth bit.
    Read byte by byte: the u32 sits at an odd multiple of 2 bytes in a Q5_0 block, so it cannot be viewed as int32."""
    return (((qh.unsqueeze(-1) >> _BIT_SHIFTS) & 1) << 4).reshape(qh.shape[0], 32)


# Each fills `out`, (n_blocks, 32) float32, from `b`, (n_blocks, type_size) uint8, with gguf-py's operations (a
# product, then a sum: two roundings there as here; the integer offsets are exact), so the results are equal bit for
# bit. The codes are converted straight into `out` and the arithmetic is in place: the only float32 tensor is `out`,
# and with a Scratch (Q8_0, Q4_0, Q4_1) nothing is allocated at all.
def _q8_0(b, out, s):
    out.copy_(b[:, 2:].view(torch.int8)).mul_(_f16(b, 0, s))


def _q4_0(b, out, s):
    out.copy_(_nibbles(b[:, 2:], s)).sub_(8).mul_(_f16(b, 0, s))


def _q4_1(b, out, s):
    out.copy_(_nibbles(b[:, 4:], s)).mul_(_f16(b, 0, s)).add_(_f16(b, 2, s))  # m overwrites d's buffer after the product


def _q5_0(b, out, s):
    out.copy_(_nibbles(b[:, 6:], None) | _fifth_bits(b[:, 2:6])).sub_(16).mul_(_f16(b, 0, s))


def _q5_1(b, out, s):
    out.copy_(_nibbles(b[:, 8:], None) | _fifth_bits(b[:, 4:8])).mul_(_f16(b, 0, s)).add_(_f16(b, 2, s))


_BLOCK_DEQUANTIZERS: dict[GGMLQuantizationType, Callable] = {
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
}
_FLOAT_VIEWS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}  # raw bytes reinterpreted


def row_bytes(qtype: GGMLQuantizationType, n_in: int) -> int:
    """Bytes of one row of `n_in` weights in `qtype` (ValueError if n_in is not a whole number of blocks)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n_in % block_size:
        raise ValueError(f"a row of {n_in} weights is not a whole number of {qtype.name} blocks of {block_size}")
    return n_in // block_size * type_size


def dequantize(qweight: torch.Tensor, qtype: GGMLQuantizationType, out: torch.Tensor | None = None,
               scratch: Scratch | None = None) -> torch.Tensor:
    """Rows of GGUF blocks, (n_rows, row bytes) uint8, -> (n_rows, n_in) float32, as gguf.quants.dequantize gives them.

    Into `out` (contiguous float32 of that shape) if given; else a new tensor, or for F32 a view of the bytes.
    `scratch` (Scratch.new(number of blocks)) holds the temporaries instead of new tensors."""
    qtype = Q(qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if out is None:
        if qtype == Q.F32:
            return qweight.view(torch.float32)
        out = torch.empty(qweight.shape[0], qweight.shape[1] // type_size * block_size)
    if qtype in _FLOAT_VIEWS:
        out.copy_(qweight.view(_FLOAT_VIEWS[qtype]))
    elif qtype in _BLOCK_DEQUANTIZERS:
        _BLOCK_DEQUANTIZERS[qtype](qweight.reshape(-1, type_size), out.view(-1, block_size), scratch)
    else:
        from gguf import quants  # the K-quants and the rest: gguf-py's numpy code (exact by definition, slower)

        try:
            out.copy_(torch.from_numpy(quants.dequantize(qweight.numpy(), qtype)))
        except NotImplementedError:
            raise EdgezoError(f"cannot dequantize {qtype.name} tensors (gguf-py has no dequantizer for them)") from None
    return out


class _Workspace:
    """One float32 buffer per weight shape, shared by every QuantLinear of that shape: a dequantized weight lives only
    inside one matmul (forward or backward, one layer at a time), so one buffer per shape is enough. Allocating it
    anew for every matmul leaves freed holes between the activations saved for backward in glibc's heap; with the
    shared buffers a 4-step SmolLM2 q4_0 run (batch 16) peaked at 1901-1969 MiB instead of 1998 MiB (one sample,
    noisy) and its steps took 3.8-4.1 s instead of 4.2 s. Not thread-safe: one forward/backward at a time."""

    def __init__(self):
        self.buffers: dict[tuple[int, int], tuple[torch.Tensor, Scratch]] = {}

    def reserve(self, shape: tuple[int, int]) -> tuple[torch.Tensor, Scratch]:
        if shape not in self.buffers:
            self.buffers[shape] = torch.empty(shape), Scratch.new(shape[0] * shape[1] // 32)
        return self.buffers[shape]

    def weight(self, qweight: torch.Tensor, qtype: GGMLQuantizationType, n_in: int) -> torch.Tensor:
        if qtype == Q.F32:
            return qweight.view(torch.float32)  # already float32: no buffer, no copy
        out, scratch = self.reserve((qweight.shape[0], n_in))
        return dequantize(qweight, qtype, out=out, scratch=scratch)


_WORKSPACE = _Workspace()


# ---- the layer -----------------------------------------------------------------------------------------------------
class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W = dequantize(qweight). W and b are frozen; backward needs only W, so only the blocks are
    saved and W is dequantized a second time there (under checkpointing a third: the recomputed forward)."""

    @staticmethod
    def forward(ctx, x, qweight, qtype, bias):
        ctx.save_for_backward(qweight)
        ctx.qtype, ctx.n_in = qtype, x.shape[-1]
        weight = _WORKSPACE.weight(qweight, qtype, ctx.n_in)
        return F.linear(x, weight.to(x.dtype), bias)  # one BLAS call, as nn.Linear makes; the result owns its memory

    @staticmethod
    def backward(ctx, grad_out):
        (qweight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = _WORKSPACE.weight(qweight, ctx.qtype, ctx.n_in)
            grad_x = grad_out @ weight.to(grad_out.dtype)  # (..., n_out) @ (n_out, n_in)
        return grad_x, None, None, None


class QuantLinear(nn.Linear):
    """A frozen linear layer holding one GGUF tensor's raw blocks, `qweight` (n_out, row bytes) uint8.

    A subclass of nn.Linear so that PEFT's default dispatch wraps it in its own lora.Linear (LoRA output added to
    this layer's); `weight` is None, and `qweight` is where PEFT looks for the device of a quantized base (GPTQ's name).
    `bias`, if any, is an ordinary frozen float parameter.
    """

    def __init__(self, qweight: torch.Tensor, qtype: GGMLQuantizationType, in_features: int,
                 bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        qtype = Q(qtype)
        if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != row_bytes(qtype, in_features):
            raise ValueError(f"{qtype.name} blocks for {in_features} inputs must be (n_out, "
                             f"{row_bytes(qtype, in_features)}) uint8, got {tuple(qweight.shape)} {qweight.dtype}")
        self.in_features, self.out_features, self.qtype = in_features, qweight.shape[0], qtype
        self.register_buffer("qweight", qweight, persistent=False)  # from the GGUF, never from a state dict
        self.register_parameter("weight", None)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinear.apply(x, self.qweight, self.qtype, self.bias)

    def dequantize(self) -> torch.Tensor:
        """The whole weight as float32 (n_out, n_in): for tests and inspection; the forward never keeps it."""
        return dequantize(self.qweight, self.qtype)

    def dequantize_rows(self, rows) -> torch.Tensor:
        """Rows `rows` of the weight as float32 (len(rows), n_in), e.g. the label words' rows of an output layer."""
        return dequantize(self.qweight[torch.as_tensor(rows, dtype=torch.long)], self.qtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}, "
                f"bias={self.bias is not None}")


# ---- a transformers model on a GGUF's blocks ------------------------------------------------------------------------
class MappedTensor(NamedTuple):
    """One GGUF tensor on the memory-mapped file, as convert's dequantize_to_hf reads gguf-py's ReaderTensor."""

    name: str
    shape: tuple[int, ...]  # ggml order: (n_in, n_out) for a matrix
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # (rows, bytes per row) uint8, a view of the mapping
    offset: int  # where `data` starts in the file (and in the mapping, which starts at byte 0)
    mapping: mmap.mmap


def map_tensors(path: Path, header) -> list[MappedTensor]:
    """Every tensor of `path` as a view of one private (copy-on-write, never written) mapping of the file, located by
    the header walk (edgezo.formats): no gguf.GGUFReader, whose Python objects for each vocabulary entry and merge
    cost ~160 MB for SmolLM2 and ~600 MB for Gemma 3 while a model loads."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    file_bytes = np.frombuffer(mapping, dtype=np.uint8)  # writable (copy-on-write), so torch takes it without a copy
    tensors = []
    for name, dims in header.tensor_dims.items():
        qtype = Q(header.tensor_types[name])
        start = header.tensor_offsets[name]
        data = file_bytes[start : start + tensor_nbytes(dims, qtype)].reshape(math.prod(dims[1:]), -1)
        tensors.append(MappedTensor(name, tuple(int(d) for d in dims), qtype, data, start, mapping))
    return tensors


def release_pages(tensor: MappedTensor) -> None:
    """Drop the resident pages of a tensor read once (the embedding blocks, once dequantized): the mapping is private
    and unwritten, so a later read would fault them in again from the file."""
    start, end = tensor.offset, tensor.offset + tensor.data.nbytes
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages only
    if last > first:
        tensor.mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def causal_lm_from_gguf(gguf_path: Path, log: Callable[[str], None] = lambda msg: None):
    """The transformers model of `gguf_path` (float32 compute, sdpa attention) with every linear layer a QuantLinear.

    The model is built with its parameters on the meta device (accelerate's init_empty_weights; buffers such as RoPE
    frequencies are computed on the CPU as usual), then each GGUF tensor is put in place: a linear layer's weight as a
    QuantLinear on its blocks in the memory-mapped file (MeBP's layout: file pages, resident once read, never
    copied; llama's Q/K rows are the one copy, reordered as convert/ does for HF's layout), anything else
    (embeddings, norms, biases) dequantized to float32 as convert/gguf_to_hf.py writes it. No linear weight ever
    exists in float32 as a whole, at load time or later.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from edgezo.convert.architectures import HParams
    from edgezo.convert.gguf_to_hf import dequantize_to_hf, hf_config

    header = read_header(Path(gguf_path))
    # what convert's _metadata keeps: scalars and strings, and of the arrays only the sliding-window pattern
    meta = {k: list(v) if isinstance(v, tuple) else v for k, v in header.metadata.items()
            if not isinstance(v, tuple) or k.endswith("sliding_window_pattern")}
    embd = header.tensor_dims.get("token_embd.weight")
    if embd is None or len(embd) != 2:
        raise EdgezoError(f"{gguf_path} has no 2-D token_embd.weight")
    arch, config = hf_config(meta, set(header.tensor_dims), int(embd[1]), str(gguf_path))
    hp = HParams(config.to_dict())
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")

    n_bytes = _put_tensors(model, map_tensors(Path(gguf_path), header), arch, hp, dequantize_to_hf)
    # The decoder's dequantization buffers (and their Scratch) are allocated now, before anything a training step
    # allocates. Not an untied output layer's: a classification loss dequantizes only its label rows, so its buffer
    # (665 MiB for Qwen2.5-Coder-0.5B's 151,936 x 896) is made only if a language-modelling loss runs it whole.
    head = model.get_output_embeddings()
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.qtype != Q.F32 and m is not head:
            _WORKSPACE.reserve((m.out_features, m.in_features))
    model.tie_weights()  # a tied lm_head takes the embedding just loaded
    missing = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise EdgezoError(f"{gguf_path}: no GGUF tensor for {', '.join(missing[:5])}")
    for p in model.parameters():
        p.requires_grad_(False)
    n_linear = sum(isinstance(m, QuantLinear) for m in model.modules())
    log(f"{n_linear} linear layers on the GGUF's blocks ({n_bytes / 2**20:.1f} MiB, memory-mapped), dequantized on use")
    return model


def _put_tensors(model, tensors: list[MappedTensor], arch, hp, dequantize_to_hf) -> int:
    """Every GGUF tensor into the meta-device `model` (see causal_lm_from_gguf); returns the bytes of blocks used."""
    named = [(arch.hf_name(t.name), t) for t in tensors]
    n_bytes = 0
    for hf_name, t in named:  # linear weights first: their modules are replaced, then biases attach to the new ones
        module_name, _, leaf = hf_name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf != "weight" or type(module) is not nn.Linear:
            continue
        rows = arch.to_hf(t.name, t.data, hp)  # HF row order: Q/K un-permuted (a copy), anything else the mapped view
        qweight = torch.from_numpy(rows if rows is t.data else np.ascontiguousarray(rows))
        model.set_submodule(module_name, QuantLinear(qweight, t.tensor_type, module.in_features,
                                                     bias=None if module.bias is None else module.bias))
        n_bytes += qweight.numel()
    for hf_name, t in named:
        module_name, _, leaf = hf_name.rpartition(".")
        module = model.get_submodule(module_name)
        if not (isinstance(module, QuantLinear) and leaf == "weight"):
            value = torch.from_numpy(dequantize_to_hf(t, arch, hp))  # float32, HF's layout, as convert/ writes it
            setattr(module, leaf, nn.Parameter(value, requires_grad=False))
            release_pages(t)
    return n_bytes
