"""File-format constants and checks shared by modules that must not import llama_cpp (the store) and the engine."""

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from .files import EdgezoError

# Quantization types `--quant` offers. Each is a llama.cpp file type (gguf.LlamaFileType = llama.h LLAMA_FTYPE_*,
# the number a GGUF stores in general.file_type); the single-type ones are also a ggml tensor type.
QUANT_NAMES = ("f32", "f16", "q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k", "bf16")
QUANT_FTYPES = {name: int(LlamaFileType.ALL_F32 if name == "f32" else LlamaFileType[f"MOSTLY_{name.upper()}"])
                for name in QUANT_NAMES}
QUANT_OF_FTYPE = {ftype: name for name, ftype in QUANT_FTYPES.items()}
# --quant name -> the ggml type llama.cpp's quantizer gives 2-D weights. The k-quant types (q4_k_m, q6_k, ...)
# choose types per tensor by rules not modelled here.
GGML_TYPE_OF_QUANT = {name: int(GGMLQuantizationType[name.upper()]) for name in QUANT_NAMES if "_k" not in name}

QUANTIZED_BASES = ("q4_0", "q8_0")  # file types whose blocks BP on a quantized base trains on (edgezo.quant_torch)


def check_base_file(gguf_path: Path, base_dtype: str | None = None) -> str:
    """A quantized base trains on the file's own blocks, so the file must be of that type (the one MeZO runs on with
    the same --quant); it is not requantized behind the run's recorded model_path. base_dtype None: either of
    QUANTIZED_BASES. Returns the file's type."""
    file_type = read_header(Path(gguf_path)).metadata.get("general.file_type")
    name = QUANT_OF_FTYPE.get(file_type, f"file type {file_type}")
    wanted = (base_dtype,) if base_dtype else QUANTIZED_BASES
    if name not in wanted:
        want = " or ".join(wanted)
        raise EdgezoError(f"BP on a quantized base (--base-dtype {want}) trains on the blocks of a {want} GGUF, and "
                          f"{Path(gguf_path).name} is {name}: pass --quant {wanted[0]} (the file MeZO runs on with "
                          f"that --quant)")
    return name


# ---- a bounded pre-check of untrusted GGUF files -------------------------------------------------------------
# gguf-py's reader trusts the counts and lengths in a file: a corrupt array count made it allocate until the
# machine ran out of memory (24 GB seen in tests/test_fuzz.py). This walk checks every count and length against
# the bytes that remain, in time and memory proportional to the header, before any reader sees the file.
GGUF_MAGIC = b"GGUF"
_V = GGUFValueType
_SCALAR_FORMATS = {_V.UINT8: "<B", _V.INT8: "<b", _V.UINT16: "<H", _V.INT16: "<h", _V.UINT32: "<I", _V.INT32: "<i",
                   _V.FLOAT32: "<f", _V.BOOL: "<?", _V.UINT64: "<Q", _V.INT64: "<q", _V.FLOAT64: "<d"}
_SCALAR_SIZES = {value_type: struct.calcsize(fmt) for value_type, fmt in _SCALAR_FORMATS.items()}
_STRING, _ARRAY = _V.STRING, _V.ARRAY
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

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8", errors="replace")


@dataclass
class GgufHeader:
    """Scalar and string metadata (arrays such as the vocabulary are skipped) and tensor infos of a GGUF."""

    metadata: dict[str, object] = field(default_factory=dict)
    tensor_dims: dict[str, tuple[int, ...]] = field(default_factory=dict)  # ggml ne order: (n_in, n_out) for a matrix
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type number (gguf.GGMLQuantizationType)
    tensor_offsets: dict[str, int] = field(default_factory=dict)  # byte offset of the tensor's data in the file


def read_gguf_header(path: str | os.PathLike) -> GgufHeader:
    """Walk the header of `path`, checking every count and length against the bytes left (ValueError if not sane).

    Also the fast way to read a model's metadata: gguf's reader builds Python objects for every vocabulary entry
    (13 s and ~600 MB for Gemma 3's 262k tokens, measured); this walk skips arrays and takes milliseconds.
    """
    size = os.path.getsize(path)
    header = GgufHeader()
    extents = []
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
            key = c.string()
            value = _read_value(c, c.u32())
            if value is not None:
                header.metadata[key] = value
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.u32()
            if n_dims > MAX_DIMS:
                raise ValueError(f"tensor {name!r} with {n_dims} dimensions")
            dims = struct.unpack(f"<{n_dims}Q", c.take(8 * n_dims))
            ggml_type, offset = c.u32(), c.u64()
            header.tensor_dims[name] = dims
            header.tensor_types[name] = ggml_type
            extents.append((name, dims, ggml_type, offset))
        data_start = _check_tensor_data(extents, c.pos, header.metadata.get("general.alignment", 32), size)
    header.tensor_offsets = {name: data_start + offset for name, _, _, offset in extents}
    return header


def tensor_nbytes(dims: tuple[int, ...], ggml_type: int) -> int:
    """Bytes of a tensor's data: (elements / block size) x bytes per block, from gguf's GGML_QUANT_SIZES table.
    ValueError for an unknown type or a row that is not a whole number of blocks."""
    try:
        block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown tensor type {ggml_type}") from None
    if dims and dims[0] % block:
        raise ValueError(f"row of {dims[0]} is not a multiple of the block size {block}")
    return math.prod(dims) // block * type_bytes


def _check_tensor_data(extents, header_end: int, alignment: int, size: int) -> int:
    """Every tensor's data must lie inside the file (a truncated download fails here, not in llama.cpp); returns
    where the tensor data starts."""
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"bad general.alignment {alignment!r}")
    data_start = -(-header_end // alignment) * alignment
    for name, dims, ggml_type, offset in extents:
        try:
            nbytes = tensor_nbytes(dims, ggml_type)
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
        end = data_start + offset + nbytes
        if end > size:
            raise ValueError(f"tensor {name!r} ends at byte {end}, the file has {size} (truncated?)")
    return data_start


SMALL_ARRAY = 4096  # numeric arrays up to this length (per-layer head counts, ...) are read; longer ones skipped


def _read_value(c: _Cursor, value_type: int):
    """A scalar, a string or a small numeric array (as a tuple); other arrays are skipped (None) after a size check."""
    if value_type in _SCALAR_FORMATS:
        return struct.unpack(_SCALAR_FORMATS[value_type], c.take(_SCALAR_SIZES[value_type]))[0]
    if value_type == _STRING:
        return c.string()
    if value_type == _ARRAY:
        start = c.pos
        item_type, count = c.u32(), c.u64()
        if item_type in _SCALAR_FORMATS and count <= SMALL_ARRAY:
            fmt = _SCALAR_FORMATS[item_type]
            return struct.unpack(f"{fmt[0]}{count}{fmt[1]}", c.take(count * _SCALAR_SIZES[item_type]))
        c.pos = start
        c.f.seek(start)
    _skip_value(c, value_type)
    return None


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


def read_header(path: Path) -> GgufHeader:
    """read_gguf_header with its failures as EdgezoError naming the file."""
    try:
        return read_gguf_header(path)
    except OSError as exc:
        raise EdgezoError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, struct.error) as exc:
        raise EdgezoError(f"{path} is not a readable GGUF file: {exc}") from None


def gguf_field(reader, key: str):
    """The value of `key` in a gguf.GGUFReader (None if absent)."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def copy_gguf_fields(reader, writer, skip=frozenset(), transform=lambda name, value: value) -> None:
    """Every key/value of `reader` into a gguf.GGUFWriter, except `skip`, gguf's header pseudo-fields (GGUF.*) and
    general.architecture (the writer was created with it); general.alignment is re-applied so the writer pads the
    tensor data to it. `transform(name, value)` gives the value to write."""
    for kv in reader.fields.values():
        if kv.name.startswith("GGUF.") or kv.name in skip or kv.name in ("general.architecture", "general.alignment"):
            continue
        value_type = kv.types[0]
        sub_type = kv.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(kv.name, transform(kv.name, kv.contents()), value_type, sub_type=sub_type)
    alignment = gguf_field(reader, "general.alignment")
    if alignment is not None:
        writer.add_custom_alignment(int(alignment))


def open_gguf(path: Path):
    """gguf's reader, on a file whose header was first walked with bounded work (read_header)."""
    from gguf import GGUFReader

    read_header(path)
    try:
        return GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on a bad file
        raise EdgezoError(f"{path} is not a readable GGUF file: {exc}") from None
