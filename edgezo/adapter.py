"""The LoRA adapter: float32 numpy tensors on the host, and their GGUF LoRA file format.

For a base linear tensor `N` of ggml shape (n_in, n_out) (numpy (n_out, n_in)), LoRA adds
    W x  ->  W x + (alpha / r) * B (A x),   A: (r, n_in), B: (n_out, r)
llama.cpp reads A and B from a GGUF of `general.type = adapter` as `N.lora_a` / `N.lora_b`, with numpy
shapes (r, n_in) and (n_out, r) -- the same orientation as PEFT's lora_A / lora_B -- and scales by
user_scale * alpha / r. Tensors stay F32: in F16 the MeZO perturbation eps * z would be rounded away.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .files import EdgezoError, atomic_path
from .formats import open_gguf, read_header

# Tuned on the movie-review validation split (SmolLM2-135M Q4_0, 400 steps, lr 1e-3, seed 0): k,v at rank 16 reached
# 84.8 % vs 83.0 % for q,v at rank 16 and 83.8 % for q,v at rank 8, and costs least in llama.cpp's graph
# (k and v project to the 3 KV heads only; rank 16 lets ggml's sgemm tile the rank dimension).
DEFAULT_TARGETS = ("attn_k", "attn_v")
# Linear tensors of a llama.cpp transformer block that LoRA may target (llama.cpp applies adapters to all).
KNOWN_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0  # scale alpha / rank = 2
    targets: tuple[str, ...] = DEFAULT_TARGETS
    # Blocks that get LoRA, as a Python slice of range(n_layers): None all, (-6, None) the last 6 (mlx-lm's
    # --num-layers 6), (10, 20) blocks 10..19. Kept as a slice so it means the same on any depth of model.
    layers: tuple[int | None, int | None] | None = None

    def __post_init__(self):
        if self.rank < 1:
            raise EdgezoError(f"LoRA rank must be >= 1, got {self.rank}")
        if not np.isfinite(self.alpha) or self.alpha <= 0:
            raise EdgezoError(f"LoRA alpha must be a positive number, got {self.alpha}")
        unknown = [t for t in self.targets if t not in KNOWN_TARGETS]
        if unknown or not self.targets:
            raise EdgezoError(f"unknown LoRA target(s) {unknown or '(none)'}; choose from {', '.join(KNOWN_TARGETS)}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
            if len(self.layers) != 2 or not all(v is None or isinstance(v, int) for v in self.layers):
                raise EdgezoError(f"LoRA layers must be a (start, stop) slice of block indices, got {self.layers}")

    def blocks(self, n_layers: int) -> range:
        """The block indices of a model with `n_layers` blocks that get LoRA (EdgezoError if none)."""
        blocks = range(n_layers) if self.layers is None else range(n_layers)[slice(*self.layers)]
        if not blocks:
            raise EdgezoError(f"LoRA layers {self.layers} select no block of a {n_layers}-block model")
        return blocks

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class BaseModelInfo:
    """What an adapter needs to know about its base GGUF, read from the file's header without loading weights."""

    path: Path
    architecture: str
    n_layers: int
    linear_shapes: dict[str, tuple[int, int]] = field(repr=False)  # tensor name -> (n_out, n_in)


def read_base_model_info(path: str | os.PathLike) -> BaseModelInfo:
    path = Path(path)
    header = read_header(path)
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise EdgezoError(f"{path} has no general.architecture; is it a GGUF model?")
    n_layers = header.metadata.get(f"{arch}.block_count", 0)
    shapes = {name: (int(dims[1]), int(dims[0])) for name, dims in header.tensor_dims.items() if len(dims) == 2}
    return BaseModelInfo(path=path, architecture=arch, n_layers=int(n_layers), linear_shapes=shapes)


def _read_str(reader, key: str) -> str | None:
    f = reader.fields.get(key)
    return None if f is None else bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")


def _read_scalar(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.parts[f.data[0]][0].item()


class LoraAdapter:
    """LoRA tensors keyed by their GGUF names (`blk.3.attn_q.weight.lora_a`), float32, in a fixed order."""

    def __init__(self, config: LoraConfig, architecture: str, tensors: dict[str, np.ndarray]):
        self.config = config
        self.architecture = architecture
        self.tensors = tensors

    @classmethod
    def init(cls, base: BaseModelInfo, config: LoraConfig, seed: int) -> "LoraAdapter":
        """A ~ U(-1/sqrt(n_in), 1/sqrt(n_in)) as PEFT's kaiming_uniform(a=sqrt(5)); B = 0, so the adapter starts as a no-op."""
        rng = np.random.default_rng(seed)
        tensors: dict[str, np.ndarray] = {}
        for base_name in target_tensor_names(base, config):
            n_out, n_in = base.linear_shapes[base_name]
            bound = 1.0 / np.sqrt(n_in)
            tensors[base_name + ".lora_a"] = rng.uniform(-bound, bound, size=(config.rank, n_in)).astype(np.float32)
            tensors[base_name + ".lora_b"] = np.zeros((n_out, config.rank), dtype=np.float32)
        return cls(config, base.architecture, tensors)

    @property
    def n_params(self) -> int:
        return sum(t.size for t in self.tensors.values())

    def save(self, path: str | os.PathLike) -> None:
        write_lora_gguf(path, self.architecture, self.config.alpha, self.tensors)

    @classmethod
    def load(cls, path: str | os.PathLike, base: BaseModelInfo | None = None) -> "LoraAdapter":
        return read_lora_gguf(path, base)


def target_tensor_names(base: BaseModelInfo, config: LoraConfig) -> list[str]:
    """Base tensor names for the targets, block by block; fails if a target is missing from the model."""
    names = []
    for layer in config.blocks(base.n_layers):
        for target in config.targets:
            name = f"blk.{layer}.{target}.weight"
            if name not in base.linear_shapes:
                raise EdgezoError(f"{base.path}: target {target!r} not found ({name} is not a 2-D tensor of the model)")
            names.append(name)
    return names


def write_lora_gguf(path: str | os.PathLike, architecture: str, alpha: float, tensors: dict[str, np.ndarray]) -> None:
    """Write a GGUF LoRA adapter that llama.cpp loads with --lora (atomically: temp file + fsync + rename)."""
    from gguf import GGUFWriter

    with atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, architecture)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        for name, value in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def read_lora_gguf(path: str | os.PathLike, base: BaseModelInfo | None = None) -> LoraAdapter:
    """Read and validate a GGUF LoRA adapter; with `base`, check every tensor against it and report all problems at once.

    Any failure is an EdgezoError naming the file: a corrupt file can make gguf's reader fail anywhere (tests/test_fuzz.py).
    """
    path = Path(path)
    try:
        return _read_lora_gguf(path, base)
    except EdgezoError as exc:
        if str(path) in str(exc):
            raise
        raise EdgezoError(f"{path}: {exc}") from None
    except Exception as exc:
        raise EdgezoError(f"{path} is not a readable GGUF LoRA adapter ({type(exc).__name__}: {exc})") from None


def _read_lora_gguf(path: Path, base: BaseModelInfo | None) -> LoraAdapter:
    reader = open_gguf(path)
    problems = []
    if _read_str(reader, "general.type") != "adapter" or _read_str(reader, "adapter.type") != "lora":
        problems.append("not a LoRA adapter (general.type must be 'adapter' and adapter.type 'lora')")
    alpha = _read_scalar(reader, "adapter.lora.alpha")
    if alpha is None:
        problems.append("missing adapter.lora.alpha")
    arch = _read_str(reader, "general.architecture")
    if base is not None and arch != base.architecture:
        problems.append(f"architecture {arch!r} does not match the base model's {base.architecture!r}")

    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.tensor_type.name != "F32":
            problems.append(f"{t.name}: type {t.tensor_type.name}, expected F32")
            continue
        # GGUFReader gives numpy shape = reversed ggml ne, i.e. (r, n_in) for lora_a and (n_out, r) for lora_b.
        tensors[t.name] = np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])

    ranks = set()
    pairs = {}
    for name, value in tensors.items():
        stem, _, kind = name.rpartition(".")
        if kind not in ("lora_a", "lora_b") or value.ndim != 2:
            problems.append(f"{name}: not a 2-D .lora_a/.lora_b tensor")
            continue
        pairs.setdefault(stem, {})[kind] = value
    for stem, pair in pairs.items():
        if set(pair) != {"lora_a", "lora_b"}:
            problems.append(f"{stem}: has only {', '.join(pair)}")
            continue
        a, b = pair["lora_a"], pair["lora_b"]
        if a.shape[0] != b.shape[1]:
            problems.append(f"{stem}: rank of lora_a {a.shape} and lora_b {b.shape} differ")
        ranks.add(a.shape[0])
        if base is not None:
            expected = base.linear_shapes.get(stem)
            if expected is None:
                problems.append(f"{stem}: no such tensor in the base model {base.path.name}")
            elif (b.shape[0], a.shape[1]) != expected:
                problems.append(f"{stem}: adapter maps {a.shape[1]} -> {b.shape[0]}, "
                                f"base tensor is {expected[1]} -> {expected[0]}")
    if not pairs:
        problems.append("holds no LoRA tensors")
    if len(ranks) > 1:
        problems.append(f"mixed ranks {sorted(ranks)}")
    if problems:
        raise EdgezoError(f"{path}: invalid LoRA adapter:\n  " + "\n  ".join(problems))

    targets = tuple(dict.fromkeys(stem.split(".")[2] for stem in pairs))
    blocks = sorted({int(stem.split(".")[1]) for stem in pairs})
    every_block = list(range(base.n_layers)) if base is not None else list(range(blocks[-1] + 1))
    layers = None if blocks == every_block else (blocks[0], blocks[-1] + 1)
    config = LoraConfig(rank=ranks.pop(), alpha=float(alpha), targets=targets, layers=layers)
    return LoraAdapter(config, arch, tensors)


def config_dict(config: LoraConfig) -> dict:
    d = asdict(config)
    d["targets"] = list(config.targets)
    d["layers"] = None if config.layers is None else list(config.layers)
    return d
