"""llama.cpp's peak RSS (inference, MeZO): its calibrated constants, its rules and the terms (see edgezo.memory)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .. import kernels
from ..adapter import BaseModelInfo, LoraConfig, target_tensor_names
from ..files import EdgezoError
from ..objective import chunk_rows
from ..split import PREFIX_CACHE_BYTES, part_name
from .shape import F16_BYTES, F32_BYTES, F64_BYTES, MIB, ModelShape, Prediction, read_model_shape

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
# The run's tokenized data, held for the whole run (edgezo.data.Example.tokens: tuples of Python ints): 8 B of
# pointer and a 28 B int object per token (CPython shares only the ids up to 256). Measured: RSS grew 67.9 MiB while
# the 3000 + 300 examples of boolq-long (1.95M Qwen tokens) were read and tokenized, 36.4 B a token; the MeZO runs on
# that data had peaked ~100 MiB above a prediction without this term.
HELD_TOKEN_BYTES = 36

# ---- llama.cpp rules (read in its logs / source for the vendored commit, checked in tests) ----------------------
KV_CELL_PAD = 256  # each sequence's KV cells are rounded up to a multiple of 256 (64 per seq -> 256, 300 -> 512)
DEFAULT_N_UBATCH = 1024  # edgezo.engine.EngineConfig.n_ubatch
# CPU_REPACK: llama.cpp keeps the file memory-mapped (all tensor pages are read at load, so all count in RSS) and
# additionally copies the weights its repack rules take (edgezo.kernels.repacked_tensors: by type, row count and the
# build's CPU features) into interleaved layouts of the same size. Measured: the repack buffer equals the Q4_0 tensor
# bytes (56.95 MiB for SmolLM2 Q4_0, 53.79 MiB for Gemma 3 Q4_0) and the Q4_K tensors of SmolLM2 Q4_K_M (7.59 MiB)
# on the x86 build below; on ARM builds (tools/arm64-check) also the Q8_0 / Q6_K blocks and the tied output's copy
# of token_embd (28.7 MiB for SmolLM2). The builds a prediction is for: this machine's (the caller passes its system
# info), a device profile's (`llama_cpp_system_info`), else this x86 calibration build.
CALIBRATION_SYSTEM_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
                           "BMI2 = 1 | AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | "
                           "OPENMP = 1 | REPACK = 1 |")
# A build known by nothing: every rule of every architecture applies, so every tensor some build repacks counts (an
# upper bound, for a device profile that does not say which build it runs).
ANY_BUILD_SYSTEM_INFO = "AVX2 = 1 | AVX512 = 1 | NEON = 1 | DOTPROD = 1 | MATMUL_INT8 = 1 | REPACK = 1 |"


# ---- the terms ---------------------------------------------------------------------------------------------------
def weights_bytes(shape: ModelShape) -> int:
    """All tensor data of the file: llama.cpp memory-maps it and reads every tensor once while loading."""
    return sum(shape.tensor_bytes.values())


def repack_bytes(shape: ModelShape, system_info: str = CALIBRATION_SYSTEM_INFO) -> int:
    """The CPU_REPACK copies on the llama.cpp build whose llama_print_system_info() is `system_info`."""
    dims = {n: tuple(reversed(shape.linear_shapes.get(n, ()))) for n in shape.tensor_types}  # ggml order (n_in, n_out)
    names = kernels.repacked_tensors(shape.tensor_types, dims, kernels.build_features(system_info))
    return sum(shape.tensor_bytes[n] for n in names)


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
                      split_at: int = 0, n_cached_tokens: int = 0, n_stored_tokens: int = 0,
                      n_outputs: int | None = None, n_ubatch_outputs: int | None = None, lm_loss: bool = False,
                      momentum: bool = False, system_info: str = CALIBRATION_SYSTEM_INFO,
                      n_held_tokens: int = 0) -> Prediction:
    """Peak RSS of an edgezo process running `method` ("inference" or "mezo") through llama.cpp.

    model_path: a GGUF, or a ModelShape (shape_from_spec: a model known only by its architecture).

    batch_size, n_ctx_per_seq: the engine's n_seq_max and per-sequence context (edgezo.engine.EngineConfig).
    n_tokens_per_seq: mean tokens actually decoded per sequence (default n_ctx_per_seq, the worst case).
    n_outputs_per_seq: positions with logits per sequence (1 for classification scoring).
    n_outputs: most positions with logits in one decode (default batch_size x n_outputs_per_seq); n_ubatch_outputs:
    most in one llama.cpp micro-batch (default: all of them, up to the micro-batch's tokens). RunBatches gives both
    for a run's data. lm_loss: the loss is the language-modelling one (text, completions, chat), which scores every
    target token on the host. momentum: ConMeZO (--estimator conmezo) keeps a momentum the size of the adapter.
    lora: the adapter MeZO trains (default LoraConfig()); ignored for inference.
    split_at: prefix reuse (engine.SplitEngine) from this block; n_cached_tokens: tokens of the repeated (validation)
    batches whose hidden states it keeps; n_stored_tokens: tokens of the examples in its hidden-state table
    (--prefix-reuse cache: memory-mapped, and every page is read each epoch, so all of it counts).
    system_info: llama_print_system_info() of the build the run uses (which weights it repacks).
    n_held_tokens: tokens of the examples the process holds (every split it read).
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
        "weights_repacked_bytes": repack_bytes(shape, system_info),
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
    if n_held_tokens:
        breakdown["dataset_tokens_bytes"] = n_held_tokens * HELD_TOKEN_BYTES
    if adapter is not None:
        breakdown.update(adapter_terms(shape, adapter, breakdown["compute_bytes"]))
        if momentum:  # ConMeZO's state: one float32 copy of the adapter (the per-tensor estimate is transient)
            breakdown["momentum_bytes"] = lora_params(shape, adapter) * F32_BYTES
    if split_at:
        suffix_compute = compute_touched_bytes(shape, ubatch_tokens, n_ubatch_outputs, adapter)
        breakdown.update(split_terms(full_shape, split_at, batch_size, n_ctx_per_seq, n_tokens, suffix_compute,
                                     n_cached_tokens, F32_BYTES if kv_f32 else F16_BYTES, n_outputs, system_info))
        if n_stored_tokens:
            breakdown["split_table_bytes"] = n_stored_tokens * full_shape.n_embd * F32_BYTES
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
                compute_bytes: int, n_cached_tokens: int, kv_bytes_per_element: int, n_outputs: int = 0,
                system_info: str = CALIBRATION_SYSTEM_INFO) -> dict[str, int]:
    """What prefix reuse adds to the prefix part's own terms: a second llama.cpp model and context for the suffix
    file (its pages are its own, so the token embeddings count twice), and the hidden states on the host."""
    suffix = part_shape(shape, range(first_block, shape.n_layers))
    hidden_row = shape.n_embd * F32_BYTES
    return {
        "split_suffix_model_bytes": (LLAMA_FIXED_BYTES + LLAMA_BYTES_PER_LAYER * suffix.n_layers
                                     + VOCAB_BYTES_PER_TOKEN * suffix.n_vocab + weights_bytes(suffix)
                                     + repack_bytes(suffix, system_info)),
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
