"""Capacity analysis: the largest model of known families that each fine-tuning method fits in a device's RAM.

Every number comes from the memory accountant (edgezo.memory) that `edgezo memory` uses, applied to architectures
read from edgezo/model_families.toml (ModelSpec -> ModelShape without a GGUF file):
    MeZO        llama.cpp, LoRA on a Q4_0 / Q8_0 / F16 base          predict_llama_cpp(..., "mezo")
    BP          torch AdamW, float32 / bfloat16 base, LoRA or full,  predict_torch(..., "bp" | "bp-ckpt")
                with or without gradient checkpointing
    BP, quantized base   LoRA on the Q4_0 GGUF's blocks (QLoRA /      predict_torch(..., "bp-quant" | "bp-quant-ckpt")
                MeBP style), with or without checkpointing
Every BP row is the lean form, as `reference-bp --release-freed-memory` runs it (freed tensors returned to the kernel
at once, no heap retention): the question is the largest model, and that costs BP speed, not memory.
A model "fits" when its predicted peak RSS is at most the device profile's usable RAM. The MeZO/BP ratio is the
parameter count of the largest model MeZO (Q4_0) fits over that of the largest model a BP variant fits; the honest
one is over the best BP, whichever variant fits the largest model.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from .adapter import LoraConfig
from .files import EdgezoError
from .memory import CALIBRATION_SYSTEM_INFO, ModelSpec, predict_llama_cpp, predict_torch, shape_from_spec, torch_method

# Package data (importlib.resources), so an installed wheel has it as well as a checkout.
FAMILIES_FILE = resources.files("edgezo") / "model_families.toml"
DEFAULT_BATCH_SIZE = 16  # MeZO's default batch
DEFAULT_SEQ_LEN = 64  # a classification prompt: movie-review batches pad to ~55-60 tokens


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    quant: str | None = None  # MeZO: the base's llama.cpp type
    dtype: str = "float32"  # BP: the torch dtype of the weights
    base: str = "float"  # BP: "q4_0" keeps the base in the GGUF's Q4_0 blocks (edgezo.quant_torch)
    checkpointing: bool = False
    full: bool = False  # BP: every weight trained (else LoRA)

    @property
    def is_mezo(self) -> bool:
        return self.quant is not None


METHODS = [Method("mezo-q4_0", "MeZO LoRA, Q4_0 base", quant="q4_0"),
           Method("mezo-q8_0", "MeZO LoRA, Q8_0 base", quant="q8_0"),
           Method("mezo-f16", "MeZO LoRA, F16 base", quant="f16")] + [
    Method(f"bp-{dtype_key}-{'full' if full else 'lora'}{'-ckpt' if ckpt else ''}",
           f"BP {'full' if full else 'LoRA'}, {dtype_key}{', checkpointing' if ckpt else ''}",
           dtype=dtype, checkpointing=ckpt, full=full)
    for full in (False, True) for dtype, dtype_key in (("float32", "f32"), ("bfloat16", "bf16")) for ckpt in (False, True)] + [
    Method(f"bp-q4_0-lora{'-ckpt' if ckpt else ''}", f"BP LoRA, Q4_0 base{', checkpointing' if ckpt else ''}",
           base="q4_0", checkpointing=ckpt) for ckpt in (False, True)]
REFERENCE_MEZO = "mezo-q4_0"  # the numerator of the ratios: edgezo's default base


# The families `edgezo capacity` lists unless asked: the upstream architectures. qwen2.5-coder holds the two GGUF
# files edgezo ships as built-ins, measured from their headers: each stores a second copy of the vocabulary matrix
# (untied), so by parameter count they outrank the same architecture tied, and their BP predictions are not yet
# validated on the real files; they are listed with --family qwen2.5-coder.
DEFAULT_FAMILIES = ("smollm2", "qwen2.5", "llama3.2", "gemma3")


def load_specs(families: list[str] | None = None, path: Path | Traversable = FAMILIES_FILE) -> list[ModelSpec]:
    """The models of `families` (DEFAULT_FAMILIES when None), smallest first."""
    try:
        entries = tomllib.loads(path.read_text())["model"]
        specs = [ModelSpec(**entry) for entry in entries]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise EdgezoError(f"{path}: invalid model family file ({exc})") from None
    known = sorted({s.family for s in specs})
    families = families or DEFAULT_FAMILIES
    unknown = [f for f in families if f not in known]
    if unknown:
        raise EdgezoError(f"unknown model family {', '.join(unknown)}; known: {', '.join(known)}")
    return sorted((s for s in specs if s.family in families), key=lambda s: s.params)


def predicted_bytes(spec: ModelSpec, method: Method, batch_size: int, seq_len: int, lora: LoraConfig,
                    system_info: str = CALIBRATION_SYSTEM_INFO) -> int:
    """Peak RSS of fine-tuning `spec` with `method`, by the same functions `edgezo memory` calls (MeZO on the
    llama.cpp build whose system info is `system_info`)."""
    if method.is_mezo:
        return predict_llama_cpp(shape_from_spec(spec, method.quant), "mezo", batch_size, seq_len, lora,
                                 system_info=system_info).total_bytes
    quantized = method.base != "float"
    return predict_torch(shape_from_spec(spec, method.base if quantized else "f32"),
                         torch_method(method.checkpointing, quantized), batch_size, seq_len, lora, dtype=method.dtype,
                         full=method.full, release_freed=True).total_bytes


def prediction_table(specs: list[ModelSpec], batch_size: int, seq_len: int, lora: LoraConfig,
                     system_info: str = CALIBRATION_SYSTEM_INFO) -> dict[str, dict[str, int]]:
    """model name -> method key -> predicted peak bytes."""
    return {s.name: {m.key: predicted_bytes(s, m, batch_size, seq_len, lora, system_info) for m in METHODS}
            for s in specs}


def largest_fitting(specs: list[ModelSpec], table: dict[str, dict[str, int]], method_key: str, budget: int) -> ModelSpec | None:
    fitting = [s for s in specs if table[s.name][method_key] <= budget]
    return max(fitting, key=lambda s: s.params, default=None)


def capacity(budget_bytes: int, specs: list[ModelSpec], batch_size: int = DEFAULT_BATCH_SIZE,
             seq_len: int = DEFAULT_SEQ_LEN, lora: LoraConfig | None = None,
             system_info: str = CALIBRATION_SYSTEM_INFO) -> dict:
    """The largest model per method within `budget_bytes`, and the MeZO (Q4_0) / BP ratios of their sizes, MeZO on
    the llama.cpp build whose system info is `system_info` (a device profile's llama_cpp_system_info)."""
    if budget_bytes <= 0:
        raise EdgezoError(f"memory budget must be positive, got {budget_bytes}")
    if batch_size < 1 or seq_len < 1:
        raise EdgezoError(f"batch size and sequence length must be >= 1, got {batch_size} and {seq_len}")
    lora = lora or LoraConfig()
    table = prediction_table(specs, batch_size, seq_len, lora, system_info)
    methods = {}
    for m in METHODS:
        best = largest_fitting(specs, table, m.key, budget_bytes)
        methods[m.key] = {"label": m.label, "model": best.name if best else None, "params": best.params if best else 0,
                          "predicted_bytes": table[best.name][m.key] if best else None}
    mezo_params = methods[REFERENCE_MEZO]["params"]
    ratios = {m.key: (mezo_params / methods[m.key]["params"] if methods[m.key]["params"] else None)
              for m in METHODS if not m.is_mezo}
    # the BP variant that fits the largest model; of those that tie, the one with the lowest predicted peak
    best_bp = max((m.key for m in METHODS if not m.is_mezo),
                  key=lambda k: (methods[k]["params"], -(methods[k]["predicted_bytes"] or 0)))
    return {"budget_bytes": budget_bytes, "batch_size": batch_size, "seq_len": seq_len, "rank": lora.rank,
            "targets": list(lora.targets), "models": [s.name for s in specs], "methods": methods,
            "mezo_over_bp": ratios, "best_bp": best_bp, "mezo_over_best_bp": ratios[best_bp], "predictions": table}


def format_capacity(result: dict) -> str:
    lines = [f"{'method':34}{'largest model':20}{'params':>10}{'peak MiB':>10}{'MeZO/BP':>9}"]
    for key, m in result["methods"].items():
        ratio = result["mezo_over_bp"].get(key)
        ratio_text = "" if key.startswith("mezo") else ("  -" if ratio is None else f"{ratio:.1f}x")
        peak = "" if m["predicted_bytes"] is None else f"{m['predicted_bytes'] / 2**20:.0f}"
        lines.append(f"{m['label']:34}{m['model'] or '(none fits)':20}{m['params'] / 1e6:>9.0f}M{peak:>10}{ratio_text:>9}")
    best = result["mezo_over_best_bp"]
    lines.append(f"MeZO (Q4_0) over the best BP ({result['methods'][result['best_bp']]['label']}): "
                 + ("no BP variant fits" if best is None else f"{best:.1f}x"))
    return "\n".join(lines)
