"""PEFT LoRA directories <-> edgezo LoRA adapters (GGUF LoRA), with llama.cpp's tensor names and q/k row order.

A PEFT directory holds `adapter_config.json` (r, lora_alpha, target_modules, ...) and `adapter_model.safetensors`
with keys like `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`: A is (r, n_in), B is (n_out, r)
and the update is W += (lora_alpha / r) * B @ A. A GGUF LoRA holds the same A and B under the base tensor's GGUF
name (`blk.3.attn_q.weight.lora_a` / `.lora_b`, same orientation) and `adapter.lora.alpha = lora_alpha`, so llama.cpp
applies the same scale alpha / r.

The one non-trivial step: for the llama architecture llama.cpp's converter (convert_hf_to_gguf.py,
LlamaModel.permute) reorders the rows of q_proj and k_proj within each head, because llama.cpp's rope rotates
adjacent pairs while HF's rotates the two halves of a head. A LoRA delta B @ A on q/k must land in the same row
order; permuting rows of B @ A is permuting rows of B, so B is permuted and A is left alone (this is what
convert_lora_to_gguf.py ends up doing through its LoraTorchTensor). qwen2 and gemma3 use NEOX-style rope in
llama.cpp and are not permuted. Which architectures permute, and the permutation itself, come from
convert/architectures.py, the table the HF -> GGUF converter uses, so base weights and LoRA deltas agree.

torch, safetensors and peft (the `torch` extra) are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgezo.adapter import (KNOWN_TARGETS, BaseModelInfo, LoraAdapter, LoraConfig, read_base_model_info,
                            read_lora_gguf)
from edgezo.files import EdgezoError, atomic_path
from edgezo.formats import read_header

# The HF converter's architecture table decides which architectures permute q/k, with the same permutation.
from .architectures import for_gguf
from .architectures import permute_qk as permute_rows
from .architectures import unpermute_qk as unpermute_rows

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# HF module name -> (parent module in a decoder layer, GGUF tensor stem); identical for llama, qwen2 and gemma3.
HF_TO_GGUF = {
    "q_proj": ("self_attn", "attn_q"),
    "k_proj": ("self_attn", "attn_k"),
    "v_proj": ("self_attn", "attn_v"),
    "o_proj": ("self_attn", "attn_output"),
    "gate_proj": ("mlp", "ffn_gate"),
    "up_proj": ("mlp", "ffn_up"),
    "down_proj": ("mlp", "ffn_down"),
}
GGUF_TO_HF = {stem: module for module, (_, stem) in HF_TO_GGUF.items()}
assert set(GGUF_TO_HF) == set(KNOWN_TARGETS)

# PEFT writes `base_model.model.` + the model's own parameter path. Gemma-3 multimodal checkpoints nest the text
# model under `model.language_model.`; reading accepts both, writing uses the plain causal-LM path.
_KEY = re.compile(r"^base_model\.model\.model\.(?:language_model\.)?layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight$")

# adapter_config.json fields whose non-default values change the math beyond W += alpha/r * B @ A (or add
# tensors a GGUF LoRA cannot hold): (field, why we refuse it).
UNSUPPORTED = (
    ("use_rslora", "rank-stabilised scaling alpha/sqrt(r)"),
    ("use_dora", "DoRA magnitude vectors"),
    ("rank_pattern", "per-module ranks"),
    ("alpha_pattern", "per-module alphas"),
    ("fan_in_fan_out", "transposed (Conv1D) weights"),
    ("lora_bias", "a bias on lora_B"),
    ("modules_to_save", "fully trained extra modules"),
    ("trainable_token_indices", "trained token embeddings"),
    ("target_parameters", "LoRA on bare parameters"),
    ("layer_replication", "replicated layers"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
    ("use_qalora", "QA-LoRA pooling"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("arrow_config", "Arrow routing"),
    ("megatron_config", "Megatron-parallel layers"),
)


@dataclass(frozen=True)
class HeadCounts:
    """Attention heads of a base GGUF, per layer (GGUF stores a scalar or a per-layer array)."""

    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]


def read_head_counts(base: BaseModelInfo) -> HeadCounts:
    metadata = read_header(base.path).metadata  # a bounded header walk: no vocabulary objects
    arch = base.architecture

    def per_layer(key: str, default=None) -> tuple[int, ...]:
        value = metadata.get(key)
        if value is None:
            if default is None:
                raise EdgezoError(f"{base.path}: missing {key}, needed to permute q/k rows")
            return default
        values = [int(v) for v in value] if isinstance(value, tuple) else [int(value)] * base.n_layers
        if len(values) != base.n_layers:
            raise EdgezoError(f"{base.path}: {key} has {len(values)} entries for {base.n_layers} layers")
        return tuple(values)

    n_head = per_layer(f"{arch}.attention.head_count")
    return HeadCounts(n_head, per_layer(f"{arch}.attention.head_count_kv", default=n_head))


def _row_heads(base: BaseModelInfo) -> dict[str, int] | None:
    """GGUF base tensor name -> head count to permute its rows with; None if the architecture does not permute."""
    if not for_gguf(base.architecture, str(base.path)).permute_qk:  # refuses architectures it does not know
        return None
    heads = read_head_counts(base)
    out = {}
    for layer in range(base.n_layers):
        out[f"blk.{layer}.attn_q.weight"] = heads.n_head[layer]  # permute(w, n_head, n_head)
        out[f"blk.{layer}.attn_k.weight"] = heads.n_head_kv[layer]  # permute(w, n_head, n_head_kv)
    return out


# ---- PEFT -> edgezo --------------------------------------------------------------------------------------------
def read_peft_config(peft_dir: str | os.PathLike) -> dict:
    """adapter_config.json as a dict, refusing every PEFT feature that W += lora_alpha/r * B @ A cannot express."""
    path = Path(peft_dir) / CONFIG_FILE
    if not path.is_file():
        raise EdgezoError(f"{path}: no such file; a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EdgezoError(f"{path}: not readable JSON: {exc}") from exc
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r}, only LORA is supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            problems.append(f"{key} must be a positive number, got {config.get(key)!r}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (trained biases) is not supported")
    for key, what in UNSUPPORTED:
        if config.get(key):
            problems.append(f"{key}={config[key]!r}: {what} is not supported")
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):  # a string is a regex or "all-linear": checked against the tensor keys
        unknown = sorted(set(targets) - set(HF_TO_GGUF))
        if unknown:
            problems.append(f"target_modules {unknown} not supported (only {', '.join(HF_TO_GGUF)})")
    if problems:
        raise EdgezoError(f"{path}: unsupported PEFT adapter:\n  " + "\n  ".join(problems))
    return config


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors as float32 numpy (via torch, which also reads bf16)."""
    import torch
    from safetensors import safe_open

    if not path.is_file():
        pickled = (path.parent / "adapter_model.bin").exists()
        hint = " (adapter_model.bin is a pickle and is not loaded; save the adapter with safetensors)" if pickled else ""
        raise EdgezoError(f"{path}: no such file{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k).to(torch.float32).numpy() for k in f.keys()}
    except Exception as exc:  # safetensors raises SafetensorError / OSError on a damaged file
        raise EdgezoError(f"{path}: not a readable safetensors file: {exc}") from exc


def _sort_key(name: str) -> tuple[int, int, str]:
    """Block, then the KNOWN_TARGETS order, then lora_a before lora_b (the order LoraAdapter.init uses)."""
    parts = name.split(".")  # blk . N . target . weight . lora_x
    return int(parts[1]), KNOWN_TARGETS.index(parts[2]), parts[-1]


def peft_to_adapter(peft_dir: str | os.PathLike, base: BaseModelInfo) -> LoraAdapter:
    """Read a PEFT LoRA directory as an edgezo adapter for `base`; every tensor is checked and all problems are
    reported in one error naming the file."""
    peft_dir = Path(peft_dir)
    config = read_peft_config(peft_dir)
    weights_path = peft_dir / WEIGHTS_FILE
    raw = _load_safetensors(weights_path)
    rank = int(config["r"])
    heads = _row_heads(base)

    problems: list[str] = []
    tensors: dict[str, np.ndarray] = {}
    halves: dict[str, set[str]] = {}  # GGUF base name -> {"A", "B"} seen, shape right or not
    for key, value in raw.items():
        match = _KEY.match(key)
        if match is None:
            problems.append(f"{key}: not a LoRA tensor of {', '.join(HF_TO_GGUF)} in a decoder layer")
            continue
        layer, parent, module, half = int(match[1]), match[2], match[3], match[4]
        if module not in HF_TO_GGUF or HF_TO_GGUF[module][0] != parent:
            problems.append(f"{key}: module {parent}.{module} not supported (only {', '.join(HF_TO_GGUF)})")
            continue
        name = f"blk.{layer}.{HF_TO_GGUF[module][1]}.weight"
        expected = base.linear_shapes.get(name)  # (n_out, n_in)
        if expected is None:
            problems.append(f"{key}: the base model {base.path.name} has no tensor {name}")
            continue
        halves.setdefault(name, set()).add(half)
        shape = (rank, expected[1]) if half == "A" else (expected[0], rank)
        if value.shape != shape:
            problems.append(f"{key}: shape {tuple(value.shape)}, expected {shape} (r={rank}, base {name} maps "
                            f"{expected[1]} -> {expected[0]})")
            continue
        if half == "B" and heads is not None and name in heads:
            value = permute_rows(value, heads[name])
        tensors[f"{name}.lora_{half.lower()}"] = np.ascontiguousarray(value, dtype=np.float32)
    for name, seen in halves.items():  # both halves of every pair
        if seen != {"A", "B"}:
            problems.append(f"{name}: has lora_{seen.pop()} only")
    if not halves and not problems:
        problems.append("holds no LoRA tensors")
    if problems:
        raise EdgezoError(f"{weights_path}: does not fit {base.path.name}:\n  " + "\n  ".join(problems))

    ordered = {name: tensors[name] for name in sorted(tensors, key=_sort_key)}
    targets = tuple(t for t in KNOWN_TARGETS if any(n.split(".")[2] == t for n in ordered))
    lora = LoraConfig(rank=rank, alpha=float(config["lora_alpha"]), targets=targets)
    return LoraAdapter(lora, base.architecture, ordered)


# ---- edgezo -> PEFT --------------------------------------------------------------------------------------------
def adapter_to_peft(adapter: LoraAdapter, out_dir: str | os.PathLike, base: BaseModelInfo) -> Path:
    """Write `adapter` as a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) for the HF
    version of `base`; each file is written atomically. Returns out_dir."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if adapter.architecture != base.architecture:
        raise EdgezoError(f"adapter architecture {adapter.architecture!r} does not match {base.path.name} "
                          f"({base.architecture!r})")
    heads = _row_heads(base)
    tensors: dict[str, np.ndarray] = {}
    modules, layers = set(), set()
    for name, value in adapter.tensors.items():
        stem, _, half = name.rpartition(".")  # blk.N.attn_q.weight, lora_a
        _, layer, target, _ = stem.split(".")
        module = GGUF_TO_HF[target]
        if half == "lora_b" and heads is not None and stem in heads:
            value = unpermute_rows(value, heads[stem])
        key = f"base_model.model.model.layers.{layer}.{HF_TO_GGUF[module][0]}.{module}.lora_{half[-1].upper()}.weight"
        tensors[key] = np.ascontiguousarray(value, dtype=np.float32)
        modules.add(module)
        layers.add(int(layer))

    config = _peft_config(adapter, modules, layers, base)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})  # PEFT's own metadata: torch tensors
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch, atomic_path(out_dir / CONFIG_FILE) as tmp:
        config.save_pretrained(scratch)  # PEFT's own serialisation of its config
        os.replace(Path(scratch) / CONFIG_FILE, tmp)
    return out_dir


def _peft_config(adapter: LoraAdapter, modules: set[str], layers: set[int], base: BaseModelInfo):
    import peft

    alpha = adapter.config.alpha
    return peft.LoraConfig(
        r=adapter.config.rank,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        target_modules=sorted(modules, key=list(HF_TO_GGUF).index),
        # Only the covered layers get LoRA modules, so PEFT creates no untrained extras.
        layers_to_transform=None if len(layers) == base.n_layers else sorted(layers),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


# ---- file-level helpers ----------------------------------------------------------------------------------------
def peft_to_gguf(peft_dir: str | os.PathLike, base_gguf: str | os.PathLike, out_gguf: str | os.PathLike) -> Path:
    """PEFT directory -> GGUF LoRA that llama.cpp loads with --lora on `base_gguf`."""
    adapter = peft_to_adapter(peft_dir, read_base_model_info(base_gguf))
    adapter.save(out_gguf)
    return Path(out_gguf)


def gguf_to_peft(adapter_gguf: str | os.PathLike, base_gguf: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """GGUF LoRA (checked against `base_gguf`) -> PEFT directory."""
    base = read_base_model_info(base_gguf)
    return adapter_to_peft(read_lora_gguf(adapter_gguf, base), out_dir, base)
