"""The hidden states entering block a of every training and validation example, computed once and memory-mapped
(`--prefix-reuse cache`): with LoRA on blocks [a, L) only, blocks [0, a) never change during a run, so a MeZO step
on long prompts need not run them at all (issue 32: a function-calling prompt is hundreds of tokens, its call tens).

One file pair per (prefix GGUF, llama.cpp build, the examples' tokens in order, pass batch size), named by a digest
of all four, under $EDGEZO_HOME/hidden-states: NAME.f32 holds the rows, example after example, and NAME.json (written
last, so a file without it is unfinished) each example's row range and blake2b digest, checked when the table is
opened. The table is computed in one fixed pass (the unique sequences in order, `batch_size` at a time), because
llama.cpp's CPU kernels depend slightly on a batch's composition: the same examples always give the same bits, and a
run resumes bit-exactly, whether the table was kept or rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..files import EdgezoError, atomic_path

FORMAT = "edgezo.hidden-states.v1"
DIGEST_BYTES = 16


def tokens_digest(tokens: Sequence[int]) -> str:
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int32).tobytes(), digest_size=DIGEST_BYTES).hexdigest()


class HiddenStateTable:
    """A finished table, read-only and memory-mapped: `get(tokens)` is that example's float32 [n_tokens, n_embd]
    rows, or None for a sequence the table does not hold."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            index = json.loads(self.path.with_suffix(".json").read_text())
        except (OSError, ValueError) as exc:
            raise EdgezoError(f"{self.path.with_suffix('.json')}: unreadable hidden-state index ({exc})") from None
        if index.get("format") != FORMAT:
            raise EdgezoError(f"{self.path}: not an {FORMAT} table")
        self.n_embd, n_rows = int(index["n_embd"]), int(index["n_rows"])
        expected = n_rows * self.n_embd * 4
        size = self.path.stat().st_size if self.path.exists() else -1
        if size != expected:
            raise EdgezoError(f"{self.path} holds {size} bytes, its index says {expected}: delete it and rerun")
        self.rows = np.memmap(self.path, dtype=np.float32, mode="r", shape=(n_rows, self.n_embd))
        self.entries = {key: (int(start), int(stop)) for key, start, stop, _ in index["examples"]}
        for key, start, stop, digest in index["examples"]:
            if hashlib.blake2b(self.rows[start:stop].tobytes(), digest_size=DIGEST_BYTES).hexdigest() != digest:
                raise EdgezoError(f"{self.path}: the rows of an example changed since they were written (digest "
                                  f"differs): delete {self.path} and rerun")

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def get(self, tokens: Sequence[int]) -> np.ndarray | None:
        span = self.entries.get(tokens_digest(tokens))
        return None if span is None else self.rows[span[0]:span[1]]


def table_path(directory: Path, identity: dict) -> Path:
    name = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=DIGEST_BYTES).hexdigest()
    return Path(directory) / f"{name}.f32"


def sequences_digest(sequences: Sequence[Sequence[int]]) -> str:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for s in sequences:
        h.update(tokens_digest(s).encode())
    return h.hexdigest()


def unique_in_order(sequences: Sequence[Sequence[int]]) -> list[Sequence[int]]:
    seen, out = set(), []
    for s in sequences:
        key = tokens_digest(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def build_table(path: Path, sequences: Sequence[Sequence[int]], block_inputs: Callable[[list], np.ndarray],
                batch_size: int, n_embd: int, progress: Callable[[int, int], None] = lambda done, total: None,
                ) -> HiddenStateTable:
    """Run `block_inputs` over the unique `sequences` in order, `batch_size` at a time, into the table at `path`."""
    unique = unique_in_order(sequences)
    path.parent.mkdir(parents=True, exist_ok=True)
    examples, row = [], 0
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        for i in range(0, len(unique), batch_size):
            batch = unique[i:i + batch_size]
            hidden = np.ascontiguousarray(block_inputs(batch), dtype=np.float32)
            for s in batch:
                rows = hidden[:len(s)]
                hidden = hidden[len(s):]
                out.write(rows.tobytes())
                examples.append([tokens_digest(s), row, row + len(s),
                                 hashlib.blake2b(rows.tobytes(), digest_size=DIGEST_BYTES).hexdigest()])
                row += len(s)
            progress(min(i + batch_size, len(unique)), len(unique))
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT, "n_embd": n_embd, "n_rows": row, "examples": examples}))
    return HiddenStateTable(path)


def open_table(path: Path, sequences: Sequence[Sequence[int]], block_inputs: Callable[[list], np.ndarray],
               batch_size: int, n_embd: int, log=lambda msg: None,
               progress: Callable[[int, int], None] = lambda done, total: None) -> HiddenStateTable:
    """The table at `path`, built first if it is missing or unfinished; one that fails its checks is rebuilt."""
    if path.with_suffix(".json").exists():
        try:
            return HiddenStateTable(path)
        except EdgezoError as exc:
            log(f"rebuilding the hidden-state table: {exc}")
    log(f"computing the hidden states entering the trained blocks once, for {len(sequences)} examples, into {path}")
    return build_table(path, sequences, block_inputs, batch_size, n_embd, progress)
