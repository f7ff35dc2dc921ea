"""SplitEngine: an adapter on the top blocks [a, L) trains through the suffix model only; blocks [0, a) run once per
batch in the prefix model (edgezo.split writes both GGUFs)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..adapter import LoraAdapter
from ..files import EdgezoError, cached_sha256, home
from ..split import PREFIX_CACHE_BYTES, rename_for_suffix
from .core import Engine, EngineConfig, llama_cpp
from .hidden_states import HiddenStateTable, open_table, sequences_digest, table_path


class SplitEngine(Engine):
    """An Engine for an adapter on blocks [a, L) that runs only those blocks per evaluation.

    The prefix (this Engine, on split.split_files' prefix GGUF, capture_block=a) embeds each batch and runs blocks
    [0, a) once; the hidden states entering block a are kept for the last batch seen, so every perturbed evaluation
    of a MeZO step on that batch runs only the suffix GGUF (blocks [a, L), norm, head), which holds the adapter under its
    renumbered block names. A batch seen a second time (the validation batches, from the second validation on)
    keeps its hidden states in memory, up to `cache_bytes`. Hidden states are only reused for the identical
    batch (llama.cpp's CPU kernels depend slightly on batch composition), so the logits are always exactly the
    full model's. Scoring and the adapter calls behave as the full model's; generation is not split.

    With `store_hidden_states(examples)` (--prefix-reuse cache) the hidden states of every given example come from a
    table computed once (edgezo.engine.hidden_states): a batch of them runs no prefix at all. Its logits are then
    the full model's up to the batch-composition jitter of llama.cpp's kernels (the table was computed in other
    batches), and always the same for the same batch.
    """

    def __init__(self, prefix_path: str | os.PathLike, suffix_path: str | os.PathLike, first_block: int,
                 config: EngineConfig = EngineConfig(), cache_bytes: int = PREFIX_CACHE_BYTES):
        super().__init__(prefix_path, config, capture_block=first_block)
        self.suffix = Engine(suffix_path, config)
        self.first_block = first_block
        self.cache_bytes = cache_bytes
        self._last: tuple[tuple, np.ndarray] | None = None  # (batch, hidden states) of the latest prefix pass
        self._seen: set[int] = set()  # hashes of batches run once: a second sighting puts them in the cache
        self._cache: dict[tuple, np.ndarray] = {}
        self._base_names: dict[str, str] = {}  # suffix adapter tensor name -> base name (set_adapter)
        self.prefix_passes = 0  # how many times blocks [0, a) ran (tests and benchmarks read it)
        self.prefix_path = prefix_path
        self.table: HiddenStateTable | None = None

    def close(self) -> None:
        if getattr(self, "suffix", None) is not None:
            self.suffix.close()
            self.suffix = None
        super().close()

    def logits(self, sequences, positions, columns=None, embeddings=None, copy: bool = True) -> np.ndarray:
        if embeddings is not None:
            raise EdgezoError("SplitEngine computes its own block inputs")
        return self.suffix.logits(sequences, positions, columns, embeddings=self._hidden(sequences), copy=copy)

    def _hidden(self, sequences) -> np.ndarray:
        key = tuple(tuple(s) for s in sequences)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        hidden = self._cache.get(key)
        if hidden is None and self.table is not None:
            rows = [self.table.get(s) for s in sequences]
            hidden = np.concatenate(rows) if all(r is not None for r in rows) else None
        if hidden is None:
            hidden = self.block_inputs(sequences)
            self.prefix_passes += 1
            if hash(key) in self._seen and hidden.nbytes <= self.cache_bytes - self.cached_bytes:
                self._cache[key] = hidden
            self._seen.add(hash(key))
        self._last = (key, hidden)
        return hidden

    def store_hidden_states(self, sequences, log=lambda msg: None, progress=lambda done, total: None,
                            directory: Path | None = None) -> int:
        """Serve the hidden states of `sequences` (every training and validation example) from a table on disk
        (in `directory`, default $EDGEZO_HOME/hidden-states), computed now unless an identical one exists; returns
        its size in bytes."""
        identity = {"prefix_sha256": cached_sha256(self.prefix_path), "first_block": self.first_block,
                    "llama_cpp": llama_cpp.__version__, "batch_size": self.config.n_seq_max,
                    "sequences": sequences_digest(sequences)}
        directory = home() / "hidden-states" if directory is None else directory
        self.table = open_table(table_path(directory, identity), sequences, self.block_inputs,
                                self.config.n_seq_max, self.n_embd, log, progress)
        return self.table.nbytes

    @property
    def cached_bytes(self) -> int:
        return sum(h.nbytes for h in self._cache.values())

    def set_adapter(self, adapter: LoraAdapter | None, in_place: bool = True) -> None:
        if adapter is not None:
            renamed = rename_for_suffix(dict(zip(adapter.tensors, adapter.tensors)), self.first_block)
            self._base_names = renamed  # suffix tensor name -> the adapter's own (base) name
            adapter = LoraAdapter(adapter.config, adapter.architecture,
                                  {new: adapter.tensors[old] for new, old in renamed.items()})
        self.suffix.set_adapter(adapter, in_place)

    def update_adapter(self, values: Mapping[str, np.ndarray]) -> None:
        self.suffix.update_adapter(_Renamed(values, self._base_names))

    def generate(self, *args, **kwargs):
        raise EdgezoError("generation runs on the whole model: open an Engine, not a SplitEngine (--prefix-reuse off)")

    generate_greedy = generate

    @contextlib.contextmanager
    def adapter_detached(self):
        with self.suffix.adapter_detached():
            yield


class _Renamed(Mapping):
    """`values` read under other names (new name -> name in `values`), lazily: perturbed values are computed on
    access."""

    def __init__(self, values: Mapping[str, np.ndarray], names: Mapping[str, str]):
        self.values, self.names = values, names

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[self.names[name]]

    def __iter__(self):
        raise TypeError("read by name only")

    def __len__(self) -> int:
        return len(self.names)
