"""The inference engine: llama.cpp through llama-cpp-python's low-level ctypes API. The only package that imports llama_cpp.

What the trainer needs from llama.cpp, and how this package gets it fast:
* Many sequences per decode: a context with n_seq_max sequences and a split (non-unified) KV cache, each
  sequence getting n_ctx / n_seq_max cells; positions restart at 0 per sequence. The KV cache is cleared
  before every evaluation, because K/V computed under other adapter values are stale.
* Logits only where the loss needs them: `batch.logits[i]` is set just for those positions, so llama.cpp
  runs the last layer's output rows and the lm_head only there.
* A float32 LoRA adapter whose values change between evaluations without rebuilding anything: the adapter
  is loaded once from a GGUF; its tensors live at stable addresses in ordinary backend buffers, which we
  find once (a throwaway context's eval callback sees them as src[j] of the mul_mat nodes) and overwrite with
  ggml_backend_tensor_set. This gives logits bit-identical to loading a freshly written adapter GGUF with the
  same values (tests/test_engine.py) while the graph is reused.
* Only the blocks that train, when LoRA sits on the top blocks (SplitEngine, edgezo/split.py): an eval
  callback stops the prefix model's graph at the trained blocks' input and copies that node out with
  ggml_backend_tensor_get; the suffix model reads it back through llama_batch.embd.

The package, by job:
  ggml.py           the loaded libraries: llama.cpp's log, struct ggml_tensor mirrored in ctypes and checked against
                    the loaded libggml, system_info
  buffers.py        which weight goes to which CPU buffer type at load (the AMX guard's overrides; rules in
                    edgezo.kernels, which needs no llama.cpp)
  vocabulary.py     Vocabulary: a GGUF's tokenizer and metadata, and the model load every Engine does
  core.py           EngineConfig, Engine (scoring, generation, the in-place adapter), Sampling
  split_engine.py   SplitEngine: the prefix once, the trained blocks per evaluation
  hidden_states.py  the memory-mapped table of every example's hidden states below the adapter (--prefix-reuse cache)
  quantize.py       quantize_gguf: llama.cpp's own quantizer
"""

from __future__ import annotations

from .. import threads

threads.configure_openmp()  # before llama_cpp loads libgomp, which reads its settings once (ggml imports llama_cpp)
from .ggml import GgmlTensor, check_tensor_layout, system_info  # noqa: E402
from .vocabulary import Vocabulary  # noqa: E402
from .core import Engine, EngineConfig, Sampling  # noqa: E402
from .split_engine import SplitEngine  # noqa: E402
from .quantize import quantize_gguf  # noqa: E402

__all__ = ["Engine", "EngineConfig", "GgmlTensor", "Sampling", "SplitEngine", "Vocabulary", "check_tensor_layout",
           "quantize_gguf", "system_info"]
