"""Which CPU buffer type each weight is loaded into, where edgezo decides it instead of llama.cpp: the AMX guard
loads with llama.cpp's extra buffer types off and puts back into CPU_REPACK exactly the weights llama.cpp would have
repacked (the rules, which need no llama.cpp, are in edgezo.kernels)."""

from __future__ import annotations

import ctypes
from pathlib import Path

from .. import kernels
from ..files import EdgezoError
from ..formats import read_gguf_header
from .ggml import GGML_BACKEND_DEVICE_TYPE_CPU, TensorBuftOverride, libggml, libggml_base, system_info

_EXTRA_BUFTS_FN = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)


def cpu_extra_buffer_type(name: str) -> int | None:
    """The CPU device's extra buffer type called `name` ("CPU_REPACK", "AMX"), None if this build has none."""
    dev = libggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    address = dev and libggml_base.ggml_backend_reg_get_proc_address(
        libggml_base.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return None
    bufts = _EXTRA_BUFTS_FN(address)(dev)
    i = 0
    while bufts and bufts[i]:
        if libggml_base.ggml_backend_buft_name(bufts[i]).decode() == name:
            return bufts[i]
        i += 1
    return None


def avoid_amx_buffers(params, model_path: Path) -> ctypes.Array | None:
    """Load without llama.cpp's extra buffer types (so no weight reaches the AMX one), placing the weights that
    CPU_REPACK would have taken into CPU_REPACK by tensor overrides (edgezo.kernels). Returns the override table,
    which must outlive the load."""
    params.use_extra_bufts = False
    repack = cpu_extra_buffer_type("CPU_REPACK")
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
