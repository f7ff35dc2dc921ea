"""Losses and metrics on engine logits: classification over label words, and LM loss on target tokens.

Classification: the logits at the answer position (the prompt's last token), restricted to the label words'
first tokens, go through a softmax; loss = cross-entropy of the true label, prediction = argmax over the same.
LM: mean negative log-likelihood of tokens[target_start:], each predicted from the position before it.
Host-side maths is float64: the differences MeZO takes between two losses are small.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .data import Example, Task, chunks


class Scorer(Protocol):
    """What scoring needs from an engine (edgezo.engine.Engine): logits at chosen positions of many sequences."""

    def logits(self, sequences, positions, columns=None) -> np.ndarray: ...


@dataclass
class Totals:
    """Sums over examples, so batches combine exactly."""

    loss_sum: float = 0.0
    n_targets: int = 0  # examples (classification) or target tokens (LM)
    n_correct: int = 0
    n_examples: int = 0

    def add(self, other: "Totals") -> None:
        self.loss_sum += other.loss_sum
        self.n_targets += other.n_targets
        self.n_correct += other.n_correct
        self.n_examples += other.n_examples

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_targets, 1)

    @property
    def accuracy(self) -> float:
        return self.n_correct / max(self.n_targets, 1)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score(engine: Scorer, batch: Sequence[Example], task: Task) -> Totals:
    """Loss sum and correct count of one batch, in one engine evaluation."""
    sequences = [ex.tokens for ex in batch]
    if task.is_classification:
        logits = engine.logits(sequences, [[len(ex.tokens) - 1] for ex in batch], columns=task.label_token_ids)
        logp = log_softmax(logits)  # [B, n_labels]
        labels = np.array([ex.label for ex in batch])
        nll = -logp[np.arange(len(batch)), labels]
        correct = int((logp.argmax(axis=1) == labels).sum())
        return Totals(float(nll.sum()), len(batch), correct, len(batch))
    positions = [[i - 1 for i in ex.target_indices] for ex in batch]
    targets = np.concatenate([np.asarray([ex.tokens[i] for i in ex.target_indices]) for ex in batch])
    logp = log_softmax(engine.logits(sequences, positions))  # [n_targets, n_vocab]
    nll = -logp[np.arange(len(targets)), targets]
    correct = int((logp.argmax(axis=1) == targets).sum())
    return Totals(float(nll.sum()), len(targets), correct, len(batch))


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
