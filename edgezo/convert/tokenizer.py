"""HF tokenizer files -> GGUF tokenizer metadata (the `tokenizer.ggml.*` keys), and back.

Two vocabularies are supported, as in llama.cpp's converter:
* SentencePiece (`tokenizer.model`): tokenizer model "llama"; pieces, scores and types straight from the
  SentencePiece model, then the added tokens of tokenizer_config.json (llama.cpp's _create_vocab_sentencepiece).
* gpt2-style byte-level BPE (`tokenizer.json`): tokenizer model "gpt2", the vocabulary, the merges and a
  pre-tokenizer name (`tokenizer.ggml.pre`) that selects llama.cpp's split regex.
llama.cpp's own converter picks the pre-tokenizer by hashing the token ids of a probe text, which only knows
published tokenizers. We read the pre-tokenizer structure of tokenizer.json instead, so a freshly trained
tokenizer with a known split works too; an unknown structure is an error rather than a silent "default".
Special token ids, add_bos/add_eos, merges and the chat template come from gguf-py's SpecialVocab.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgezo.files import EdgezoError

# Split regexes of the HF tokenizers llama.cpp implements natively (tokenizer.json, pre_tokenizer.Split.pattern).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Structure of tokenizer.json's pre_tokenizer (see `_signature`) -> llama.cpp pre-tokenizer name.
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",  # GPT-2: one regex inside ByteLevel
    (("Digits", True), ("ByteLevel", True)): "smollm",  # SmolLM / StarCoder: every digit alone, then GPT-2's regex
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",  # Llama 3
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",  # Qwen2 / Qwen2.5
}
# Token types as llama.cpp reads them (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    """What goes into the `tokenizer.ggml.*` keys (besides SpecialVocab's)."""

    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    add_space_prefix: bool | None = None


def read_vocab(model_dir: Path, n_vocab: int, spm_add_space_prefix: bool | None) -> Vocab:
    """The vocabulary of an HF model directory, padded to the model's `n_vocab` embedding rows with [PAD{i}]."""
    if (model_dir / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(model_dir, n_vocab)
        config = _tokenizer_config(model_dir)
        vocab.add_space_prefix = spm_add_space_prefix if spm_add_space_prefix is not None else config.get("add_prefix_space")
        return vocab
    if (model_dir / "tokenizer.json").is_file():
        return _bpe_vocab(model_dir, n_vocab)
    raise EdgezoError(f"{model_dir}: no tokenizer.model or tokenizer.json")


def write_vocab(writer, model_dir: Path, vocab: Vocab) -> None:
    from gguf import SpecialVocab

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(bool(vocab.add_space_prefix))
    special = SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    special.add_to_gguf(writer, quiet=True)


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter treats as control even when not flagged special."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>") or (
        token.startswith("<unused") and token.endswith(">"))


# ---- gpt2-style BPE ------------------------------------------------------------------------------------------
def _bpe_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    path = model_dir / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(spec):
        raise EdgezoError(f"{path}: only byte-level BPE tokenizer.json files are supported (found {model.get('type')} "
                          f"model, pre_tokenizer {_describe(spec.get('pre_tokenizer'))}); a SentencePiece model needs "
                          "tokenizer.model")
    pre = PRE_TOKENIZERS.get(_signature(spec.get("pre_tokenizer")))
    if pre is None:
        raise EdgezoError(f"{path}: pre-tokenizer {_describe(spec.get('pre_tokenizer'))} has no llama.cpp equivalent "
                          f"here; known: {', '.join(PRE_TOKENIZERS.values())}")
    by_id = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(by_id, NORMAL)
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") or _looks_special(added["content"]) else USER_DEFINED
    if max(by_id) >= n_vocab:
        raise EdgezoError(f"{path}: token id {max(by_id)} does not fit the model's vocab_size {n_vocab}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, UNUSED) for i in range(n_vocab)]
    return Vocab(model="gpt2", pre=pre, tokens=tokens, token_types=token_types)


def _pre_tokenizer_steps(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def _is_byte_level(spec: dict) -> bool:
    return any(step.get("type") == "ByteLevel" for step in _pre_tokenizer_steps(spec.get("pre_tokenizer")))


def _signature(pre: dict | None) -> tuple:
    """The parts of a pre_tokenizer that decide how text is split, e.g. (("Digits", True), ("ByteLevel", True))."""
    out = []
    for step in _pre_tokenizer_steps(pre):
        kind = step.get("type")
        if kind == "ByteLevel":
            out.append((kind, bool(step.get("use_regex", True))))
        elif kind == "Digits":
            out.append((kind, bool(step.get("individual_digits", False))))
        elif kind == "Split":
            pattern = step.get("pattern", {})
            out.append((kind, pattern.get("Regex", pattern.get("String"))))
        else:
            out.append((kind, None))
    return tuple(out)


def _describe(pre: dict | None) -> str:
    return " + ".join(f"{k}({v!r})" if v is not None else k for k, v in _signature(pre)) or "none"


# ---- SentencePiece -------------------------------------------------------------------------------------------
def _sentencepiece_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [UNUSED] * n_vocab
    for i in range(min(sp.vocab_size(), n_vocab)):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    # Added tokens (chat markers and the like) as tokenizer_config.json lists them; llama.cpp expects
    # user-defined ones with real spaces instead of SentencePiece's U+2581.
    for key, added in _tokenizer_config(model_dir).get("added_tokens_decoder", {}).items():
        i, text = int(key), added["content"]
        if i >= n_vocab:
            continue
        special = added.get("special") or _looks_special(text)
        tokens[i] = text if special else text.replace("\u2581", " ")
        types[i] = CONTROL if special else USER_DEFINED
        scores[i] = -1000.0
    return Vocab(model="llama", pre="default", tokens=tokens, token_types=types, scores=scores)


# ---- GGUF -> HF ----------------------------------------------------------------------------------------------
def save_hf_tokenizer(gguf_path: Path, out_dir: Path, pre: str | None) -> None:
    """Rebuild an HF tokenizer from the GGUF's vocabulary with transformers' own GGUF converter and save it.

    transformers maps llama.cpp's pre-tokenizer names to split regexes for llama-bpe and qwen2 but leaves
    "smollm" on GPT-2's plain ByteLevel, which would merge digits llama.cpp keeps apart: we add the Digits step.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises ValueError / KeyError / OSError for files it cannot read
        raise EdgezoError(f"{gguf_path}: transformers could not rebuild the tokenizer: {exc}") from exc
    if pre == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    tok.save_pretrained(str(out_dir))

