"""llama.cpp's own quantizer, for the types gguf-py cannot write (the k-quants)."""

from __future__ import annotations

import ctypes
import os

import llama_cpp

from ..files import EdgezoError
from ..formats import QUANT_FTYPES
from .ggml import llama_error


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
        raise llama_error(f"llama.cpp could not quantize {src} to {quant} (code {rc})")
