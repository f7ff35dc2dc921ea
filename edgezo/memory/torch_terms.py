"""The PyTorch BP reference's peak RSS (edgezo reference-bp): what it holds and the terms (see edgezo.memory)."""

from __future__ import annotations

from ..adapter import LoraConfig
from ..files import EdgezoError
from .llama_terms import lora_params
from .shape import F32_BYTES, MIB, ModelShape, Prediction

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
