"""Run only the blocks that train: a base GGUF cut at block `a` into a frozen prefix and a trained suffix.

When LoRA sits on blocks [a, L) only, the hidden state entering block a is the same for every perturbation of a
MeZO step. The engine computes it once per batch on a *prefix* GGUF (stopping llama.cpp's graph at block a's
input) and then runs each perturbed evaluation on a *suffix* GGUF: blocks [a, L) renumbered from 0, the output norm and
head, fed the hidden states as input embeddings. Same kernels on the same inputs, so the logits are the full
model's, bit for bit (tests/test_split.py).

The base itself is not loaded: the prefix holds blocks [0, a] (so llama.cpp maps, repacks and keeps KV cells for
those only). This module writes both parts (gguf-py, the quantized blocks copied byte for byte) and mirrors
the one llama.cpp rule the split path depends on: the order in which a decode's tokens reach the compute graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import EdgezoError, atomic_path, cached_sha256, home
from .formats import copy_gguf_fields, gguf_field, open_gguf, read_header

# Architectures whose graph was read for the embedding-input path (llama.cpp's build_inp_embd and the model's
# builder) and whose split logits are tested equal to the full model's: llama (SmolLM2), qwen2, gemma3. Gemma 3
# scales token embeddings by sqrt(n_embd) only for token input, and its sliding-window layers follow the block
# index, so the suffix gets the explicit per-block pattern of the blocks it holds.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
# llama.cpp's default sliding-window period for Gemma 3 (llama_model_gemma3::load_arch_hparams: pattern 6).
GEMMA3_SWA_PERIOD = 6
# Hidden states of repeated batches kept by SplitEngine: 500 movie reviews at block 24 of SmolLM2 take ~45 MB.
PREFIX_CACHE_BYTES = 256 * 2**20
SPLIT_KEY = "edgezo.split.first_block"  # in each part: the base block its block 0 was; checked on every use


@dataclass(frozen=True)
class Chunk:
    """`count` tokens of sequence `seq` from position `start`, contiguous in one micro-batch."""

    seq: int
    start: int
    count: int


def ubatch_layout(lengths: list[int], n_ubatch: int, n_streams: int) -> list[list[Chunk]]:
    """The micro-batches llama.cpp cuts a decode of sequences 0..n-1 (tokens laid out sequence after sequence) into,
    each as the chunks in the order its tokens reach the graph.

    Mirrors llama_kv_cache::init_batch in the pinned llama.cpp: with one stream, split_simple (n_ubatch tokens in
    batch order); with one stream per sequence (kv_unified off), split_equal(sequential): the run of consecutive
    sequences starting at the first with tokens left, the same number of tokens from each (as many as the
    shortest has left, at most n_ubatch // n_sequences), concatenated sequence by sequence. The engine checks the
    token counts it sees against this layout on every decode, so a changed rule is an error, never a wrong order.
    """
    if n_streams == 1:
        flat = [Chunk(s, 0, n) for s, n in enumerate(lengths)]
        out, current, room = [], [], n_ubatch
        for chunk in flat:
            start = 0
            while start < chunk.count:
                take = min(room, chunk.count - start)
                current.append(Chunk(chunk.seq, start, take))
                start += take
                room -= take
                if room == 0:
                    out.append(current)
                    current, room = [], n_ubatch
        return out + ([current] if current else [])
    done = [0] * len(lengths)
    out = []
    while True:
        left = [n - d for n, d in zip(lengths, done)]
        first = next((s for s, n in enumerate(left) if n > 0), None)
        if first is None:
            return out
        run = first
        while run + 1 < len(lengths) and left[run + 1] > 0:
            run += 1
        seqs = range(first, run + 1)
        per_seq = min(min(left[s] for s in seqs), max(1, n_ubatch // len(seqs)))
        out.append([Chunk(s, done[s], per_seq) for s in seqs])
        for s in seqs:
            done[s] += per_seq


def _swa_pattern(reader, arch: str, n_layers: int) -> list[bool] | None:
    """Which blocks of the base use sliding-window attention (None: the model has no sliding window)."""
    if arch != "gemma3" or not gguf_field(reader, f"{arch}.attention.sliding_window"):
        return None
    pattern = gguf_field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return [bool(v) for v in pattern]
    period = int(pattern) if pattern is not None else GEMMA3_SWA_PERIOD
    return [period == 0 or il % period < period - 1 for il in range(n_layers)]  # llama_hparams::set_swa_pattern


def split_point(architecture: str, n_layers: int, lora) -> int:
    """Where prefix reuse splits a model for an adapter config (edgezo.adapter.LoraConfig): its first block, when
    its blocks run to the top and the architecture is supported; 0 when there is nothing to split off."""
    blocks = lora.blocks(n_layers)
    if architecture not in SUPPORTED_ARCHITECTURES or blocks.step != 1 or blocks.stop != n_layers:
        return 0
    return blocks.start


def write_part_gguf(base: str | os.PathLike, blocks: range, out: str | os.PathLike, with_head: bool = True) -> Path:
    """Write `blocks` of `base` as blocks 0.. of a model of the same architecture, atomically, with its token
    embeddings (llama.cpp requires them; tied heads use them), the output norm and, `with_head`, the output matrix
    (without it llama.cpp falls back to the token embeddings). Quantized tensors are copied byte for byte."""
    from gguf import GGUFWriter

    base, out = Path(base), Path(out)
    reader = open_gguf(base)
    arch = gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise EdgezoError(f"{base.name}: running only the trained blocks is checked for {', '.join(SUPPORTED_ARCHITECTURES)} "
                          f"models, this one is {arch!r}; train with --prefix-reuse off")
    n_layers = int(gguf_field(reader, f"{arch}.block_count"))
    if not (0 <= blocks.start < blocks.stop <= n_layers and blocks.step == 1):
        raise EdgezoError(f"cannot cut blocks {blocks.start}..{blocks.stop - 1} out of a {n_layers}-block model")
    swa = _swa_pattern(reader, arch, n_layers)
    with atomic_path(out) as tmp:
        def own_blocks(name, value):  # per-block hyperparameters (head counts, ...) follow their blocks
            per_block = name.startswith(f"{arch}.") and isinstance(value, list) and len(value) == n_layers
            return value[blocks.start : blocks.stop] if per_block else value

        writer = GGUFWriter(tmp, arch)
        copy_gguf_fields(reader, writer, skip={f"{arch}.block_count", f"{arch}.attention.sliding_window_pattern"},
                         transform=own_blocks)
        writer.add_block_count(len(blocks))
        if swa is not None:
            writer.add_array(f"{arch}.attention.sliding_window_pattern", swa[blocks.start : blocks.stop])
        writer.add_uint32(SPLIT_KEY, blocks.start)
        kept = []
        for t in reader.tensors:
            name = part_name(t.name, blocks, with_head)
            if name is not None:
                shape = tuple(int(d) for d in reversed(t.shape))
                writer.add_tensor_info(name, shape, np.dtype(np.float32), int(t.n_bytes), raw_dtype=t.tensor_type)
                kept.append(t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in kept:
            writer.write_tensor_data(t.data)
        writer.close()
    return out


def part_name(name: str, blocks: range, with_head: bool = True) -> str | None:
    """A base tensor's name in the part holding `blocks` (renumbered from 0), None if it is not in that part
    (another block's, or the output matrix of a part without the head)."""
    if not name.startswith("blk."):
        return name if with_head or not name.startswith("output.") else None
    block, rest = name[4:].split(".", 1)
    return f"blk.{int(block) - blocks.start}.{rest}" if int(block) in blocks else None


def rename_for_suffix(tensors: dict, first_block: int) -> dict:
    """Adapter tensors keyed by their names in the suffix file (every tensor must sit on a suffix block)."""
    renamed = {}
    for name, value in tensors.items():
        new = part_name(name, range(first_block, 1 << 30))
        if new is None:
            raise EdgezoError(f"{name} lies before block {first_block}, outside the part of the model that runs per evaluation")
        renamed[new] = value
    return renamed


def split_files(base: str | os.PathLike, first_block: int, n_layers: int, log=lambda msg: None) -> tuple[Path, Path]:
    """(prefix, suffix) GGUF files of `base` split at `first_block`, cached, written on first use:
      prefix: blocks [0, first_block] and no output matrix. It holds one block past the split because llama.cpp
              drops the rows of tokens without outputs inside the last block, and the captured node (block
              first_block's input) must keep every row; that block is never computed.
      suffix: blocks [first_block, L), the output norm and head.
    Keyed by the base's sha256, so a changed base never meets old parts; the recorded split point is checked."""

    if not 0 < first_block < n_layers:
        raise EdgezoError(f"cannot split a {n_layers}-block model at block {first_block}")
    stem = home() / "split" / cached_sha256(base)[:16]
    parts = ((Path(f"{stem}-prefix-blk{first_block}.gguf"), range(0, first_block + 1), False, 0),
             (Path(f"{stem}-suffix-blk{first_block}.gguf"), range(first_block, n_layers), True, first_block))
    for path, blocks, with_head, recorded_start in parts:
        digest = path.with_name(path.name + ".sha256")  # written after the part: a part without it is unfinished
        if not (path.exists() and digest.exists()):
            log(f"writing blocks {blocks.start}-{blocks.stop - 1} of {Path(base).name} to {path} (once)")
            write_part_gguf(base, blocks, path, with_head)
            with atomic_path(digest) as tmp:
                tmp.write_text(cached_sha256(path) + "\n")
        if cached_sha256(path) != digest.read_text().strip():
            raise EdgezoError(f"{path} changed since edgezo wrote it (sha256 differs): delete it and rerun")
        recorded = read_header(path).metadata.get(SPLIT_KEY)
        if recorded != recorded_start:
            raise EdgezoError(f"{path} records blocks from {recorded}, not {recorded_start}: delete it and rerun")
    return parts[0][0], parts[1][0]
