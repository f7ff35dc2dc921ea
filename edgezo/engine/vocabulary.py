"""Vocabulary: a GGUF's tokenizer and metadata through llama.cpp, and the model load (with the kernel plan) that
every Engine does."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import llama_cpp

from .. import kernels
from ..files import EdgezoError
from .buffers import avoid_amx_buffers
from .ggml import WEIGHT_BUFFER, llama_error, system_info, weight_buffer_lines

log = logging.getLogger("edgezo")
_notices_given: set[str] = set()


def _notice_once(message: str) -> None:
    if message not in _notices_given:
        _notices_given.add(message)
        log.warning(message)


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
                overrides = avoid_amx_buffers(params, self.model_path)
                _notice_once(f"note: {self.kernel_plan.reason}")
        weight_buffer_lines.clear()
        self.model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), params)
        del overrides  # read only while loading
        if not self.model:
            raise llama_error(f"{self.model_path}: llama.cpp could not load this model")
        # MiB of weights per buffer type, e.g. {"CPU_Mapped": 40.1, "CPU_REPACK": 52.3}: which kernels the matmuls use
        self.weight_buffers_mib = {m.group(1): float(m.group(2)) for m in map(WEIGHT_BUFFER.search, weight_buffer_lines) if m}
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
