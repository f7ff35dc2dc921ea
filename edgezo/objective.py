"""Losses and metrics on engine logits: classification over label words, and LM loss on target tokens.

Classification: the logits at the answer position (the prompt's last token), restricted to the label words'
first tokens, go through a softmax; loss = cross-entropy of the true label, prediction = argmax over the same.
LM: mean negative log-likelihood of tokens[target_start:], each predicted from the position before it.
Host-side maths is float64: the differences MeZO takes between two losses are small. The LM loss reads the logits
in place (llama.cpp's own output buffer) and goes through them LOGSUMEXP_CHUNK_BYTES of float64 at a time, keeping
only each target's log-probability and whether it is the argmax: a batch of 16 x 111 targets over SmolLM2's
49,152-token vocabulary would otherwise hold 333 MiB of float32 logits copied out plus several 666 MiB float64
temporaries.
"""

from __future__ import annotations

import math

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .data import Example, Task, chunks


# float64 working rows of the LM loss: 8 MiB is 21 rows of SmolLM2's vocabulary (4 of Gemma 3's), small next to
# the logits themselves yet long enough that numpy's per-call overhead stays negligible.
LOGSUMEXP_CHUNK_BYTES = 8 * 2**20
F64_BYTES = 8


class Scorer(Protocol):
    """What scoring needs from an engine (edgezo.engine.Engine): logits at chosen positions of many sequences.

    copy=False may return a read-only view that is valid only until the scorer's next call."""

    def logits(self, sequences, positions, columns=None, copy: bool = True) -> np.ndarray: ...


@dataclass
class Totals:
    """Sums over examples, so batches combine exactly."""

    loss_sum: float = 0.0
    n_targets: int = 0  # examples (classification) or target tokens (LM)
    n_correct: int = 0
    n_examples: int = 0
    loss_sq_sum: float = 0.0  # of the per-target losses, for the loss's standard error

    def add(self, other: "Totals") -> None:
        self.loss_sum += other.loss_sum
        self.loss_sq_sum += other.loss_sq_sum
        self.n_targets += other.n_targets
        self.n_correct += other.n_correct
        self.n_examples += other.n_examples

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_targets, 1)

    @property
    def loss_se(self) -> float:
        """The standard error of the mean loss (0 where the squares were not summed, or for one target)."""
        n = self.n_targets
        if n < 2 or not self.loss_sq_sum:
            return 0.0
        return math.sqrt(max(0.0, self.loss_sq_sum / n - self.loss**2) / (n - 1))

    @property
    def accuracy(self) -> float:
        return self.n_correct / max(self.n_targets, 1)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def chunk_rows(n_vocab: int) -> int:
    """Rows of the LM loss's float64 working buffer (at least one)."""
    return max(1, LOGSUMEXP_CHUNK_BYTES // (n_vocab * F64_BYTES))


def target_log_probs(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log_softmax(logits)[i, targets[i]] as float64, whether targets[i] is the row's argmax) for every row i.

    The same float64 operations in the same order as log_softmax (max, subtract, exp, sum, log), row by row in
    chunks of chunk_rows(n_vocab) through one reused buffer: the result equals log_softmax's bit for bit here
    (tested within 1e-12), and nothing of [n_rows, n_vocab] is allocated. The argmax is taken on the float32 row:
    log-probabilities are the row shifted by one constant, so the index is log_softmax's (tested on ties-free rows).
    """
    n_rows, n_vocab = logits.shape
    step = chunk_rows(n_vocab)
    buf = np.empty((min(step, n_rows), n_vocab), dtype=np.float64)  # [chunk, n_vocab]
    logp = np.empty(n_rows, dtype=np.float64)
    is_argmax = np.empty(n_rows, dtype=bool)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        x, t = buf[: rows.stop - start], targets[rows]
        x[...] = logits[rows]  # float32 -> float64, exact
        x -= x.max(axis=1, keepdims=True)
        picked = x[np.arange(len(t)), t]  # shifted target logits (a copy, before exp overwrites x)
        np.exp(x, out=x)
        logp[rows] = picked - np.log(x.sum(axis=1))
        is_argmax[rows] = logits[rows].argmax(axis=1) == t
    return logp, is_argmax


def output_positions(example: Example, task: Task) -> list[int]:
    """The positions `score` asks the engine for logits at: the answer position, or the one before each target."""
    if task.is_classification:
        return [len(example.tokens) - 1]
    return [i - 1 for i in example.target_indices]


def score(engine: Scorer, batch: Sequence[Example], task: Task) -> Totals:
    """Loss sum and correct count of one batch, in one engine evaluation."""
    sequences = [ex.tokens for ex in batch]
    positions = [output_positions(ex, task) for ex in batch]
    if task.is_classification:
        logits = engine.logits(sequences, positions, columns=task.label_token_ids)
        logp = log_softmax(logits)  # [B, n_labels]
        labels = np.array([ex.label for ex in batch])
        nll = -logp[np.arange(len(batch)), labels]
        correct = int((logp.argmax(axis=1) == labels).sum())
        return Totals(float(nll.sum()), len(batch), correct, len(batch), float(np.square(nll).sum()))
    targets = np.concatenate([np.asarray([ex.tokens[i] for i in ex.target_indices]) for ex in batch])
    # a view of the engine's buffer, float32 [n_targets, n_vocab]: read here, before the engine decodes again
    logp, is_argmax = target_log_probs(engine.logits(sequences, positions, copy=False), targets)
    nll = -logp
    return Totals(float(nll.sum()), len(targets), int(is_argmax.sum()), len(batch), float(np.square(nll).sum()))


def evaluate(engine: Scorer, examples: Sequence[Example], task: Task, batch_size: int,
             on_batch: Callable[[int], None] | None = None) -> Totals:
    totals = Totals()
    for batch in chunks(examples, batch_size):
        totals.add(score(engine, batch, task))
        if on_batch:
            on_batch(len(batch))
    return totals


def loss_function(engine, batch: Sequence[Example], task: Task) -> Callable[[Mapping[str, np.ndarray]], float]:
    """The MeZO objective for one step: put `params` into the engine's adapter, return the mean loss on `batch`.

    Both perturbations of a step see the identical batch (CPU flash attention depends on batch composition).
    """

    def loss(params: Mapping[str, np.ndarray]) -> float:
        engine.update_adapter(params)
        return score(engine, batch, task).loss

    return loss
