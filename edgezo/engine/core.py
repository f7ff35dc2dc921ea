"""Engine: a base GGUF plus one llama.cpp context sized for a training batch; scoring many sequences per decode,
generation, and a LoRA adapter updated in place (the package docstring says how each is made fast)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import llama_cpp
import numpy as np

from .. import threads
from ..adapter import LoraAdapter
from ..files import EdgezoError
from ..split import ubatch_layout
from .ggml import GGML_TYPE_F32, GgmlTensor, libggml_base, llama_error
from .vocabulary import Vocabulary

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
            raise llama_error(f"llama.cpp could not create a context (n_ctx={config.n_ctx}, n_seq_max={config.n_seq_max})")
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
            libggml_base.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
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
            raise llama_error(f"llama_decode failed with code {rc} ({n_seq} sequences, {n_tokens} tokens)")
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
                raise llama_error(f"llama_decode failed with code {rc} during generation ({len(feed)} sequences)")
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
                raise llama_error(f"llama.cpp rejected the adapter for {self.model_path.name}")
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
            nbytes = libggml_base.ggml_nbytes(address)
            if value.nbytes != nbytes:
                raise EdgezoError(f"{name}: {value.nbytes} bytes given, the adapter tensor holds {nbytes}")
            libggml_base.ggml_backend_tensor_set(address, value.ctypes.data, 0, nbytes)


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
