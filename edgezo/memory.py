"""Memory accountant: the peak resident set (VmHWM) of a llama.cpp run, predicted from the GGUF header and the run's shape.

    peak RSS = runtime baseline + vocabulary/runtime structures + mapped weights + repacked weights
               + KV cache + output (logits) buffer + touched compute buffer [+ LoRA adapter, for MeZO]

Every term is a named quantity below. Sizes that llama.cpp reports itself (KV, output, repack buffers) follow its
own formulas; the rest are constants calibrated on fresh processes (2-core CI machine, llama-cpp-python 0.3.36,
SmolLM2-135M Q4_0 / Q8_0 and Gemma-3-270M Q4_0, see bench/memory_validation.py for the check against whole runs).
Dataset records held by the caller (about 4.5 MiB for the 8.6k movie-review training records) are not counted.

Importing this module loads neither llama_cpp nor torch: a device check must run before anything big is loaded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .adapter import BaseModelInfo, LoraConfig, target_tensor_names
from .files import EdgezoError
from .formats import GgufHeader, read_header, tensor_nbytes

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
REPACKED_TYPES = {2}  # GGMLQuantizationType.Q4_0
NOT_REPACKED = {"token_embd.weight"}
F16_BYTES, F32_BYTES = 2, 4


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
# --quant name -> the ggml type llama.cpp's quantizer gives 2-D weights (gguf.GGMLQuantizationType numbers).
# K-quant mixes (q4_k_m, ...) choose types per layer by rules not modelled here.
GGML_TYPE_OF_QUANT = {"f32": 0, "f16": 1, "bf16": 30, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8}
GGML_F32, GGML_Q8_0, GGML_Q6_K, QK_K = 0, 8, 14, 256


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


def output_buffer_bytes(shape: ModelShape, batch_size: int) -> int:
    """llama.cpp's logits buffer: n_outputs_max = n_seq_max rows of n_vocab float32 (3.00 MiB for 16 x 49152)."""
    return batch_size * shape.n_vocab * F32_BYTES


def activation_floats_per_token(shape: ModelShape, lora: LoraConfig | None) -> int:
    """Width of one layer's activations per token: residual + FFN hidden + Q + K + V (+ LoRA's A x and B(A x))."""
    width = shape.n_embd + shape.n_ff + shape.n_head * shape.key_length + shape.n_head_kv * (shape.key_length + shape.value_length)
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
    base = BaseModelInfo(path=Path("."), architecture=shape.architecture, n_layers=shape.n_layers, linear_shapes=shape.linear_shapes)
    total = 0
    for name in target_tensor_names(base, lora.targets):
        n_out, n_in = shape.linear_shapes[name]
        total += lora.rank * (n_in + n_out)  # A: (r, n_in), B: (n_out, r)
    return total


# ---- the prediction ----------------------------------------------------------------------------------------------
def predict_llama_cpp(model_path: str | os.PathLike, method: str, batch_size: int, n_ctx_per_seq: int,
                      lora: LoraConfig | None = None, n_tokens_per_seq: int | None = None,
                      n_outputs_per_seq: int = 1, n_ubatch: int = DEFAULT_N_UBATCH, kv_f32: bool = False) -> Prediction:
    """Peak RSS of an edgezo process running `method` ("inference" or "mezo") through llama.cpp.

    batch_size, n_ctx_per_seq: the engine's n_seq_max and per-sequence context (edgezo.engine.EngineConfig).
    n_tokens_per_seq: mean tokens actually decoded per sequence (default n_ctx_per_seq, the worst case).
    n_outputs_per_seq: positions with logits per sequence (1 for classification scoring).
    lora: the adapter MeZO trains (default LoraConfig()); ignored for inference.
    """
    if method not in ("inference", "mezo"):
        raise EdgezoError(f"unknown method {method!r}; choose inference or mezo")
    if batch_size < 1 or n_ctx_per_seq < 1:
        raise EdgezoError(f"batch size and context must be >= 1, got {batch_size} and {n_ctx_per_seq}")
    shape = read_model_shape(model_path)
    adapter = (lora or LoraConfig()) if method == "mezo" else None
    n_tokens = batch_size * min(n_tokens_per_seq or n_ctx_per_seq, n_ctx_per_seq)
    # llama.cpp splits a decode into micro-batches of min(n_ubatch, n_ctx) tokens; the largest one sets the peak.
    ubatch_tokens = min(n_tokens, n_ubatch, batch_size * n_ctx_per_seq)
    breakdown = {
        "runtime_baseline_bytes": RUNTIME_BASELINE_BYTES,
        "llama_runtime_bytes": LLAMA_FIXED_BYTES + LLAMA_BYTES_PER_LAYER * shape.n_layers + VOCAB_BYTES_PER_TOKEN * shape.n_vocab,
        "weights_mapped_bytes": weights_bytes(shape),
        "weights_repacked_bytes": repack_bytes(shape),
        "kv_cache_bytes": kv_cache_bytes(shape, batch_size, n_ctx_per_seq, F32_BYTES if kv_f32 else F16_BYTES),
        "output_buffer_bytes": output_buffer_bytes(shape, batch_size),
        "compute_bytes": compute_touched_bytes(shape, ubatch_tokens, batch_size * n_outputs_per_seq, adapter),
    }
    if adapter is not None:
        breakdown.update(adapter_terms(shape, adapter, breakdown["compute_bytes"]))
    return Prediction(total_bytes=sum(breakdown.values()), breakdown=breakdown)


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


# ---- device profiles -------------------------------------------------------------------------------------------
PROFILE_DIR = Path(__file__).resolve().parent.parent / "device_profiles"


@dataclass(frozen=True)
class DeviceProfile:
    key: str
    name: str
    total_ram_bytes: int
    usable_ram_bytes: int
    usable_ram_source: str
    cores: int


def load_device_profile(name: str, directory: Path = PROFILE_DIR) -> DeviceProfile:
    """device_profiles/NAME.toml (or a path to a .toml file)."""
    import tomllib

    path = Path(name) if name.endswith(".toml") else directory / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.toml"))
        raise EdgezoError(f"unknown device profile {name!r}; known: {', '.join(known)}")
    try:
        d = tomllib.loads(path.read_text())
        return DeviceProfile(key=path.stem, name=d["name"], total_ram_bytes=int(d["total_ram_bytes"]),
                             usable_ram_bytes=int(d["usable_ram_bytes"]), usable_ram_source=d["usable_ram_source"],
                             cores=int(d["cores"]))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EdgezoError(f"{path}: invalid device profile ({exc})") from None
