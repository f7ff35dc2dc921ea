"""The Hugging Face <-> GGUF model formats as data: one class per architecture behind a registry.

Each architecture says
* which HF tensor name becomes which GGUF tensor name (templates like "blk.{bid}.attn_q.weight"),
* how a tensor's values change on the way (the Q/K row permutation of llama, Gemma's 1 + w norms),
* which hyperparameters llama.cpp reads (`write_hparams`) and how to rebuild an HF config from them (`hf_config`).
Both converters (hf_to_gguf, gguf_to_hf) only walk these tables, so a new architecture is one class here.
The rules follow llama.cpp's own converter (conversion/llama.py, qwen.py, gemma.py of the llama.cpp that
llama-cpp-python 0.3.36 vendors) and the loaders in its src/models/*.cpp.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgezo.files import EdgezoError

# HF name -> GGUF name, shared by the llama-like decoders. {bid} is the block index.
_COMMON_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}
# Llama-style blocks have two norms: before attention and before the MLP (HF calls the second one
# post_attention_layernorm; Gemma 3 uses that name for a third norm, see Gemma3).
_PRE_MLP_NORM = {"model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight"}
_QKV_BIASES = {
    "model.layers.{bid}.self_attn.q_proj.bias": "blk.{bid}.attn_q.bias",
    "model.layers.{bid}.self_attn.k_proj.bias": "blk.{bid}.attn_k.bias",
    "model.layers.{bid}.self_attn.v_proj.bias": "blk.{bid}.attn_v.bias",
}
# HF tensors that carry no weights llama.cpp needs.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{bid\}", r"(?P<bid>\d+)") + "$")


@dataclass(frozen=True)
class HParams:
    """The HF config.json values every architecture needs, with llama.cpp's defaults filled in."""

    raw: dict[str, Any]

    def get(self, *keys: str, default=None):
        for key in keys:
            if self.raw.get(key) is not None:
                return self.raw[key]
        return default

    def require(self, key: str):
        if self.raw.get(key) is None:
            raise EdgezoError(f"config.json has no {key!r}, which the {self.raw.get('model_type')} converter needs")
        return self.raw[key]

    @property
    def n_layers(self) -> int:
        return int(self.require("num_hidden_layers"))

    @property
    def n_head(self) -> int:
        return int(self.require("num_attention_heads"))

    @property
    def n_head_kv(self) -> int:
        return int(self.get("num_key_value_heads", default=self.n_head))

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim", default=self.require("hidden_size") // self.n_head))

    def rope(self, layer_type: str = "full_attention") -> dict[str, Any]:
        """RoPE parameters: transformers 5 writes `rope_parameters` (per layer type for Gemma 3), 4.x `rope_scaling`
        plus a top-level `rope_theta`."""
        params = dict(self.get("rope_parameters", "rope_scaling", default={}) or {})
        if layer_type in params or "sliding_attention" in params:
            params = dict(params.get(layer_type, {}))
        params.setdefault("rope_type", params.get("type", "default"))
        if "rope_theta" not in params and self.raw.get("rope_theta") is not None and layer_type == "full_attention":
            params["rope_theta"] = self.raw["rope_theta"]
        return params


class Architecture:
    """Base: a llama-like decoder. Subclasses override the tables and a few hooks."""

    gguf_arch: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]]
    hf_model_type: ClassVar[str]
    tensors: ClassVar[dict[str, str]] = _COMMON_TENSORS
    permute_qk: ClassVar[bool] = False  # llama.cpp's llama graph expects Q/K rows in its own RoPE order
    norm_shift: ClassVar[float] = 0.0  # added to every "*norm.weight" on the way to GGUF
    # SentencePiece vocabularies: whether llama.cpp prepends a space (None: tokenizer_config's add_prefix_space,
    # else llama.cpp's default, True). Gemma's tokenizer adds none.
    spm_add_space_prefix: ClassVar[bool | None] = None

    # ---- tensor names ---------------------------------------------------------------------------------------
    @classmethod
    def _forward(cls) -> list[tuple[re.Pattern, str]]:
        return [(_template_regex(hf), gg) for hf, gg in cls.tensors.items()]

    @classmethod
    def _backward(cls) -> list[tuple[re.Pattern, str]]:
        return [(_template_regex(gg), hf) for hf, gg in cls.tensors.items()]

    @classmethod
    def gguf_name(cls, hf_name: str) -> str | None:
        """GGUF name of an HF tensor; None for tensors llama.cpp does not use (rotary caches)."""
        if _IGNORED.match(hf_name):
            return None
        for pattern, target in cls._forward():
            if m := pattern.match(hf_name):
                return target.format(**m.groupdict())
        raise EdgezoError(f"tensor {hf_name!r} has no GGUF name in the {cls.gguf_arch} converter")

    @classmethod
    def hf_name(cls, gguf_name: str) -> str:
        for pattern, target in cls._backward():
            if m := pattern.match(gguf_name):
                return target.format(**m.groupdict())
        raise EdgezoError(f"GGUF tensor {gguf_name!r} has no Hugging Face name in the {cls.gguf_arch} converter")

    # ---- tensor values --------------------------------------------------------------------------------------
    @classmethod
    def to_gguf(cls, gguf_name: str, data: np.ndarray, hp: HParams) -> np.ndarray:
        """HF values (float32, numpy/HF shape (n_out, n_in)) -> the values llama.cpp expects."""
        if cls.permute_qk and gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
            data = permute_qk(data, hp.n_head)
        elif cls.permute_qk and gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
            data = permute_qk(data, hp.n_head_kv)
        if cls.norm_shift and gguf_name.endswith("norm.weight"):
            data = data + np.float32(cls.norm_shift)
        return data

    @classmethod
    def to_hf(cls, gguf_name: str, data: np.ndarray, hp: HParams) -> np.ndarray:
        """Inverse of `to_gguf`."""
        if cls.permute_qk and gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
            data = unpermute_qk(data, hp.n_head)
        elif cls.permute_qk and gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
            data = unpermute_qk(data, hp.n_head_kv)
        if cls.norm_shift and gguf_name.endswith("norm.weight"):
            data = data - np.float32(cls.norm_shift)
        return data

    @classmethod
    def extra_tensors(cls, hp: HParams) -> dict[str, np.ndarray]:
        """Tensors llama.cpp needs that HF computes on the fly (llama 3's RoPE frequency factors)."""
        return {}

    # ---- hyperparameters ------------------------------------------------------------------------------------
    @classmethod
    def write_hparams(cls, writer, hp: HParams) -> None:
        """The `{arch}.*` keys, as llama.cpp's TextModel.set_gguf_parameters writes them."""
        writer.add_block_count(hp.n_layers)
        writer.add_context_length(int(hp.get("max_position_embeddings", default=2048)))
        writer.add_embedding_length(int(hp.require("hidden_size")))
        writer.add_feed_forward_length(int(hp.require("intermediate_size")))
        writer.add_head_count(hp.n_head)
        writer.add_head_count_kv(hp.n_head_kv)
        writer.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", default=1e-6)))
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
        writer.add_rope_dimension_count(hp.head_dim)
        writer.add_vocab_size(int(hp.require("vocab_size")))
        rope = hp.rope()
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        cls._write_rope_scaling(writer, rope)

    @classmethod
    def _write_rope_scaling(cls, writer, rope: dict[str, Any]) -> None:
        from gguf import RopeScalingType

        kind = rope["rope_type"]
        if kind == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        elif kind not in cls.supported_rope_types():
            raise EdgezoError(f"RoPE type {kind!r} is not supported by the {cls.gguf_arch} converter "
                              f"(supported: {', '.join(cls.supported_rope_types())})")

    @classmethod
    def supported_rope_types(cls) -> tuple[str, ...]:
        return ("default", "linear")

    @classmethod
    def hf_config(cls, meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
        """Keyword arguments for the transformers config class, from GGUF metadata (keys without the arch prefix)."""
        n_head = int(meta["attention.head_count"])
        n_embd = int(meta["embedding_length"])
        config = dict(
            vocab_size=int(meta["n_vocab"]),
            hidden_size=n_embd,
            intermediate_size=int(meta["feed_forward_length"]),
            num_hidden_layers=int(meta["block_count"]),
            num_attention_heads=n_head,
            num_key_value_heads=int(meta.get("attention.head_count_kv", n_head)),
            head_dim=int(meta.get("attention.key_length", n_embd // n_head)),
            max_position_embeddings=int(meta.get("context_length", 2048)),
            rms_norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(meta.get("rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in tensor_names,
        )
        if meta.get("rope.scaling.type") == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(meta["rope.scaling.factor"]),
                                      "rope_theta": config["rope_theta"]}
        return config


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half RoPE order -> llama.cpp's interleaved order (llama.cpp LlamaModel.permute).

    w: (n_head * head_dim, ...) rows of one projection. Within each head, rows [0, d/2) and [d/2, d) are the two
    halves HF rotates together; llama.cpp wants them interleaved (0, d/2, 1, d/2 + 1, ...).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Llama(Architecture):
    """Llama 2/3, SmolLM2, TinyLlama, Mistral-without-sliding-window."""

    gguf_arch = "llama"
    hf_architectures = ("LlamaForCausalLM",)
    hf_model_type = "llama"
    tensors = {**_COMMON_TENSORS, **_PRE_MLP_NORM, **_QKV_BIASES}
    permute_qk = True

    @classmethod
    def supported_rope_types(cls) -> tuple[str, ...]:
        return ("default", "linear", "llama3")

    @classmethod
    def extra_tensors(cls, hp: HParams) -> dict[str, np.ndarray]:
        rope = hp.rope()
        if rope["rope_type"] != "llama3":
            return {}
        return {"rope_freqs.weight": llama3_rope_factors(rope, hp.head_dim)}

    @classmethod
    def hf_config(cls, meta, tensor_names):
        if "rope_freqs.weight" in tensor_names:
            raise EdgezoError("this GGUF carries llama 3 RoPE frequency factors (rope_freqs.weight); turning them "
                              "back into a transformers rope_scaling config is not supported")
        config = super().hf_config(meta, tensor_names)
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        return config


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors of llama 3.1's RoPE scaling, float32 (head_dim / 2,), as llama.cpp's converter computes them."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


class Qwen2(Architecture):
    """Qwen2 / Qwen2.5: biases on q, k, v; no Q/K permutation (llama.cpp's qwen2 graph uses NEOX RoPE)."""

    gguf_arch = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    hf_model_type = "qwen2"
    tensors = {**_COMMON_TENSORS, **_PRE_MLP_NORM, **_QKV_BIASES}


class Gemma3(Architecture):
    """Gemma 3 text models (Gemma3ForCausalLM). llama.cpp's gemma3 graph:
    * scales embeddings by sqrt(n_embd) itself (HF's Gemma3TextScaledWordEmbedding), so token_embd is stored as is;
    * multiplies by the stored norm weights, while HF's Gemma3RMSNorm uses (1 + w): the converter adds 1;
    * scales Q by 1/sqrt(head_dim) (1/sqrt(n_embd/n_head) for the 62-layer 27B), not by query_pre_attn_scalar;
    * takes the sliding / full attention layout from `sliding_window_pattern` (a bool per layer) and the local
      RoPE base from `rope.freq_base_swa`.
    """

    gguf_arch = "gemma3"
    hf_architectures = ("Gemma3ForCausalLM",)
    hf_model_type = "gemma3_text"
    norm_shift = 1.0
    spm_add_space_prefix = False
    tensors = {
        **_COMMON_TENSORS,
        "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
        "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
        "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",
        "model.layers.{bid}.pre_feedforward_layernorm.weight": "blk.{bid}.ffn_norm.weight",
        "model.layers.{bid}.post_feedforward_layernorm.weight": "blk.{bid}.post_ffw_norm.weight",
    }

    @classmethod
    def write_hparams(cls, writer, hp: HParams) -> None:
        super().write_hparams(writer, hp)
        cls._check_query_scale(hp)
        if hp.get("attn_logit_softcapping") is not None:
            raise EdgezoError("config.json sets attn_logit_softcapping, which llama.cpp's gemma3 graph does not implement")
        if (cap := hp.get("final_logit_softcapping")) is not None:
            writer.add_final_logit_softcapping(float(cap))
        layer_types = hp.get("layer_types")
        if layer_types is None:  # transformers 4.x: every 6th layer is global
            pattern = int(hp.get("sliding_window_pattern", default=6))
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(hp.n_layers)]
        is_swa = [t == "sliding_attention" for t in layer_types]
        if any(is_swa):
            writer.add_sliding_window(int(hp.require("sliding_window")))
            writer.add_sliding_window_pattern(is_swa)
            writer.add_rope_freq_base_swa(float(hp.rope("sliding_attention").get("rope_theta", 10000.0)))

    @classmethod
    def _check_query_scale(cls, hp: HParams) -> None:
        n_embd = int(hp.require("hidden_size"))
        used = n_embd / hp.n_head if hp.n_layers == 62 else hp.head_dim  # llama_model_gemma3::load_arch_hparams
        scalar = float(hp.get("query_pre_attn_scalar", default=used))
        if scalar != used:
            raise EdgezoError(f"config.json has query_pre_attn_scalar {scalar:g}, but llama.cpp's gemma3 graph scales "
                              f"queries by 1/sqrt({used:g}) for this shape")

    @classmethod
    def hf_config(cls, meta, tensor_names):
        config = super().hf_config(meta, tensor_names)
        n_layers = config["num_hidden_layers"]
        is_swa = meta.get("attention.sliding_window_pattern")
        if is_swa is None and meta.get("attention.sliding_window"):
            is_swa = [(i + 1) % 6 != 0 for i in range(n_layers)]  # llama.cpp's default pattern for gemma3
        is_swa = list(is_swa or [False] * n_layers)
        config["layer_types"] = ["sliding_attention" if s else "full_attention" for s in is_swa]
        config["sliding_window"] = int(meta.get("attention.sliding_window", 4096))
        config["query_pre_attn_scalar"] = (config["hidden_size"] / config["num_attention_heads"]
                                           if n_layers == 62 else config["head_dim"])
        config["final_logit_softcapping"] = meta.get("final_logit_softcapping")
        config["tie_word_embeddings"] = True
        theta = config.pop("rope_theta")
        config.pop("rope_scaling", None)
        full = {"rope_type": "default", "rope_theta": theta}
        if meta.get("rope.scaling.type") == "linear":
            full = {"rope_type": "linear", "factor": float(meta["rope.scaling.factor"]), "rope_theta": theta}
        config["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": float(meta.get("rope.freq_base_swa", 10000.0))},
        }
        return config


REGISTRY: dict[str, type[Architecture]] = {cls.gguf_arch: cls for cls in (Llama, Qwen2, Gemma3)}


def for_hf_config(config: dict[str, Any], source: str) -> type[Architecture]:
    """The architecture of an HF config.json (by its `architectures` list, else `model_type`)."""
    names = list(config.get("architectures") or [])
    for cls in REGISTRY.values():
        if any(name in cls.hf_architectures for name in names) or (not names and config.get("model_type") == cls.hf_model_type):
            return cls
    found = ", ".join(names) or config.get("model_type") or "none given"
    supported = ", ".join(f"{a} ({c.gguf_arch})" for c in REGISTRY.values() for a in c.hf_architectures)
    raise EdgezoError(f"{source}: architecture {found} is not supported; supported: {supported}")


def for_gguf(arch: str, source: str) -> type[Architecture]:
    if arch not in REGISTRY:
        raise EdgezoError(f"{source}: GGUF architecture {arch!r} is not supported; supported: {', '.join(REGISTRY)}")
    return REGISTRY[arch]
