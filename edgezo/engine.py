"""The inference engine: llama.cpp through llama-cpp-python's low-level ctypes API. The only module that imports llama_cpp.

What the trainer needs from llama.cpp, and how this module gets it fast:
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
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from . import threads

threads.configure_openmp()  # before llama_cpp loads libgomp, which reads its settings once
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

from . import kernels  # noqa: E402
from .adapter import LoraAdapter  # noqa: E402
from .files import EdgezoError  # noqa: E402
from .formats import QUANT_FTYPES, read_gguf_header  # noqa: E402
from .split import PREFIX_CACHE_BYTES, rename_for_suffix, ubatch_layout  # noqa: E402

log = logging.getLogger("edgezo")

_recent_errors: collections.deque[str] = collections.deque(maxlen=4)
_weight_buffer_lines: list[str] = []  # "load_tensors: CPU_REPACK model buffer size = 52.3 MiB" of the latest load
_WEIGHT_BUFFER = re.compile(r"(\S+) model buffer size =\s*([0-9.]+) MiB")
GGML_LOG_LEVEL_ERROR = 4


@llama_cpp.llama_log_callback
def _log_callback(level, text, user_data):
    # llama.cpp logs every load and every adapter tensor at INFO/WARN. Keep its errors, to quote them in our own
    # error messages instead of spraying stderr, and the weight buffer sizes of a load (which kernels it uses).
    line = text.decode("utf-8", errors="replace")
    if level == GGML_LOG_LEVEL_ERROR:
        _recent_errors.append(line.strip())
    elif "model buffer size" in line:
        _weight_buffer_lines.append(line)


def _llama_error(message: str) -> EdgezoError:
    """An EdgezoError quoting what llama.cpp logged as errors since the last one."""
    detail = "; ".join(_recent_errors)
    _recent_errors.clear()
    return EdgezoError(f"{message} (llama.cpp: {detail})" if detail else message)


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()

# ---- struct ggml_tensor, as in ggml/include/ggml.h of the llama.cpp that llama-cpp-python 0.3.36 vendors ----
GGML_MAX_DIMS, GGML_MAX_OP_PARAMS, GGML_MAX_SRC, GGML_MAX_NAME = 4, 64, 10, 64


class GgmlTensor(ctypes.Structure):
    pass


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]
GGML_TYPE_F32 = 0

_libggml_base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
_libggml_base.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_libggml_base.ggml_backend_tensor_set.restype = None
_libggml_base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_libggml_base.ggml_backend_tensor_get.restype = None
_libggml_base.ggml_nbytes.argtypes = [ctypes.c_void_p]
_libggml_base.ggml_nbytes.restype = ctypes.c_size_t
_libggml_base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
_libggml_base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
_libggml_base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_libggml_base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
_libggml_base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
_libggml_base.ggml_backend_buft_name.restype = ctypes.c_char_p
_libggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so"))  # the backend registry
_libggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
_libggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
GGML_BACKEND_DEVICE_TYPE_CPU = 0


# ---- GgmlTensor checked against the loaded libggml ----
class _GgmlInitParams(ctypes.Structure):  # struct ggml_init_params (ggml.h)
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


# sizeof(struct ggml_object) (ggml.c: offs, size, next, type, 4 bytes padding): ggml_tensor_overhead() is it plus
# sizeof(struct ggml_tensor).
GGML_OBJECT_SIZE = 32
PROBE_SHAPE = (3, 5)  # ne0, ne1 of the probe tensors: small, distinct, F32
for _fn, _args, _res in (("ggml_init", [_GgmlInitParams], ctypes.c_void_p), ("ggml_free", [ctypes.c_void_p], None),
                         ("ggml_new_tensor_2d", [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64],
                          ctypes.c_void_p),
                         ("ggml_add", [ctypes.c_void_p] * 3, ctypes.c_void_p),
                         ("ggml_set_name", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
                         ("ggml_get_name", [ctypes.c_void_p], ctypes.c_void_p),
                         ("ggml_tensor_overhead", [], ctypes.c_size_t)):
    getattr(_libggml_base, _fn).argtypes, getattr(_libggml_base, _fn).restype = _args, _res


def check_tensor_layout(mirror: type[ctypes.Structure] = GgmlTensor) -> None:
    """`mirror` (GgmlTensor) read against ggml itself: ggml builds a = b + c in a metadata-only context and the fields
    edgezo reads (type, ne, nb, src, name) must come back as ggml wrote them, and the struct's size must match. A
    different libggml (another llama-cpp-python) raises here instead of reading garbage from live graphs."""
    lib = _libggml_base
    ctx = lib.ggml_init(_GgmlInitParams(mem_size=4 * lib.ggml_tensor_overhead(), mem_buffer=None, no_alloc=True))
    if not ctx:
        raise EdgezoError("ggml_init failed while checking struct ggml_tensor")
    try:
        b, c = (lib.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, *PROBE_SHAPE) for _ in range(2))
        a = lib.ggml_set_name(lib.ggml_add(ctx, b, c), b"edgezo-probe")
        t = mirror.from_address(a)
        width, rows = PROBE_SHAPE
        found = {"sizeof": ctypes.sizeof(mirror), "type": t.type, "ne": tuple(t.ne), "nb": tuple(t.nb)[:2],
                 "src": [ctypes.cast(s, ctypes.c_void_p).value for s in t.src[:2]], "name": t.name,
                 "name offset": mirror.name.offset}
        expected = {"sizeof": lib.ggml_tensor_overhead() - GGML_OBJECT_SIZE, "type": GGML_TYPE_F32,
                    "ne": (width, rows, 1, 1), "nb": (4, 4 * width), "src": [b, c], "name": b"edgezo-probe",
                    "name offset": lib.ggml_get_name(a) - a}
    finally:
        lib.ggml_free(ctx)
    wrong = [f"{k} {found[k]} (ggml: {expected[k]})" for k in expected if found[k] != expected[k]]
    if wrong:
        raise EdgezoError(f"edgezo.engine.GgmlTensor, written for llama-cpp-python==0.3.36, does not match the loaded "
                          f"ggml (llama-cpp-python {llama_cpp.__version__}): {'; '.join(wrong)}. Install the pinned "
                          "llama-cpp-python==0.3.36 (make install-llama-cpp)")


check_tensor_layout()


class TensorBuftOverride(ctypes.Structure):  # struct llama_model_tensor_buft_override (llama.h; not in llama_cpp)
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


_EXTRA_BUFTS_FN = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)


def system_info() -> str:
    """llama.cpp's build features, e.g. 'CPU : SSE3 = 1 | ... | AVX2 = 1 | ... | REPACK = 1 |'."""
    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")


def _cpu_extra_buffer_type(name: str) -> int | None:
    """The CPU device's extra buffer type called `name` ("CPU_REPACK", "AMX"), None if this build has none."""
    dev = _libggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    address = dev and _libggml_base.ggml_backend_reg_get_proc_address(
        _libggml_base.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return None
    bufts = _EXTRA_BUFTS_FN(address)(dev)
    i = 0
    while bufts and bufts[i]:
        if _libggml_base.ggml_backend_buft_name(bufts[i]).decode() == name:
            return bufts[i]
        i += 1
    return None


def _avoid_amx_buffers(params, model_path: Path) -> ctypes.Array | None:
    """Load without llama.cpp's extra buffer types (so no weight reaches the AMX one), placing the weights that
    CPU_REPACK would have taken into CPU_REPACK by tensor overrides (edgezo.kernels). Returns the override table,
    which must outlive the load."""
    params.use_extra_bufts = False
    repack = _cpu_extra_buffer_type("CPU_REPACK")
    try:
        header = read_gguf_header(model_path)
    except ValueError as exc:
        raise EdgezoError(f"{model_path}: not a readable GGUF ({exc})") from None
    features = kernels.build_features(system_info())
    names = [name for name, ggml_type in header.tensor_types.items()
             if kernels.repacked_by_llama_cpp(name, ggml_type, header.tensor_dims[name], features)]
    if repack is None or not names:
        return None
    patterns = kernels.override_patterns(names)
    table = (TensorBuftOverride * (len(patterns) + 1))()  # zeroed last entry ends the list
    for entry, pattern in zip(table, patterns):
        entry.pattern, entry.buft = pattern.encode(), repack
    params.tensor_buft_overrides = ctypes.addressof(table)
    return table


_notices_given: set[str] = set()


def _notice_once(message: str) -> None:
    if message not in _notices_given:
        _notices_given.add(message)
        log.warning(message)



@dataclass(frozen=True)
class EngineConfig:
    n_seq_max: int = 16  # sequences per decode (the training batch size)
    n_ctx_per_seq: int = 128  # KV cells per sequence: the longest sequence the context can score
    n_ubatch: int = 1024  # tokens per llama.cpp micro-batch; compute buffers are reserved for this many
    n_threads: int = 0  # 0: the cores other processes leave free, measured before each decode (edgezo.threads)
    flash_attn: bool = True  # faster on CPU (an early measurement); results vary slightly with batch composition
    kv_f32: bool = False  # F32 KV cache instead of llama.cpp's F16 (which rounds K, V to 11 bits): for parity tests

    @property
    def n_ctx(self) -> int:
        return self.n_seq_max * self.n_ctx_per_seq


class Vocabulary:
    """A GGUF's tokenizer and metadata through llama.cpp. Alone (vocab_only) it loads no weights: the torch reference
    tokenizes with it, so both trainers see identical token ids."""

    def __init__(self, model_path: str | os.PathLike, vocab_only: bool = True):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise EdgezoError(f"{self.model_path}: no such model file")
        params = llama_cpp.llama_model_default_params()
        params.use_mmap = True
        params.vocab_only = vocab_only
        overrides = None
        if not vocab_only:
            try:
                self.kernel_plan = kernels.plan_kernels(system_info(), kernels.cpu_flags(), kernels.amx_mode())
            except ValueError as exc:
                raise EdgezoError(str(exc)) from None
            if self.kernel_plan.avoid_amx:
                overrides = _avoid_amx_buffers(params, self.model_path)
                _notice_once(f"note: {self.kernel_plan.reason}")
        _weight_buffer_lines.clear()
        self.model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), params)
        del overrides  # read only while loading
        if not self.model:
            raise _llama_error(f"{self.model_path}: llama.cpp could not load this model")
        # MiB of weights per buffer type, e.g. {"CPU_Mapped": 40.1, "CPU_REPACK": 52.3}: which kernels the matmuls use
        self.weight_buffers_mib = {m.group(1): float(m.group(2)) for m in map(_WEIGHT_BUFFER.search, _weight_buffer_lines) if m}
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- model metadata and tokenizer ----------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        out = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, n_max, add_special, True)
        if n < 0:
            raise EdgezoError(f"tokenization failed for a text of {len(data)} bytes")
        return list(out[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        pieces = bytearray()
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = llama_cpp.llama_token_to_piece(self.vocab, int(t), buf, len(buf), 0, False)
            pieces += buf.raw[: max(n, 0)]
        return pieces.decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token as generated text (special tokens not rendered): stream them through an
        incremental UTF-8 decoder, since a character can span tokens."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, int(token), buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)]

    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the GGUF (tokenizer.chat_template), None if it has none."""
        template = llama_cpp.llama_model_chat_template(self.model, None)
        return template.decode("utf-8", errors="replace") if template else None

    def bos_eos_text(self) -> tuple[str, str]:
        """The BOS and EOS tokens' text, as llama_cpp.Llama passes them to a chat template ('' if none)."""
        def text(token: int) -> str:
            return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace") if token >= 0 else ""

        return text(llama_cpp.llama_vocab_bos(self.vocab)), text(llama_cpp.llama_vocab_eos(self.vocab))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The conversation rendered by the GGUF's own Jinja template exactly as llama-cpp-python renders it (its
        Jinja2ChatFormatter, also what its OpenAI server uses): llama.cpp's C matcher knows only some templates.
        The text carries the template's own BOS: tokenize it with add_special=False."""
        template = self.chat_template()
        if not template:
            raise EdgezoError(f"{self.model_path.name} has no chat template; use the text or prompt/completion format")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        bos, eos = self.bos_eos_text()
        formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=add_generation_prompt)
        try:
            return formatter(messages=messages).prompt
        except Exception as exc:  # jinja2 errors and the template's own raise_exception (ValueError)
            raise EdgezoError(f"the chat template of {self.model_path.name} refused the conversation: {exc}") from None


class Engine(Vocabulary):
    """A base GGUF (memory-mapped) plus one context sized for `config`, with an optional trainable LoRA adapter."""

    def __init__(self, model_path: str | os.PathLike, config: EngineConfig = EngineConfig(),
                 capture_block: int | None = None):
        """With `capture_block` a, `block_inputs` can return the hidden states entering block a (see SplitEngine)."""
        self._adapter_ptr = None
        self._adapter_tensors: dict[str, int] = {}  # adapter tensor name -> struct ggml_tensor address
        self._adapter_file: Path | None = None
        # An explicit count is obeyed. Made before the model loads, so the governor's first reading of the load spans
        # the load and the first decode can already use it.
        self.governor = threads.ThreadGovernor() if not config.n_threads else None
        super().__init__(model_path, vocab_only=False)
        self.config = config
        self.n_threads = config.n_threads or self.governor.n_threads
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.capture_block = capture_block
        self._captured: list[np.ndarray] | None = None  # micro-batch hidden states while block_inputs runs
        self._capture_error: str | None = None
        self._capture_cb = self._capture_callback(capture_block) if capture_block else None
        self.ctx = self._new_context(config, cb_eval=self._capture_cb)
        self._batch = llama_cpp.llama_batch_init(config.n_ctx, 0, 1)
        self._embd_batch = None  # allocated on first use: n_ctx x n_embd floats

    # ---- context -------------------------------------------------------------------------------------------
    def _new_context(self, config: EngineConfig, cb_eval=None):
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = config.n_ctx
        p.n_batch = config.n_ctx
        p.n_ubatch = min(config.n_ubatch, config.n_ctx)
        p.n_seq_max = config.n_seq_max
        p.kv_unified = False
        p.flash_attn_type = 1 if config.flash_attn else 0
        p.n_threads = p.n_threads_batch = self.n_threads
        p.no_perf = True
        if config.kv_f32:
            p.type_k = p.type_v = GGML_TYPE_F32
        if cb_eval is not None:
            p.cb_eval = cb_eval
        ctx = llama_cpp.llama_init_from_model(self.model, p)
        if not ctx:
            raise _llama_error(f"llama.cpp could not create a context (n_ctx={config.n_ctx}, n_seq_max={config.n_seq_max})")
        return ctx

    def close(self) -> None:
        if getattr(self, "ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            if self._embd_batch is not None:
                llama_cpp.llama_batch_free(self._embd_batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self._adapter_ptr:
            llama_cpp.llama_adapter_lora_free(self._adapter_ptr)
            self._adapter_ptr = None
        super().close()
        if self._adapter_file:
            self._adapter_file.unlink(missing_ok=True)

    def _llama_decode(self, batch) -> int:
        """llama_decode on this engine's context with the thread count that fits the load now (results do not
        depend on it)."""
        if self.governor is not None and (n := self.governor.choose()) != self.n_threads:
            llama_cpp.llama_set_n_threads(self.ctx, n, n)
            self.n_threads = n
        return llama_cpp.llama_decode(self.ctx, batch)

    # ---- scoring -------------------------------------------------------------------------------------------
    def logits(self, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
               columns: Sequence[int] | None = None, embeddings: np.ndarray | None = None,
               copy: bool = True) -> np.ndarray:
        """Logits at `positions[i]` of each sequence i, stacked in order: float32 [sum(len(p)), n_vocab or len(columns)].

        All sequences go through one llama_decode (llama.cpp splits it into micro-batches of n_ubatch tokens).
        With `embeddings` (float32 [n_tokens, n_embd], sequence after sequence) the model reads those vectors
        instead of embedding the tokens: `sequences` then only give the lengths.
        copy=False returns a read-only view of llama.cpp's output buffer instead of a copy (n_outputs x n_vocab
        floats, as large again as that buffer for a language-modelling batch); it is valid only until this engine's
        next decode or close.
        """
        flags = self._decode(sequences, positions, embeddings)
        n_out = int(flags.sum())
        out = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))
        if columns is not None or copy:
            return out[:, list(columns)].copy() if columns is not None else out.copy()
        out.flags.writeable = False
        return out

    def block_inputs(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """The hidden states entering block `capture_block`, float32 [n_tokens, n_embd] sequence after sequence.

        One decode whose graph stops, in each micro-batch, right after the node llama.cpp names l_out-(a-1): the
        blocks from a on are never computed. The callback sees micro-batches in llama.cpp's token order, which
        split.ubatch_layout mirrors; its row counts are checked against that layout."""
        if not self.capture_block:
            raise EdgezoError("block_inputs needs an engine opened with capture_block")
        self._captured, self._capture_error = [], None
        try:
            self._decode(sequences, [[len(s) - 1] for s in sequences], None)
            captured = self._captured
        finally:
            self._captured = None
        if self._capture_error:
            raise EdgezoError(self._capture_error)
        lengths = [len(s) for s in sequences]
        layout = ubatch_layout(lengths, min(self.config.n_ubatch, self.config.n_ctx), self.config.n_seq_max)
        if [sum(c.count for c in ub) for ub in layout] != [len(rows) for rows in captured]:
            raise EdgezoError(f"llama.cpp cut the decode into micro-batches of {[len(r) for r in captured]} tokens, "
                              f"edgezo expected {[sum(c.count for c in ub) for ub in layout]}: this llama.cpp "
                              f"orders tokens differently; train with --prefix-reuse off")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        hidden = np.empty((int(offsets[-1]), self.n_embd), dtype=np.float32)
        for chunks, rows in zip(layout, captured):
            row = 0
            for c in chunks:
                hidden[offsets[c.seq] + c.start : offsets[c.seq] + c.start + c.count] = rows[row : row + c.count]
                row += c.count
        return hidden

    def _capture_callback(self, block: int):
        target = f"l_out-{block - 1}".encode()

        @llama_cpp.ggml_backend_sched_eval_callback
        def callback(t, ask, user_data):
            if self._captured is None:
                return False  # not capturing: the graph runs in one piece
            node = GgmlTensor.from_address(t)
            if node.name != target:
                return False
            if ask:
                return True
            width, rows = node.ne[0], node.ne[1]
            if node.type != GGML_TYPE_F32 or node.nb[1] != width * 4 or width != self.n_embd:
                self._capture_error = f"{target.decode()} is not a contiguous F32 [n_embd, n_tokens] tensor here"
                return False
            out = np.empty((rows, width), dtype=np.float32)
            _libggml_base.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
            self._captured.append(out)
            return False  # stop this micro-batch's graph: the blocks after it are not needed

        return callback

    def _decode(self, sequences, positions, embeddings: np.ndarray | None) -> np.ndarray:
        """One llama_decode of all sequences (KV cache cleared first); returns the output flags per token."""
        n_seq = len(sequences)
        lengths = [len(s) for s in sequences]
        n_tokens = sum(lengths)
        if n_seq > self.config.n_seq_max:
            raise EdgezoError(f"{n_seq} sequences in one evaluation, the context holds {self.config.n_seq_max}")
        longest = max(lengths)
        if longest > self.config.n_ctx_per_seq:
            raise EdgezoError(f"a sequence of {longest} tokens exceeds the context of {self.config.n_ctx_per_seq} per sequence")
        if embeddings is None:
            b = self._batch
            np.ctypeslib.as_array(b.token, shape=(n_tokens,))[:] = np.concatenate([np.asarray(s) for s in sequences])
        else:
            if embeddings.shape != (n_tokens, self.n_embd):
                raise EdgezoError(f"embeddings of shape {embeddings.shape}, expected {(n_tokens, self.n_embd)}")
            if self._embd_batch is None:
                self._embd_batch = llama_cpp.llama_batch_init(self.config.n_ctx, self.n_embd, 1)
            b = self._embd_batch
            np.ctypeslib.as_array(b.embd, shape=(n_tokens * self.n_embd,))[:] = embeddings.reshape(-1)
        pos = np.ctypeslib.as_array(b.pos, shape=(n_tokens,))
        n_seq_id = np.ctypeslib.as_array(b.n_seq_id, shape=(n_tokens,))
        flags = np.ctypeslib.as_array(b.logits, shape=(n_tokens,))
        flags[:] = 0
        n_seq_id[:] = 1
        i = 0
        for seq, (n, want) in enumerate(zip(lengths, positions)):
            pos[i : i + n] = np.arange(n)
            for j in range(i, i + n):
                b.seq_id[j][0] = seq
            flags[i + np.asarray(want, dtype=np.int64)] = 1
            i += n
        b.n_tokens = n_tokens
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        rc = self._llama_decode(b)
        if rc != 0:
            raise _llama_error(f"llama_decode failed with code {rc} ({n_seq} sequences, {n_tokens} tokens)")
        return flags

    def generate(self, prompt: Sequence[int], max_tokens: int, temperature: float = 0.0, seed: int = 0,
                 sampling: Sampling | None = None):
        """Yield new tokens one by one, stopping at end of generation or at the context's end. The next token comes
        from llama.cpp's own sampler chain (`sampling`, else greedy at temperature 0 / plain temperature sampling)."""
        sampling = sampling or Sampling(temperature=temperature, seed=seed)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        b = self._batch
        feed, start = list(prompt), 0
        sampler = _sampler_chain(sampling, self.n_vocab)
        try:
            for token in feed:  # the penalties' history starts with the prompt, as in llama.cpp's own tools
                llama_cpp.llama_sampler_accept(sampler, token)
            for _ in range(max_tokens):
                if start + len(feed) > self.config.n_ctx_per_seq:
                    return
                n = len(feed)
                for j, t in enumerate(feed):
                    b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = t, start + j, 1, 0
                    b.seq_id[j][0] = 0
                b.logits[n - 1] = 1
                b.n_tokens = n
                if self._llama_decode(b) != 0:
                    raise EdgezoError("llama_decode failed during generation")
                nxt = int(llama_cpp.llama_sampler_sample(sampler, self.ctx, -1))  # also accepts the token
                if self.is_end_of_generation(nxt):
                    return
                yield nxt
                start += n
                feed = [nxt]
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def generate_greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int]) -> list[list[int]]:
        """Greedy continuations of many prompts at once, each stopping at end of generation, after
        max_new_tokens[i] tokens or at its context's end; the end-of-generation token is not returned.

        One decode reads all prompts (one sequence each in the KV cache), then each decode feeds the next token of
        every unfinished sequence: a batch of 16 costs about as many decodes as one sequence. The argmax is taken
        on the host from llama.cpp's float32 logits (the first maximum, as llama.cpp's greedy sampler)."""
        n_seq = len(prompts)
        if n_seq > self.config.n_seq_max:
            raise EdgezoError(f"{n_seq} sequences in one generation, the context holds {self.config.n_seq_max}")
        room = self.config.n_ctx_per_seq
        if any(len(p) >= room for p in prompts):
            raise EdgezoError(f"a prompt of {max(map(len, prompts))} tokens leaves no room in the context of {room}")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        generated: list[list[int]] = [[] for _ in prompts]
        feed = {seq: (list(p), 0) for seq, p in enumerate(prompts) if max_new_tokens[seq] > 0}  # seq -> (tokens, pos)
        b = self._batch
        while feed:
            n = 0
            for seq, (tokens, start) in feed.items():
                for j, t in enumerate(tokens):
                    b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = t, start + j, 1, 0
                    b.seq_id[n][0] = seq
                    n += 1
                b.logits[n - 1] = 1
            b.n_tokens = n
            rc = self._llama_decode(b)
            if rc != 0:
                raise _llama_error(f"llama_decode failed with code {rc} during generation ({len(feed)} sequences)")
            rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(len(feed), self.n_vocab))
            following = {}
            for (seq, (tokens, start)), token in zip(feed.items(), rows.argmax(axis=1).tolist()):
                if self.is_end_of_generation(token):
                    continue
                generated[seq].append(token)
                pos = start + len(tokens)
                if len(generated[seq]) < max_new_tokens[seq] and pos < room:
                    following[seq] = ([token], pos)
            feed = following
        return generated

    # ---- adapter -------------------------------------------------------------------------------------------
    def set_adapter(self, adapter: LoraAdapter | None, in_place: bool = True) -> None:
        """Load `adapter` (written to a temporary GGUF) and make it the context's only adapter, at scale 1
        (llama.cpp applies alpha / r from the file). With `in_place`, find its tensors for `update_adapter`."""
        old_ptr, old_file = self._adapter_ptr, self._adapter_file
        if adapter is None:
            llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
            self._adapter_ptr, self._adapter_file, self._adapter_tensors = None, None, {}
        else:
            fd, name = tempfile.mkstemp(prefix="edgezo-adapter-", suffix=".gguf")
            os.close(fd)
            path = Path(name)
            adapter.save(path)
            ptr = llama_cpp.llama_adapter_lora_init(self.model, str(path).encode())
            if not ptr:
                path.unlink(missing_ok=True)
                raise _llama_error(f"llama.cpp rejected the adapter for {self.model_path.name}")
            self._activate(self.ctx, ptr)
            self._adapter_ptr, self._adapter_file = ptr, path
            self._adapter_tensors = self._find_adapter_tensors(adapter) if in_place else {}
        # Free the old adapter only after the new set is active: the context compares raw pointers.
        if old_ptr:
            llama_cpp.llama_adapter_lora_free(old_ptr)
        if old_file:
            old_file.unlink(missing_ok=True)

    @staticmethod
    def _activate(ctx, ptr) -> None:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(ptr)
        scales = (ctypes.c_float * 1)(1.0)
        if llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales) != 0:
            raise EdgezoError("llama.cpp could not activate the adapter")

    def _find_adapter_tensors(self, adapter: LoraAdapter) -> dict[str, int]:
        """Addresses of the adapter's ggml tensors, seen by the eval callback of a one-token throwaway context."""
        found: dict[str, int] = {}

        @llama_cpp.ggml_backend_sched_eval_callback
        def callback(t, ask, user_data):
            node = ctypes.cast(t, ctypes.POINTER(GgmlTensor)).contents
            for src in node.src:
                if not src:
                    continue
                name = src.contents.name.decode(errors="replace")
                if (name.endswith(".lora_a") or name.endswith(".lora_b")) and "#" not in name:
                    found[name] = ctypes.addressof(src.contents)
            return False  # never ask for data: the graph runs in one piece

        probe = replace(self.config, n_seq_max=1, n_ctx_per_seq=256, n_ubatch=8, n_threads=self.n_threads)
        ctx = self._new_context(probe, cb_eval=callback)
        try:
            self._activate(ctx, self._adapter_ptr)
            batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(0), 1)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise EdgezoError("llama_decode failed while locating the adapter tensors")
        finally:
            llama_cpp.llama_free(ctx)
        problems = []
        for name, value in adapter.tensors.items():
            address = found.get(name)
            if address is None:
                problems.append(f"{name}: not used by the compute graph")
                continue
            t = GgmlTensor.from_address(address)
            ne = tuple(t.ne[: value.ndim])
            if t.type != GGML_TYPE_F32 or ne != value.shape[::-1]:
                problems.append(f"{name}: ggml type {t.type} ne {ne}, expected F32 {value.shape[::-1]}")
        if problems:
            raise EdgezoError("cannot update the adapter in place:\n  " + "\n  ".join(problems))
        return {name: found[name] for name in adapter.tensors}

    @contextlib.contextmanager
    def adapter_detached(self):
        """The base model alone inside the block; afterwards the adapter is active again, its tensors (and their
        in-place addresses) untouched. Each switch makes the next decode rebuild llama.cpp's graph (milliseconds)."""
        if not self._adapter_ptr:
            yield
            return
        llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
        try:
            yield
        finally:
            self._activate(self.ctx, self._adapter_ptr)

    def update_adapter(self, values: Mapping[str, np.ndarray]) -> None:
        """Overwrite the active adapter's tensors with `values` (same names and shapes as the adapter set)."""
        if not self._adapter_tensors:
            raise EdgezoError("update_adapter needs an adapter set with set_adapter(..., in_place=True)")
        llama_cpp.llama_synchronize(self.ctx)  # no decode may still be reading the tensors
        for name, address in self._adapter_tensors.items():
            value = np.ascontiguousarray(values[name], dtype=np.float32)
            nbytes = _libggml_base.ggml_nbytes(address)
            if value.nbytes != nbytes:
                raise EdgezoError(f"{name}: {value.nbytes} bytes given, the adapter tensor holds {nbytes}")
            _libggml_base.ggml_backend_tensor_set(address, value.ctypes.data, 0, nbytes)


class SplitEngine(Engine):
    """An Engine for an adapter on blocks [a, L) that runs only those blocks per evaluation.

    The prefix (this Engine, on split.split_files' prefix GGUF, capture_block=a) embeds each batch and runs blocks
    [0, a) once; the hidden states entering block a are kept for the last batch seen, so every perturbed evaluation
    of a MeZO step on that batch runs only the suffix GGUF (blocks [a, L), norm, head), which holds the adapter under its
    renumbered block names. A batch seen a second time (the validation batches, from the second validation on)
    keeps its hidden states in memory, up to `cache_bytes`. Hidden states are only reused for the identical
    batch (llama.cpp's CPU kernels depend slightly on batch composition), so the logits are always exactly the
    full model's. Scoring and the adapter calls behave as the full model's; generation is not split.
    """

    def __init__(self, prefix_path: str | os.PathLike, suffix_path: str | os.PathLike, first_block: int,
                 config: EngineConfig = EngineConfig(), cache_bytes: int = PREFIX_CACHE_BYTES):
        super().__init__(prefix_path, config, capture_block=first_block)
        self.suffix = Engine(suffix_path, config)
        self.first_block = first_block
        self.cache_bytes = cache_bytes
        self._last: tuple[tuple, np.ndarray] | None = None  # (batch, hidden states) of the latest prefix pass
        self._seen: set[int] = set()  # hashes of batches run once: a second sighting puts them in the cache
        self._cache: dict[tuple, np.ndarray] = {}
        self._base_names: dict[str, str] = {}  # suffix adapter tensor name -> base name (set_adapter)
        self.prefix_passes = 0  # how many times blocks [0, a) ran (tests and benchmarks read it)

    def close(self) -> None:
        if getattr(self, "suffix", None) is not None:
            self.suffix.close()
            self.suffix = None
        super().close()

    def logits(self, sequences, positions, columns=None, embeddings=None, copy: bool = True) -> np.ndarray:
        if embeddings is not None:
            raise EdgezoError("SplitEngine computes its own block inputs")
        return self.suffix.logits(sequences, positions, columns, embeddings=self._hidden(sequences), copy=copy)

    def _hidden(self, sequences) -> np.ndarray:
        key = tuple(tuple(s) for s in sequences)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        hidden = self._cache.get(key)
        if hidden is None:
            hidden = self.block_inputs(sequences)
            self.prefix_passes += 1
            if hash(key) in self._seen and hidden.nbytes <= self.cache_bytes - self.cached_bytes:
                self._cache[key] = hidden
            self._seen.add(hash(key))
        self._last = (key, hidden)
        return hidden

    @property
    def cached_bytes(self) -> int:
        return sum(h.nbytes for h in self._cache.values())

    def set_adapter(self, adapter: LoraAdapter | None, in_place: bool = True) -> None:
        if adapter is not None:
            renamed = rename_for_suffix(dict(zip(adapter.tensors, adapter.tensors)), self.first_block)
            self._base_names = renamed  # suffix tensor name -> the adapter's own (base) name
            adapter = LoraAdapter(adapter.config, adapter.architecture,
                                  {new: adapter.tensors[old] for new, old in renamed.items()})
        self.suffix.set_adapter(adapter, in_place)

    def update_adapter(self, values: Mapping[str, np.ndarray]) -> None:
        self.suffix.update_adapter(_Renamed(values, self._base_names))

    def generate(self, *args, **kwargs):
        raise EdgezoError("generation runs on the whole model: open an Engine, not a SplitEngine (--prefix-reuse off)")

    generate_greedy = generate

    @contextlib.contextmanager
    def adapter_detached(self):
        with self.suffix.adapter_detached():
            yield


class _Renamed(Mapping):
    """`values` read under other names (new name -> name in `values`), lazily: perturbed values are computed on
    access."""

    def __init__(self, values: Mapping[str, np.ndarray], names: Mapping[str, str]):
        self.values, self.names = values, names

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[self.names[name]]

    def __iter__(self):
        raise TypeError("read by name only")

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Sampling:
    """llama.cpp's sampler chain, in llama.cpp's order: repeat penalty, top-k, top-p, min-p, temperature, then a
    seeded draw; temperature <= 0 is greedy (argmax). The defaults switch every filter off (0 / 1.0 / 0.0)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # tokens the penalty looks back over
    seed: int = 0


def _sampler_chain(s: Sampling, n_vocab: int):
    params = llama_cpp.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = llama_cpp.llama_sampler_chain_init(params)
    add = lambda sampler: llama_cpp.llama_sampler_chain_add(chain, sampler)  # noqa: E731 (the chain owns each one)
    if s.repeat_penalty != 1.0:
        # this llama.cpp's signature still takes n_vocab first (include/llama.h of the vendored commit)
        add(llama_cpp.llama_sampler_init_penalties(n_vocab, s.repeat_last_n, s.repeat_penalty, 0.0, 0.0))
    if s.temperature <= 0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if s.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
    if s.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(s.temperature))
    add(llama_cpp.llama_sampler_init_dist(s.seed & 0xFFFFFFFF))
    return chain


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, quant: str, n_threads: int = 0) -> None:
    """Convert a GGUF to another tensor type with llama.cpp's own quantizer (requantizing quantized inputs)."""
    ftype = QUANT_FTYPES.get(quant.lower())
    if ftype is None:
        raise EdgezoError(f"unknown quant type {quant!r}; choose from {', '.join(QUANT_FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = n_threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise _llama_error(f"llama.cpp could not quantize {src} to {quant} (code {rc})")


