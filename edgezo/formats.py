"""File-format constants and checks shared by modules that must not import llama_cpp (the store) and the engine."""

import os
import struct
from pathlib import Path

from .files import EdgezoError

# Quantization types `--quant` offers, by llama.cpp's file-type enum (llama.h LLAMA_FTYPE_*, also
# gguf.LlamaFileType); the same number is stored in a GGUF's general.file_type.
QUANT_FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
                "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "bf16": 32}


# ---- a bounded pre-check of untrusted GGUF files -------------------------------------------------------------
# gguf-py's reader trusts the counts and lengths in a file: a corrupt array count made it allocate until the
# machine ran out of memory (24 GB seen in tests/test_fuzz.py). This walk checks every count and length against
# the bytes that remain, in time and memory proportional to the header, before any reader sees the file.
GGUF_MAGIC = b"GGUF"
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4


class _Cursor:
    def __init__(self, f, size: int):
        self.f, self.size, self.pos = f, size, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(f"needs {n} bytes at offset {self.pos}, the file has {self.size - self.pos} left")
        self.pos += n
        return self.f.read(n)

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(f"declares {n} bytes at offset {self.pos}, the file has {self.size - self.pos} left")
        self.pos += n
        self.f.seek(self.pos)

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]


def check_gguf_header(path: str | os.PathLike) -> None:
    """Raise ValueError if the GGUF header of `path` is not self-consistent (counts and lengths within the file)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        c = _Cursor(f, size)
        if c.take(4) != GGUF_MAGIC:
            raise ValueError("no GGUF magic")
        version = c.u32()
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = c.u64(), c.u64()
        if n_tensors > size or n_kv > size:
            raise ValueError(f"declares {n_tensors} tensors and {n_kv} metadata keys in a {size}-byte file")
        for _ in range(n_kv):
            c.skip(c.u64())  # key
            _skip_value(c, c.u32())
        for _ in range(n_tensors):
            c.skip(c.u64())  # name
            n_dims = c.u32()
            if n_dims > MAX_DIMS:
                raise ValueError(f"tensor with {n_dims} dimensions")
            c.skip(8 * n_dims + 4 + 8)  # dims, type, offset


def _skip_value(c: _Cursor, value_type: int) -> None:
    if value_type in _SCALAR_SIZES:
        c.skip(_SCALAR_SIZES[value_type])
    elif value_type == _STRING:
        c.skip(c.u64())
    elif value_type == _ARRAY:
        item_type, count = c.u32(), c.u64()
        if item_type in _SCALAR_SIZES:
            c.skip(count * _SCALAR_SIZES[item_type])
        elif item_type == _STRING:
            if count * 8 > c.size - c.pos:
                raise ValueError(f"array of {count} strings cannot fit in the file")
            for _ in range(count):
                c.skip(c.u64())
        else:
            raise ValueError(f"array of value type {item_type}")  # nested arrays: not used by models or adapters
    else:
        raise ValueError(f"unknown metadata value type {value_type}")


def open_gguf(path: Path):
    """gguf's reader on a file whose header was first checked for sane counts (check_gguf_header)."""
    from gguf import GGUFReader

    try:
        check_gguf_header(path)
        return GGUFReader(path)
    except OSError as exc:
        raise EdgezoError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on a bad file
        raise EdgezoError(f"{path} is not a readable GGUF file: {exc}") from None
