"""A tiny llama-architecture GGUF written from scratch: random weights and a byte-level BPE vocabulary.

Small enough that llama.cpp loads it in milliseconds, real enough that every code path of the engine runs:
gpt2-style BPE (256 byte tokens + a few merges + special tokens), GQA attention, SwiGLU MLP, tied embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TinyLlama:
    n_embd: int = 64
    n_layers: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    context_length: int = 512
    weight_scale: float = 0.2


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as in its encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# Merges that make common words in the tests single tokens (" positive", " negative", " good", " bad").
_WORDS = [" positive", " negative", " good", " bad", " Label", "Label"]


def _vocab() -> tuple[list[str], list[str]]:
    b2u = _byte_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges: list[str] = []
    for word in _WORDS:
        pieces = [b2u[b] for b in word.encode()]
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            merged = left + right
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
            if merged not in tokens:
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    return tokens, merges


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tiny_llama(path: str | Path, config: TinyLlama = TinyLlama(), seed: int = 0,
                     chat_template: str = CHAT_TEMPLATE) -> Path:
    from gguf import GGUFWriter, TokenType

    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, merges = _vocab()
    tokens = tokens + SPECIAL
    n_vocab = len(tokens)
    head_dim = config.n_embd // config.n_head
    n_kv = config.n_head_kv * head_dim

    def w(*shape):  # numpy (n_out, n_in) -> ggml ne (n_in, n_out)
        return (rng.standard_normal(shape) * config.weight_scale / np.sqrt(shape[-1]) * 4).astype(np.float32)

    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.n_ff)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(0)  # ALL_F32
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.NORMAL] * (n_vocab - len(SPECIAL)) + [TokenType.CONTROL] * len(SPECIAL))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(n_vocab - 3)
    writer.add_eos_token_id(n_vocab - 1)
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template)

    writer.add_tensor("token_embd.weight", w(n_vocab, config.n_embd))
    writer.add_tensor("output_norm.weight", np.ones(config.n_embd, dtype=np.float32))
    for i in range(config.n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(config.n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", w(config.n_embd, config.n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", w(n_kv, config.n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", w(n_kv, config.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", w(config.n_embd, config.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(config.n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(config.n_ff, config.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(config.n_ff, config.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(config.n_embd, config.n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
