"""Memory accountant: the peak resident set (VmHWM) of an edgezo run, predicted from the model's shape and the run's.

llama.cpp (inference, MeZO; `predict_llama_cpp`):
    peak RSS = runtime baseline + vocabulary/runtime structures + mapped weights + repacked weights
               + KV cache + output (logits) buffer + touched compute buffer [+ LoRA adapter, for MeZO]
               [+ the LM loss's working rows, for text / completion / chat data]
    A language-modelling loss scores every target token, so the output buffer and the compute buffer's logits grow
    with the targets of the fullest decode and micro-batch (n_outputs x n_vocab floats each).
the PyTorch BP reference (`edgezo reference-bp`; `predict_torch`):
    peak RSS = torch runtime + weights + trainable state (LoRA or full: value, gradient, AdamW moments)
               + stored activations (with or without checkpointing) + backward working set + logits
               + glibc heap retention [+ the bfloat16 load transient's excess]
    on a quantized base (bp-quant, bp-quant-ckpt: --base-dtype q8_0 / q4_0), weights = the linear layers' GGUF
    blocks (mapped pages, as read) + float32 embeddings, norms and biases + one float32 dequantization buffer per
    linear shape

Every term is a named quantity below. Sizes that llama.cpp reports itself (KV, output, repack buffers) follow its
own formulas; stored activations are counted from the forward torch runs (checked against autograd's saved tensors
in tests); the rest are constants calibrated on fresh processes (2-core CI machine, llama-cpp-python 0.3.36, torch
2.13 CPU; SmolLM2-135M Q4_0 / Q8_0 and Gemma-3-270M Q4_0 for llama.cpp, SmolLM2-135M for torch), checked against
whole runs by bench/memory_validation.py (docs/capacity.md). A model known only by its architecture (the capacity
analysis) gets its shape from `shape_from_spec`. Dataset records held by the caller (about 4.5 MiB for the 8.6k
movie-review training records) are not counted for llama.cpp; the torch baseline includes them.

Importing this module loads neither llama_cpp nor torch: a device check must run before anything big is loaded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from gguf.constants import QK_K, GGMLQuantizationType

from .adapter import BaseModelInfo, LoraConfig, target_tensor_names
from .files import EdgezoError
from .formats import GGML_TYPE_OF_QUANT, GgufHeader, read_header, tensor_nbytes
from .objective import chunk_rows
from .split import PREFIX_CACHE_BYTES, part_name, ubatch_layout

MIB = 2**20

# ---- calibrated constants (measured, not derived) -------------------------------------------------------------
# python + numpy + llama_cpp imported: 40.5 MiB VmRSS; with edgezo's modules imported, llama.cpp's backend
# initialised and the model's header read (which imports gguf), as every edgezo process does before loading
# a model: 47.5 MiB.
RUNTIME_BASELINE_BYTES = int(47.5 * MIB)
# After loading a model and creating a context, RSS minus (mapped weights + repack + KV + output buffer) was
# 4.4 MiB for the 2-layer test model (291 tokens), 18.5-18.9 MiB for SmolLM2 (30 layers, 49,152 tokens) over 4
# shapes and 43.4-44.4 MiB for Gemma 3 (18 layers, 262,144 tokens) over 3: llama.cpp's fixed structs and thread
# pool, per-layer structures (tensor and graph metadata, KV views) and the tokenizer's per-token tables (token
# strings, scores, token-to-piece cache). Solved on those three models: 3.9 MiB + 0.27 MiB/layer + 141 B/token.
LLAMA_FIXED_BYTES = int(3.9 * MIB)
LLAMA_BYTES_PER_LAYER = int(0.27 * MIB)
VOCAB_BYTES_PER_TOKEN = 141
# The compute buffer is *reserved* for the worst case (n_ubatch tokens, all of them with logits: 196.5 MiB for
# SmolLM2 and 1029 MiB for Gemma 3 at n_ubatch 1024), but malloc'd pages count only once written, and a decode
# that keeps logits at a few positions writes far less. Least-squares fit of (peak - RSS after context creation)
# over 7 decodes (30..960 tokens, 1..16 outputs, both models), residuals <= 0.7 MiB:
#   touched = 2.23 x (floats of one layer's activations per token) x tokens of the largest micro-batch
#           + 0.88 x logits rows actually computed + 2.2 vocabulary-sized float rows + 2.5 MiB.
ACTIVATION_LIVE_FACTOR = 2.23  # live activation copies the graph allocator keeps per token (reuse makes it ~2)
LOGITS_ROW_FACTOR = 0.88  # the lm_head result of the flagged positions (n_outputs x n_vocab floats)
VOCAB_SCRATCH_ROWS = 2.2  # vocabulary-sized float rows written regardless of the number of outputs
COMPUTE_FIXED_BYTES = int(2.5 * MIB)

# ---- llama.cpp rules (read in its logs / source for the vendored commit, checked in tests) ----------------------
KV_CELL_PAD = 256  # each sequence's KV cells are rounded up to a multiple of 256 (64 per seq -> 256, 300 -> 512)
DEFAULT_N_UBATCH = 1024  # edgezo.engine.EngineConfig.n_ubatch
# CPU_REPACK: llama.cpp keeps the file memory-mapped (all tensor pages are read at load, so all count in RSS) and
# additionally copies weights of these types into interleaved layouts for its matmul kernels. Measured: the repack
# buffer equals the Q4_0 tensor bytes (56.95 MiB for SmolLM2 Q4_0, 53.79 MiB for Gemma 3 Q4_0) and the mapped
# pages stay resident, so both count; a Q8_0 SmolLM2 got no repack buffer on this build (AVX-512 CPU).
# token_embd is only read by get_rows, which the repacked layout does not serve, so it is never repacked.
REPACKED_TYPES = {GGMLQuantizationType.Q4_0}
NOT_REPACKED = {"token_embd.weight"}
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


# ---- the terms ---------------------------------------------------------------------------------------------------
def weights_bytes(shape: ModelShape) -> int:
    """All tensor data of the file: llama.cpp memory-maps it and reads every tensor once while loading."""
    return sum(shape.tensor_bytes.values())


def repack_bytes(shape: ModelShape) -> int:
    """The CPU_REPACK copy: same bytes as the source tensors (the interleaved layout keeps the block size)."""
    return sum(b for n, b in shape.tensor_bytes.items()
               if shape.tensor_types[n] in REPACKED_TYPES and n not in NOT_REPACKED and len(shape.linear_shapes.get(n, ())) == 2)


def kv_cells(batch_size: int, n_ctx_per_seq: int) -> int:
    """KV cells of a split cache: n_seq_max streams, each rounded up to KV_CELL_PAD cells."""
    return batch_size * -(-n_ctx_per_seq // KV_CELL_PAD) * KV_CELL_PAD


def kv_cache_bytes(shape: ModelShape, batch_size: int, n_ctx_per_seq: int, kv_bytes_per_element: int = F16_BYTES) -> int:
    """n_layers x cells x (K: n_head_kv x key_length + V: n_head_kv x value_length) x element bytes.

    Sliding-window layers (Gemma 3) are counted at full size: with a split cache llama.cpp gave them as many cells
    as the full-attention layers at every shape tried (256..2048 cells per sequence). llama.cpp clears the buffer
    at creation, so it is resident from the start."""
    per_cell_layer = shape.n_head_kv * (shape.key_length + shape.value_length) * kv_bytes_per_element
    return shape.n_layers * kv_cells(batch_size, n_ctx_per_seq) * per_cell_layer


def output_buffer_bytes(shape: ModelShape, batch_size: int, n_outputs: int = 0) -> int:
    """llama.cpp's logits buffer (llama_context::output_reserve): max(n_outputs of a decode, n_seq_max) rows of n_vocab
    float32, cleared when allocated (so resident) and reallocated only to grow, so the decode with the most outputs
    sets it: 3.00 MiB for 16 x 49152 (classification), 332 MiB for 1770 targets (16 completions of ~111 tokens)."""
    return max(batch_size, n_outputs) * shape.n_vocab * F32_BYTES


def lm_loss_bytes(shape: ModelShape, n_outputs: int) -> int:
    """objective.target_log_probs' float64 working rows (it reads the logits in llama.cpp's buffer, copying nothing)."""
    return min(chunk_rows(shape.n_vocab), n_outputs) * shape.n_vocab * F64_BYTES


def activation_floats_per_token(shape: ModelShape, lora: LoraConfig | None) -> int:
    """Width of one layer's activations per token: residual + FFN hidden + Q + K + V (+ LoRA's A x and B(A x))."""
    width = (shape.n_embd + shape.n_ff + shape.n_head * shape.key_length
             + shape.n_head_kv * (shape.key_length + shape.value_length))
    if lora is not None:
        width += sum(lora.rank + shape.linear_shapes.get(f"blk.0.{t}.weight", (0, 0))[0] for t in lora.targets)
    return width


def compute_touched_bytes(shape: ModelShape, ubatch_tokens: int, n_outputs: int, lora: LoraConfig | None) -> int:
    """The written part of the compute buffer (see the calibration note at the top)."""
    activations = ACTIVATION_LIVE_FACTOR * ubatch_tokens * activation_floats_per_token(shape, lora) * F32_BYTES
    logits = LOGITS_ROW_FACTOR * min(n_outputs, ubatch_tokens) * shape.n_vocab * F32_BYTES
    scratch = VOCAB_SCRATCH_ROWS * shape.n_vocab * F32_BYTES
    return int(activations + logits + scratch) + COMPUTE_FIXED_BYTES


def lora_params(shape: ModelShape, lora: LoraConfig) -> int:
    base = BaseModelInfo(path=Path("."), architecture=shape.architecture, n_layers=shape.n_layers,
                         linear_shapes=shape.linear_shapes)
    total = 0
    for name in target_tensor_names(base, lora):
        n_out, n_in = shape.linear_shapes[name]
        total += lora.rank * (n_in + n_out)  # A: (r, n_in), B: (n_out, r)
    return total


# ---- the prediction ----------------------------------------------------------------------------------------------
def predict_llama_cpp(model_path: str | os.PathLike | ModelShape, method: str, batch_size: int, n_ctx_per_seq: int,
                      lora: LoraConfig | None = None, n_tokens_per_seq: int | None = None,
                      n_outputs_per_seq: int = 1, n_ubatch: int = DEFAULT_N_UBATCH, kv_f32: bool = False,
                      split_at: int = 0, n_cached_tokens: int = 0, n_outputs: int | None = None,
                      n_ubatch_outputs: int | None = None, lm_loss: bool = False) -> Prediction:
    """Peak RSS of an edgezo process running `method` ("inference" or "mezo") through llama.cpp.

    model_path: a GGUF, or a ModelShape (shape_from_spec: a model known only by its architecture).

    batch_size, n_ctx_per_seq: the engine's n_seq_max and per-sequence context (edgezo.engine.EngineConfig).
    n_tokens_per_seq: mean tokens actually decoded per sequence (default n_ctx_per_seq, the worst case).
    n_outputs_per_seq: positions with logits per sequence (1 for classification scoring).
    n_outputs: most positions with logits in one decode (default batch_size x n_outputs_per_seq); n_ubatch_outputs:
    most in one llama.cpp micro-batch (default: all of them, up to the micro-batch's tokens). RunBatches gives both
    for a run's data. lm_loss: the loss is the language-modelling one (text, completions, chat), which scores every
    target token on the host.
    lora: the adapter MeZO trains (default LoraConfig()); ignored for inference.
    split_at: prefix reuse (engine.SplitEngine) from this block; n_cached_tokens: tokens of the repeated (validation)
    batches whose hidden states it keeps.
    """
    if method not in ("inference", "mezo"):
        raise EdgezoError(f"unknown method {method!r}; choose inference or mezo")
    if batch_size < 1 or n_ctx_per_seq < 1:
        raise EdgezoError(f"batch size and context must be >= 1, got {batch_size} and {n_ctx_per_seq}")
    shape = model_path if isinstance(model_path, ModelShape) else read_model_shape(model_path)
    full_shape = shape
    if split_at:  # the engine loads the prefix part (blocks 0..split_at, no head) in place of the base
        shape = part_shape(shape, range(0, split_at + 1), with_head=False)
    adapter = (lora or LoraConfig()) if method == "mezo" else None
    n_tokens = batch_size * min(n_tokens_per_seq or n_ctx_per_seq, n_ctx_per_seq)
    # llama.cpp splits a decode into micro-batches of min(n_ubatch, n_ctx) tokens; the largest one sets the peak.
    ubatch_tokens = min(n_tokens, n_ubatch, batch_size * n_ctx_per_seq)
    n_outputs = batch_size * n_outputs_per_seq if n_outputs is None else n_outputs
    n_ubatch_outputs = min(n_outputs, ubatch_tokens) if n_ubatch_outputs is None else n_ubatch_outputs
    breakdown = {
        "runtime_baseline_bytes": RUNTIME_BASELINE_BYTES,
        "llama_runtime_bytes": LLAMA_FIXED_BYTES + LLAMA_BYTES_PER_LAYER * shape.n_layers + VOCAB_BYTES_PER_TOKEN * shape.n_vocab,
        "weights_mapped_bytes": weights_bytes(shape),
        "weights_repacked_bytes": repack_bytes(shape),
        "kv_cache_bytes": kv_cache_bytes(shape, batch_size, n_ctx_per_seq, F32_BYTES if kv_f32 else F16_BYTES),
    }
    # With prefix reuse these two are the prefix context's, which asks for one output per sequence (the suffix
    # context computes the logits: split_terms).
    outputs, ubatch_outputs = (batch_size, min(batch_size, ubatch_tokens)) if split_at else (n_outputs, n_ubatch_outputs)
    breakdown.update({
        "output_buffer_bytes": output_buffer_bytes(shape, batch_size, outputs),
        "compute_bytes": compute_touched_bytes(shape, ubatch_tokens, ubatch_outputs, adapter),
    })
    if lm_loss:
        breakdown["lm_loss_bytes"] = lm_loss_bytes(shape, n_outputs)
    if adapter is not None:
        breakdown.update(adapter_terms(shape, adapter, breakdown["compute_bytes"]))
    if split_at:
        suffix_compute = compute_touched_bytes(shape, ubatch_tokens, n_ubatch_outputs, adapter)
        breakdown.update(split_terms(full_shape, split_at, batch_size, n_ctx_per_seq, n_tokens, suffix_compute,
                                     n_cached_tokens, F32_BYTES if kv_f32 else F16_BYTES, n_outputs))
    return Prediction(total_bytes=sum(breakdown.values()), breakdown=breakdown)


def part_shape(shape: ModelShape, blocks: range, with_head: bool = True) -> ModelShape:
    """The shape of a part of the model (edgezo.split.write_part_gguf): `blocks` and the tensors outside the blocks
    (without the output matrix unless `with_head`)."""
    def keep(table: dict) -> dict:
        return {n: v for n, v in table.items() if part_name(n, blocks, with_head) is not None}

    return replace(shape, n_layers=len(blocks), tensor_bytes=keep(shape.tensor_bytes),
                   tensor_types=keep(shape.tensor_types), linear_shapes=keep(shape.linear_shapes),
                   tensor_numel=keep(shape.tensor_numel))


def split_terms(shape: ModelShape, first_block: int, batch_size: int, n_ctx_per_seq: int, n_tokens: int,
                compute_bytes: int, n_cached_tokens: int, kv_bytes_per_element: int, n_outputs: int = 0) -> dict[str, int]:
    """What prefix reuse adds to the prefix part's own terms: a second llama.cpp model and context for the suffix
    file (its pages are its own, so the token embeddings count twice), and the hidden states on the host."""
    suffix = part_shape(shape, range(first_block, shape.n_layers))
    hidden_row = shape.n_embd * F32_BYTES
    return {
        "split_suffix_model_bytes": (LLAMA_FIXED_BYTES + LLAMA_BYTES_PER_LAYER * suffix.n_layers
                                     + VOCAB_BYTES_PER_TOKEN * suffix.n_vocab + weights_bytes(suffix) + repack_bytes(suffix)),
        "split_suffix_context_bytes": (kv_cache_bytes(suffix, batch_size, n_ctx_per_seq, kv_bytes_per_element)
                                       + output_buffer_bytes(suffix, batch_size, n_outputs) + compute_bytes),
        # the embeddings batch (written rows only), the captured micro-batches and the assembled states of a batch
        "split_hidden_bytes": 3 * n_tokens * hidden_row,
        "split_cache_bytes": min(n_cached_tokens * hidden_row, PREFIX_CACHE_BYTES),
    }


def adapter_terms(shape: ModelShape, lora: LoraConfig, compute_bytes: int) -> dict[str, int]:
    """What MeZO adds: the adapter on both sides of ctypes, and the setup transient of Engine.set_adapter."""
    adapter_bytes = lora_params(shape, lora) * F32_BYTES
    # Engine.set_adapter writes the adapter GGUF, llama.cpp reads it back, and a throwaway one-sequence context
    # (256 KV cells, n_ubatch 8) finds its tensors; all freed again, but VmHWM keeps the high-water mark. Measured
    # transient: 14.0 MiB (SmolLM2, 2.8 MiB adapter) and 13.7 MiB (Gemma 3, 2.0 MiB adapter), modelled as
    # probe KV + probe output row + vocabulary scratch + 2 adapter copies (writer and loader buffers) + backend copy.
    probe_bytes = (kv_cache_bytes(shape, 1, KV_CELL_PAD) + output_buffer_bytes(shape, 1)
                   + int(VOCAB_SCRATCH_ROWS * shape.n_vocab * F32_BYTES) + 2 * adapter_bytes)
    return {
        # theta as float32 numpy arrays (LoraAdapter.tensors), plus as much again: LoraAdapter.init draws A in
        # float64 one small tensor at a time, and the freed chunks stay in the heap (measured: RSS +5.8 MiB for
        # a 2.8 MiB adapter on SmolLM2, +4.7 MiB for 2.0 MiB on Gemma 3).
        "lora_host_bytes": 2 * adapter_bytes,
        "lora_backend_bytes": adapter_bytes,  # llama.cpp's F32 copy that the graph reads
        # MeZO's perturbation is built one tensor at a time (mezo.PerturbedParams): z, then theta + eps z in place.
        "lora_perturbation_bytes": max_lora_tensor_params(shape, lora) * F32_BYTES,
        # The peak covers whichever is larger, the set_adapter transient or a decode's compute buffer: only the
        # excess of the former over compute_bytes is added.
        "adapter_setup_excess_bytes": max(0, probe_bytes - compute_bytes),
    }


def max_lora_tensor_params(shape: ModelShape, lora: LoraConfig) -> int:
    sizes = [shape.linear_shapes[f"blk.0.{t}.weight"] for t in lora.targets if f"blk.0.{t}.weight" in shape.linear_shapes]
    return max((lora.rank * max(n_out, n_in) for n_out, n_in in sizes), default=0)


# ---- the PyTorch BP reference (edgezo.reference) -------------------------------------------------------------------
# What `edgezo reference-bp` holds, read from edgezo/reference.py and transformers 5 / peft 0.21 / torch 2.13 (CPU):
# * the base model is the run's GGUF dequantized to a float32 safetensors file and loaded by from_pretrained with
#   sdpa attention. In float32 the parameters *are* the memory-mapped file (zero copy: the pages count in RSS once the
#   first forward has read them); in bfloat16 they are converted copies.
# * PEFT LoRA tensors stay float32 (autocast_adapter_dtype); AdamW keeps two float32 moments per trained value.
# * batches are right-padded to their longest sequence without an attention mask, so sdpa runs causal flash
#   attention with GQA (no T x T matrix, K/V not repeated) -- true for llama/qwen2 and for Gemma 3 up to its sliding
#   window (512 tokens for the small ones); longer Gemma 3 sequences need a mask and are not modelled.
# * the loss needs logits only at the answer positions and only the label words' columns (TorchScorer): for a
#   classification run the logits are negligible; for a language-modelling run every target row x the vocabulary.
TORCH_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
# Resident bytes per distinct embedding row read from the mapped float32 file, an effective window: the kernel maps
# 64 KiB around a fault (fault_around_bytes) and reads up to read_ahead_kb (8 MiB on this VM) around a miss; 1 MiB
# was the best single value on the SmolLM2-135M and Gemma-3-270M reference-bp runs (grid 64 KiB..2 MiB, with
# HEAP_RETENTION). Machine-dependent; capped by the table's size.
EMBEDDING_READ_WINDOW_BYTES = 1 << 20
TORCH_METHODS = ("bp", "bp-ckpt", "bp-quant", "bp-quant-ckpt")
# A quantized base's dequantization buffers per weight of each distinct linear shape: the float32 weight, and the
# scratch its dequantization reuses (a uint8 code and a float32 scale per 32-weight block; quant_torch.Scratch).
DEQUANT_BYTES_PER_WEIGHT = F32_BYTES + 1 + F32_BYTES / 32
NORMS_PER_LAYER = {"llama": 2, "qwen2": 2, "gemma3": 4}  # RMSNorms on the residual width in one block
# Which input each LoRA target reads: targets in one group share one input tensor.
LORA_INPUT_GROUP = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "attn_output": "attn_out",
                    "ffn_gate": "ffn_in", "ffn_up": "ffn_in", "ffn_down": "ffn_mid"}

# ---- calibrated constants (measured on reference-bp runs, see bench/memory_validation.py) ------------------------
# python + torch + transformers + peft + llama_cpp + edgezo imported, the training and validation splits tokenized
# (llama.cpp vocabulary loaded and freed again) and the transformers model object built with its weights mapped but
# not yet read: 450 MiB for SmolLM2-135M and movie-reviews.
TORCH_RUNTIME_BASELINE_BYTES = int(450 * MIB)
# Backward frees each saved tensor as soon as its node has run, but it first allocates the gradients of one block
# (about as large as that block's saved activations) next to them.
BACKWARD_BLOCKS = 1.1
# glibc's heap keeps freed activations resident. Its mmap threshold starts at 128 KiB but rises to the size of any
# mmapped block freed (up to 32 MiB), which the model load does, so a step's tensors come from the heap; the tensors
# freed during the forward (and, with checkpointing, the whole first forward) leave holes that stay resident, and
# a later step of another padded length cannot reuse all of them. Measured: with the threshold pinned
# (MALLOC_MMAP_THRESHOLD_=65536) the anonymous RSS after a forward was exactly the saved tensors (402 MiB for 398.5
# predicted, SmolLM2 batch 8 x 55) and fell back after backward; unpinned it carried more, modelled as this fraction
# of one full forward's saved activations (what a step allocates, with or without checkpointing). Chosen with
# EMBEDDING_READ_WINDOW_BYTES on the SmolLM2-135M and Gemma-3-270M runs of bench/memory_validation.py (2 steps). It
# is 0 under --release-freed-memory, which pins the threshold (edgezo.files.map_large_allocations). The heap's holes
# depend on the CPU's kernels and on the order of batch lengths: Qwen2.5-Coder-0.5B on its Q4_0 blocks with
# checkpointing at batch 16 peaked at 2138 MiB in 2 steps on an Intel Xeon and at 2660 MiB on an AMD EPYC, 2007
# predicted; under --release-freed-memory the same run peaks at 1426 MiB over 12 steps.
HEAP_RETENTION = 0.35


def torch_saved_bytes_per_token_layer(shape: ModelShape, lora: LoraConfig | None, dtype: str) -> int:
    """Bytes autograd keeps per token and decoder block for backward (float32 RMSNorm internals, activations in
    `dtype`, LoRA inputs in float32). Counted with torch.autograd.graph.saved_tensors_hooks on the reference's own
    forward for SmolLM2 and Gemma 3, float32 and bfloat16, LoRA on k,v and on all seven targets (tests/test_memory.py
    checks this function against such a count on the tiny model)."""
    a = TORCH_DTYPE_BYTES[dtype]
    h, ff = shape.n_embd, shape.n_ff
    q, k, v = shape.n_head * shape.key_length, shape.n_head_kv * shape.key_length, shape.n_head_kv * shape.value_length
    out = shape.n_head * shape.value_length
    # RMSNorm upcasts to float32 and keeps x and 1/rms(x) (the weight is frozen, so x * weight keeps nothing).
    total = NORMS_PER_LAYER.get(shape.architecture, 2) * (h + 1) * F32_BYTES
    if shape.architecture == "gemma3":  # q_norm / k_norm over each head, also in float32
        total += (q + shape.n_head + k + shape.n_head_kv) * F32_BYTES
    # sdpa keeps q, k, v (after RoPE) and its output, plus a float32 logsumexp per head and token.
    total += (q + k + v + out) * a + shape.n_head * F32_BYTES
    # SwiGLU / GeGLU: act(gate) keeps gate, act * up keeps both factors.
    total += 3 * ff * a
    widths = {"attn_in": h, "attn_out": out, "ffn_in": h, "ffn_mid": ff}
    if lora is None:  # full fine-tuning: every linear keeps its input for its weight gradient, every norm x / rms(x)
        total += sum(widths.values()) * a + NORMS_PER_LAYER.get(shape.architecture, 2) * h * a
        return total
    # LoRA: lora_A keeps its input (float32). With a float32 base, targets reading the same tensor share it, and
    # attn_output's input is sdpa's output already kept (the head transpose is a view of it); with a bfloat16 base
    # PEFT casts the input to float32 once per target. lora_B keeps A x (rank floats) per target.
    groups = [LORA_INPUT_GROUP[t] for t in lora.targets]
    inputs = set(groups) - {"attn_out"} if a == F32_BYTES else groups
    total += sum(widths[g] for g in inputs) * F32_BYTES + len(lora.targets) * lora.rank * F32_BYTES
    return total


def torch_checkpoint_bytes_per_token(shape: ModelShape, dtype: str) -> int:
    """Gradient checkpointing keeps only each block's input (and the final norm's input and 1/rms)."""
    return (shape.n_layers * TORCH_DTYPE_BYTES[dtype] + 1) * shape.n_embd + F32_BYTES * (shape.n_embd + 1)


def unread_embedding_bytes(shape: ModelShape, dtype_bytes: int, lora: LoraConfig | None, logit_cols: int, token_ids) -> int:
    """float32 LoRA classification runs read only some rows of the mapped embedding table (their tokens) and of the
    LM head (the label words: a separate output.weight stays almost entirely unread). Gemma 3's 640 MiB table made
    this visible: counting it whole over-predicted its 2-step runs by 25-43 %."""
    if dtype_bytes != F32_BYTES or lora is None or logit_cols >= shape.n_vocab:
        return 0
    table = shape.n_vocab * shape.n_embd * F32_BYTES
    unread = table - (table if token_ids is None else embedding_bytes_read(shape, token_ids))
    if "output.weight" in shape.tensor_numel:
        unread += table
    return unread


def trainable_params(shape: ModelShape, lora: LoraConfig | None) -> int:
    return shape.n_params if lora is None else lora_params(shape, lora)


def embedding_bytes_read(shape: ModelShape, token_ids) -> int:
    """Resident bytes of the float32 embedding table after a run read the rows of `token_ids` from the mapped file:
    a row costs the aligned EMBEDDING_READ_WINDOW_BYTES window around it, and rows sharing a window share it."""
    row = shape.n_embd * F32_BYTES
    windows = {b // EMBEDDING_READ_WINDOW_BYTES for t in token_ids for b in (t * row, t * row + row - 1)}
    return min(len(windows) * EMBEDDING_READ_WINDOW_BYTES, shape.n_vocab * row)


def torch_method(checkpointing: bool, quantized_base: bool) -> str:
    """The accountant's name for a reference-bp run: bp, bp-ckpt, bp-quant or bp-quant-ckpt."""
    return "bp" + ("-quant" if quantized_base else "") + ("-ckpt" if checkpointing else "")


def quantized_base_terms(shape: ModelShape, full_vocab_logits: bool) -> dict[str, int]:
    """What a base held as GGUF blocks (edgezo.quant_torch) keeps resident, read from `shape`'s own tensor types.

    The linear layers are views of the memory-mapped file: their pages count once the first forward has read them.
    An untied output layer is read whole only when the loss needs logits over the vocabulary (language modelling);
    a classification loss dequantizes only the label words' rows. Embeddings, norms and biases are float32 copies
    (the embedding's blocks are read once and their pages dropped). Each matmul dequantizes its weight into a
    float32 buffer (and scratch) shared by every layer of that shape (quant_torch._Workspace)."""
    blocks = [n for n in shape.linear_shapes
              if n != "token_embd.weight" and (n != "output.weight" or full_vocab_logits)]
    floats = [n for n in shape.tensor_numel if n not in shape.linear_shapes] + ["token_embd.weight"]
    return {
        "quant_blocks_bytes": sum(shape.tensor_bytes[n] for n in blocks),
        "float_weights_bytes": sum(shape.tensor_numel[n] for n in floats) * F32_BYTES,
        "dequant_buffers_bytes": int(sum(n_out * n_in for n_out, n_in in {shape.linear_shapes[n] for n in blocks})
                                     * DEQUANT_BYTES_PER_WEIGHT),
    }


def predict_torch(shape: ModelShape, method: str, batch_size: int, seq_len: int, lora: LoraConfig | None = None,
                  dtype: str = "float32", logit_rows: int | None = None, logit_cols: int = 2,
                  full: bool = False, token_ids=None, release_freed: bool = False) -> Prediction:
    """Peak RSS of `edgezo reference-bp`: method "bp", "bp-ckpt" (--gradient-checkpointing), "bp-quant" or
    "bp-quant-ckpt" (--base-dtype q8_0 / q4_0: the base stays in `shape`'s GGUF blocks, so `shape` must be read from
    the file of that type).

    seq_len: the padded length of the largest batch (the reference pads each batch to its longest sequence).
    logit_rows x logit_cols: logits the loss computes (classification: one row per sequence, a column per label).
    full: fine-tune every weight instead of LoRA (not a reference-bp mode; for the capacity analysis): gradients and
    two AdamW moments for every parameter, in the weights' dtype as torch keeps them.
    token_ids: the distinct token ids the run reads (its batches and the label words); None: every row (worst case).
    release_freed: the run returns freed tensors to the kernel at once (--release-freed-memory): no heap retention.
    """
    if method not in TORCH_METHODS:
        raise EdgezoError(f"unknown method {method!r} for the torch reference; choose {', '.join(TORCH_METHODS)}")
    if dtype not in TORCH_DTYPE_BYTES:
        raise EdgezoError(f"unknown dtype {dtype!r}; choose {' or '.join(TORCH_DTYPE_BYTES)}")
    if batch_size < 1 or seq_len < 1:
        raise EdgezoError(f"batch size and sequence length must be >= 1, got {batch_size} and {seq_len}")
    quantized = method.startswith("bp-quant")
    if quantized and (full or dtype != "float32"):
        raise EdgezoError("a quantized base trains LoRA tensors with float32 compute (no full fine-tuning, no bfloat16)")
    adapter = None if full else (lora or LoraConfig())
    a = TORCH_DTYPE_BYTES[dtype]
    tokens = batch_size * seq_len
    per_block = tokens * torch_saved_bytes_per_token_layer(shape, adapter, dtype)
    if method.endswith("-ckpt"):  # block inputs, plus one block recomputed with its activations during its backward
        stored = tokens * torch_checkpoint_bytes_per_token(shape, dtype) + per_block
    else:
        stored = shape.n_layers * per_block
    rows = batch_size if logit_rows is None else logit_rows
    n_trained = trainable_params(shape, adapter)
    if quantized:
        weights = quantized_base_terms(shape, full_vocab_logits=logit_cols >= shape.n_vocab)
    else:  # float32: the mapped safetensors file itself, resident as far as it is read; bfloat16: converted copies
        weights = {"weights_bytes": shape.n_params * a - unread_embedding_bytes(shape, a, adapter, logit_cols, token_ids)}
    breakdown = {
        "torch_runtime_bytes": TORCH_RUNTIME_BASELINE_BYTES,
        **weights,
        # LoRA: float32 value + gradient + AdamW exp_avg + exp_avg_sq; full: gradient + 2 moments in the weights' dtype
        "trainable_state_bytes": n_trained * 4 * F32_BYTES if adapter is not None else n_trained * 3 * a,
        "activations_bytes": stored,
        "backward_bytes": int(BACKWARD_BLOCKS * per_block),
        # the lm_head rows and columns the loss reads: float32 logits, their log-softmax and its gradient
        "logits_bytes": 3 * rows * logit_cols * F32_BYTES,
        "heap_retention_bytes": 0 if release_freed else int(HEAP_RETENTION * shape.n_layers * per_block),
    }
    # bfloat16 load: from_pretrained reads every float32 page of the mapped file while it converts, and the file
    # stays mapped until loading ends: baseline + 4 + 2 bytes per parameter at once (measured 1202 MiB for SmolLM2
    # against 1220 predicted). The peak is whichever is larger, so only the excess over the training peak is added.
    if a != F32_BYTES:
        load_peak = TORCH_RUNTIME_BASELINE_BYTES + shape.n_params * (F32_BYTES + a)
        breakdown["weights_load_excess_bytes"] = max(0, load_peak - sum(breakdown.values()))
    return Prediction(total_bytes=sum(breakdown.values()), breakdown=breakdown)


# ---- the sequence lengths of a run ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunBatches:
    """What a run's data decides: the torch reference pads each training batch to its longest sequence (the largest
    such batch sets the BP peak), llama.cpp decodes the tokens of a batch without padding (the fullest batch sets its
    compute buffer, the batch with most scored positions its output buffer, the micro-batch with most scored
    positions the compute buffer's logits), and the token ids read decide how much of a mapped embedding table
    becomes resident. Validation batches run without gradients, so only llama.cpp's buffers count them."""

    padded_len: int  # longest sequence of any training batch
    max_batch_tokens: int  # most tokens in one batch, training or validation
    token_ids: frozenset[int]  # every token id the run reads
    max_batch_outputs: int = 0  # most positions with logits in one batch (one decode)
    max_ubatch_outputs: int = 0  # most positions with logits in one llama.cpp micro-batch of such a decode


def decode_outputs(lengths: list[int], outputs: list[list[int]], n_ubatch: int, n_streams: int) -> tuple[int, int]:
    """(positions with logits in a decode of these sequences, most of them in one micro-batch), the micro-batches cut
    as llama.cpp cuts them (split.ubatch_layout)."""
    most = 0
    for ubatch in ubatch_layout(lengths, n_ubatch, n_streams):
        most = max(most, sum(sum(c.start <= p < c.start + c.count for p in outputs[c.seq]) for c in ubatch))
    return sum(map(len, outputs)), most


def run_batches(train: list[tuple[int, ...]], batch_size: int, seed: int, steps: int,
                evaluated: list[tuple[int, ...]] = (), train_outputs: list[list[int]] | None = None,
                evaluated_outputs: list[list[int]] | None = None, n_ubatch: int = DEFAULT_N_UBATCH) -> RunBatches:
    """The batches `steps` training steps draw from the token sequences `train` (edgezo.data.batch_indices, the
    order both trainers use) and the validation batches of `evaluated` (consecutive chunks of batch_size).

    *_outputs: the positions each sequence is scored at (objective.output_positions), parallel to the sequences;
    None: the last position only (classification). n_ubatch: the engine's micro-batch (EngineConfig.n_ubatch)."""
    from .data import batch_indices

    def last(seqs):
        return [[len(s) - 1] for s in seqs]

    train_outputs = last(train) if train_outputs is None else train_outputs
    evaluated_outputs = last(evaluated) if evaluated_outputs is None else evaluated_outputs
    padded, most, ids, outs, ubatch_outs = 0, 0, set(), 0, 0

    def decode(seqs, outputs):
        nonlocal most, outs, ubatch_outs
        lengths = list(map(len, seqs))
        most = max(most, sum(lengths))
        # the engine's context has n_seq_max = batch_size streams and micro-batches of min(n_ubatch, n_ctx) tokens;
        # n_ctx holds every sequence whole, so n_ubatch alone cuts the same micro-batches
        n, per_ubatch = decode_outputs(lengths, outputs, n_ubatch, batch_size)
        outs, ubatch_outs = max(outs, n), max(ubatch_outs, per_ubatch)
        ids.update(t for seq in seqs for t in seq)

    for step in range(steps if train else 0):
        indices = batch_indices(len(train), batch_size, seed, step)
        batch = [train[i] for i in indices]
        padded = max(padded, max(map(len, batch)))
        decode(batch, [train_outputs[i] for i in indices])
    for i in range(0, len(evaluated), batch_size):
        decode(evaluated[i : i + batch_size], evaluated_outputs[i : i + batch_size])
    return RunBatches(padded_len=padded or max(map(len, evaluated), default=1), max_batch_tokens=max(most, 1),
                      token_ids=frozenset(ids), max_batch_outputs=outs, max_ubatch_outputs=ubatch_outs)


# ---- device profiles -------------------------------------------------------------------------------------------
# Package data (importlib.resources): an installed wheel has the profiles as well as a checkout.
PROFILE_DIR = resources.files("edgezo") / "device_profiles"


@dataclass(frozen=True)
class DeviceProfile:
    key: str
    name: str
    total_ram_bytes: int
    usable_ram_bytes: int
    usable_ram_source: str
    cores: int


def load_device_profile(name: str, directory: Path | Traversable = PROFILE_DIR) -> DeviceProfile:
    """A profile of edgezo's device_profiles/ by NAME, or a path to a .toml file."""
    import tomllib

    path = Path(name) if name.endswith(".toml") else directory / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".toml") for p in directory.iterdir() if p.name.endswith(".toml"))
        raise EdgezoError(f"unknown device profile {name!r}; known: {', '.join(known)}")
    try:
        d = tomllib.loads(path.read_text())
        return DeviceProfile(key=path.name.removesuffix(".toml"), name=d["name"], total_ram_bytes=int(d["total_ram_bytes"]),
                             usable_ram_bytes=int(d["usable_ram_bytes"]), usable_ram_source=d["usable_ram_source"],
                             cores=int(d["cores"]))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EdgezoError(f"{path}: invalid device profile ({exc})") from None
