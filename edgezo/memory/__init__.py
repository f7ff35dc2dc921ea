"""Memory accountant: the peak resident set (VmHWM) of an edgezo run, predicted from the model's shape and the run's.

llama.cpp (inference, MeZO; `predict_llama_cpp`):
    peak RSS = runtime baseline + vocabulary/runtime structures + mapped weights + repacked weights
               + KV cache + output (logits) buffer + touched compute buffer [+ LoRA adapter, for MeZO]
               [+ the LM loss's working rows, for text / completion / chat data] [+ the tokenized data held]
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
analysis) gets its shape from `shape_from_spec`. The tokenized data a run holds counts 36 B a token for llama.cpp
(68 MiB for boolq-long's 1.95M tokens; ~12 MiB for movie reviews); the torch baseline includes it.

Importing this module loads neither llama_cpp nor torch: a device check must run before anything big is loaded.
"""

from .shape import (  # noqa: F401 (re-exported: `from edgezo.memory import X`)
    MIB, F16_BYTES, F32_BYTES, F64_BYTES, ModelShape, Prediction, read_model_shape, model_shape, ModelSpec,
    SPEC_ARCHITECTURES, GGML_F32, GGML_Q8_0, GGML_Q6_K, gguf_tensor_dims, quantized_tensor_type, shape_from_spec)
from .llama_terms import (  # noqa: F401 (re-exported: `from edgezo.memory import X`)
    RUNTIME_BASELINE_BYTES, LLAMA_FIXED_BYTES, LLAMA_BYTES_PER_LAYER, VOCAB_BYTES_PER_TOKEN, ACTIVATION_LIVE_FACTOR,
    LOGITS_ROW_FACTOR, VOCAB_SCRATCH_ROWS, COMPUTE_FIXED_BYTES, HELD_TOKEN_BYTES, KV_CELL_PAD, DEFAULT_N_UBATCH,
    CALIBRATION_SYSTEM_INFO, ANY_BUILD_SYSTEM_INFO, weights_bytes, repack_bytes, kv_cells, kv_cache_bytes,
    output_buffer_bytes, lm_loss_bytes, activation_floats_per_token, compute_touched_bytes, lora_params,
    predict_llama_cpp, part_shape, split_terms, adapter_terms, max_lora_tensor_params)
from .torch_terms import (  # noqa: F401 (re-exported: `from edgezo.memory import X`)
    TORCH_DTYPE_BYTES, EMBEDDING_READ_WINDOW_BYTES, TORCH_METHODS, DEQUANT_BYTES_PER_WEIGHT, NORMS_PER_LAYER,
    LORA_INPUT_GROUP, TORCH_RUNTIME_BASELINE_BYTES, BACKWARD_BLOCKS, HEAP_RETENTION,
    torch_saved_bytes_per_token_layer, torch_checkpoint_bytes_per_token, unread_embedding_bytes, trainable_params,
    embedding_bytes_read, torch_method, quantized_base_terms, predict_torch)
from .batches import (  # noqa: F401 (re-exported: `from edgezo.memory import X`)
    RunBatches, decode_outputs, run_batches)
from .devices import (  # noqa: F401 (re-exported: `from edgezo.memory import X`)
    PROFILE_DIR, DeviceProfile, load_device_profile)

