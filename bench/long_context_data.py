"""A long-context task of edgezo's own making from the built-in boolq: each question comes with several passages.

    python -m bench.long_context_data OUT_DIR     # writes OUT_DIR/{train,valid,test}.jsonl and lengths.json

Each record is a boolq record whose text is its own passage hidden among distractor passages of other records of the
same split (no passage twice in one record), at a seeded position: the model has to find the passage the question is
about. Distractors are added in a seeded order until the prompt holds at least MIN_TOKENS tokens by the Qwen2.5-Coder
tokenizer (the experiment's models); one that would take it past MAX_TOKENS is skipped, and a passage of MIN_TOKENS
or more alone keeps none. Labels stay boolq's (yes 62 %). Every record is a pure function of (boolq's split, SEED),
so the files are the same on every machine; lengths.json gives the prompt lengths (template filled, the answer word
included) under each built-in model family's own tokenizer, measured with llama.cpp's vocabulary
(edgezo.engine.Vocabulary).

Used by bench/budget_experiment.py as the long-context setting of issue 33 (the sequence length at which the
accountant predicts BP's activations to dominate).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from bench import common

SEED = 20261207
TEMPLATE = "{text}\nQuestion: {question}?\nAnswer:"  # boolq's own template
MIN_TOKENS, MAX_TOKENS = 512, 768  # prompt tokens by the reference tokenizer (Qwen2.5-Coder)
MAX_TRIES = 200  # distractor candidates looked at per record
SPLIT_SIZES = {"train": 3000, "valid": 300, "test": 500}  # the first records of each boolq split
REFERENCE_MODEL = "qwen2.5-coder-0.5b"  # its tokenizer is the 1.5B model's too
MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")  # lengths.json: one tokenizer per family


def prompt(record: dict) -> str:
    return TEMPLATE.format(text=record["text"], question=record["question"])


def build_split(records: list[dict], n_tokens: Callable[[str], int], seed: int, n: int) -> list[dict]:
    """The first `n` records of `records`, each with distractor passages from the others (see the module doc).

    n_tokens(prompt) -> tokens: the reference tokenizer."""
    rng = random.Random(seed)
    passages = list(dict.fromkeys(r["text"] for r in records))  # distinct, in file order
    out = []
    for record in records[:n]:
        gold = record["text"]
        chosen: list[str] = []
        # a passage long enough alone keeps no distractor; at most MAX_TRIES candidates are looked at
        candidates = [] if n_tokens(prompt(record)) >= MIN_TOKENS else rng.sample(passages, MAX_TRIES)
        for candidate in candidates:
            texts = {gold, *chosen}
            if candidate in texts:
                continue
            trial = {**record, "text": "\n\n".join([gold, *chosen, candidate])}
            length = n_tokens(prompt(trial))
            if length > MAX_TOKENS:
                continue
            chosen.append(candidate)
            if length >= MIN_TOKENS:
                break
        position = rng.randrange(len(chosen) + 1)
        ordered = chosen[:position] + [gold] + chosen[position:]
        out.append({"text": "\n\n".join(ordered), "question": record["question"], "label": record["label"],
                    "n_passages": len(ordered), "gold_position": position})
    return out


def build(source: Path, n_tokens: Callable[[str], int], sizes: dict[str, int] = SPLIT_SIZES) -> dict[str, list[dict]]:
    splits = {}
    for i, (split, n) in enumerate(sizes.items()):
        records = [json.loads(line) for line in (source / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        # distractors: the passages of the split's first n + 2000 records (the same split: no passage crosses splits)
        splits[split] = build_split(records[: n + 2000], n_tokens, SEED + i, n)
    return splits


def length_summary(splits: dict[str, list[dict]], n_tokens: Callable[[str], int]) -> dict:
    """Prompt tokens (+1: the answer word) per split: min, median, 95th percentile, max."""
    out = {}
    for split, rows in splits.items():
        lengths = sorted(n_tokens(prompt(r)) + 1 for r in rows)
        out[split] = {"min": lengths[0], "median": statistics.median(lengths),
                      "p95": lengths[int(0.95 * (len(lengths) - 1))], "max": lengths[-1], "n": len(lengths)}
    return out


def tokenizer(model: str) -> Callable[[str], int]:
    from edgezo import store
    from edgezo.engine import Vocabulary

    vocab = Vocabulary(store.resolve_model(model))
    return lambda text: len(vocab.tokenize(text, add_special=True))


def write(directory: str | Path, sizes: dict[str, int] = SPLIT_SIZES) -> Path:
    """The dataset in `directory` (kept if lengths.json says it was built by this SEED and sizes)."""
    from edgezo import store

    directory = Path(directory)
    stamp = {"seed": SEED, "sizes": sizes, "min_tokens": MIN_TOKENS, "max_tokens": MAX_TOKENS}
    lengths_path = directory / "lengths.json"
    if lengths_path.exists() and json.loads(lengths_path.read_text()).get("stamp") == stamp:
        return directory
    splits = build(store.fetch("boolq"), tokenizer(REFERENCE_MODEL), sizes)
    common.write_splits(directory, splits)
    lengths = {model: length_summary(splits, tokenizer(model)) for model in MODELS}
    lengths_path.write_text(json.dumps({"stamp": stamp, "template": TEMPLATE, "tokens": lengths}, indent=1) + "\n")
    return directory


if __name__ == "__main__":
    print(write(sys.argv[1]))
