"""The libraries llama-cpp-python loads, seen from ctypes: llama.cpp's log (its errors quoted in edgezo's, the weight
buffer sizes of a load kept), struct ggml_tensor mirrored and checked against the loaded libggml, the ggml functions
the engine calls directly, and the build's system info. Importing it initialises llama.cpp's backend."""

from __future__ import annotations

import collections
import ctypes
import re
from pathlib import Path

import llama_cpp

from ..files import EdgezoError

_recent_errors: collections.deque[str] = collections.deque(maxlen=4)
weight_buffer_lines: list[str] = []  # "load_tensors: CPU_REPACK model buffer size = 52.3 MiB" of the latest load
WEIGHT_BUFFER = re.compile(r"(\S+) model buffer size =\s*([0-9.]+) MiB")
GGML_LOG_LEVEL_ERROR = 4


@llama_cpp.llama_log_callback
def _log_callback(level, text, user_data):
    # llama.cpp logs every load and every adapter tensor at INFO/WARN. Keep its errors, to quote them in our own
    # error messages instead of spraying stderr, and the weight buffer sizes of a load (which kernels it uses).
    line = text.decode("utf-8", errors="replace")
    if level == GGML_LOG_LEVEL_ERROR:
        _recent_errors.append(line.strip())
    elif "model buffer size" in line:
        weight_buffer_lines.append(line)


def llama_error(message: str) -> EdgezoError:
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

libggml_base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
libggml_base.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
libggml_base.ggml_backend_tensor_set.restype = None
libggml_base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
libggml_base.ggml_backend_tensor_get.restype = None
libggml_base.ggml_nbytes.argtypes = [ctypes.c_void_p]
libggml_base.ggml_nbytes.restype = ctypes.c_size_t
libggml_base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
libggml_base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
libggml_base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
libggml_base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
libggml_base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
libggml_base.ggml_backend_buft_name.restype = ctypes.c_char_p
libggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so"))  # the backend registry
libggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
libggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
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
    getattr(libggml_base, _fn).argtypes, getattr(libggml_base, _fn).restype = _args, _res


def check_tensor_layout(mirror: type[ctypes.Structure] = GgmlTensor) -> None:
    """`mirror` (GgmlTensor) read against ggml itself: ggml builds a = b + c in a metadata-only context and the fields
    edgezo reads (type, ne, nb, src, name) must come back as ggml wrote them, and the struct's size must match. A
    different libggml (another llama-cpp-python) raises here instead of reading garbage from live graphs."""
    lib = libggml_base
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


def system_info() -> str:
    """llama.cpp's build features, e.g. 'CPU : SSE3 = 1 | ... | AVX2 = 1 | ... | REPACK = 1 |'."""
    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
