"""The sequence lengths of a run, which set the batch-dependent terms of both accountants."""

from __future__ import annotations

from dataclasses import dataclass

from ..split import ubatch_layout
from .llama_terms import DEFAULT_N_UBATCH


@dataclass(frozen=True)
class RunBatches:
    """What a run's data decides: the torch reference pads each training batch to its longest sequence (the largest
    such batch sets the BP peak), llama.cpp decodes the tokens of a batch without padding (the fullest batch sets its
    compute buffer, the batch with most scored positions its output buffer, the micro-batch with most scored
    positions the compute buffer's logits), and the token ids read decide how much of a mapped embedding table
    becomes resident. Validation batches run without gradients, so only llama.cpp's buffers count them."""

    padded_len: int  # longest sequence of any training batch
    max_batch_tokens: int  # most tokens in one batch, training or validation
    token_ids: frozenset[int]  # every token id the run reads
    max_batch_outputs: int = 0  # most positions with logits in one batch (one decode)
    max_ubatch_outputs: int = 0  # most positions with logits in one llama.cpp micro-batch of such a decode


def decode_outputs(lengths: list[int], outputs: list[list[int]], n_ubatch: int, n_streams: int) -> tuple[int, int]:
    """(positions with logits in a decode of these sequences, most of them in one micro-batch), the micro-batches cut
    as llama.cpp cuts them (split.ubatch_layout)."""
    most = 0
    for ubatch in ubatch_layout(lengths, n_ubatch, n_streams):
        most = max(most, sum(sum(c.start <= p < c.start + c.count for p in outputs[c.seq]) for c in ubatch))
    return sum(map(len, outputs)), most


def run_batches(train: list[tuple[int, ...]], batch_size: int, seed: int, steps: int,
                evaluated: list[tuple[int, ...]] = (), train_outputs: list[list[int]] | None = None,
                evaluated_outputs: list[list[int]] | None = None, n_ubatch: int = DEFAULT_N_UBATCH) -> RunBatches:
    """The batches `steps` training steps draw from the token sequences `train` (edgezo.data.batch_indices, the
    order both trainers use) and the validation batches of `evaluated` (consecutive chunks of batch_size).

    *_outputs: the positions each sequence is scored at (objective.output_positions), parallel to the sequences;
    None: the last position only (classification). n_ubatch: the engine's micro-batch (EngineConfig.n_ubatch)."""
    from ..data import batch_indices

    def last(seqs):
        return [[len(s) - 1] for s in seqs]

    train_outputs = last(train) if train_outputs is None else train_outputs
    evaluated_outputs = last(evaluated) if evaluated_outputs is None else evaluated_outputs
    padded, most, ids, outs, ubatch_outs = 0, 0, set(), 0, 0

    def decode(seqs, outputs):
        nonlocal most, outs, ubatch_outs
        lengths = list(map(len, seqs))
        most = max(most, sum(lengths))
        # the engine's context has n_seq_max = batch_size streams and micro-batches of min(n_ubatch, n_ctx) tokens;
        # n_ctx holds every sequence whole, so n_ubatch alone cuts the same micro-batches
        n, per_ubatch = decode_outputs(lengths, outputs, n_ubatch, batch_size)
        outs, ubatch_outs = max(outs, n), max(ubatch_outs, per_ubatch)
        ids.update(t for seq in seqs for t in seq)

    for step in range(steps if train else 0):
        indices = batch_indices(len(train), batch_size, seed, step)
        batch = [train[i] for i in indices]
        padded = max(padded, max(map(len, batch)))
        decode(batch, [train_outputs[i] for i in indices])
    for i in range(0, len(evaluated), batch_size):
        decode(evaluated[i : i + batch_size], evaluated_outputs[i : i + batch_size])
    return RunBatches(padded_len=padded or max(map(len, evaluated), default=1), max_batch_tokens=max(most, 1),
                      token_ids=frozenset(ids), max_batch_outputs=outs, max_ubatch_outputs=ubatch_outs)
