"""Prefix reuse: the suffix GGUF, llama.cpp's micro-batch order, and split logits equal to the full model's."""

import json

import gguf
import numpy as np
import pytest
from tests.tiny_model import TinyLlama, write_tiny_llama

from edgezo import split, store
from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info
from edgezo.cli import main
from edgezo.engine import Engine, EngineConfig, SplitEngine
from edgezo.files import EdgezoError
from edgezo.formats import read_header
from edgezo.mezo import MezoConfig, zo_step
from edgezo.objective import loss_function

TEXTS = ["a good movie indeed", "Label: bad", "xyz and more text here to make it long", "q"]


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "tiny4.gguf"
    write_tiny_llama(path, TinyLlama(n_layers=4))
    return path


def trained_adapter(path, first_block, seed=1):
    adapter = LoraAdapter.init(read_base_model_info(path), LoraConfig(rank=4, alpha=8.0, targets=("attn_q", "attn_v"),
                                                                       layers=(first_block, None)), seed=seed)
    rng = np.random.default_rng(seed)
    for v in adapter.tensors.values():
        v[...] = rng.standard_normal(v.shape).astype(np.float32) * 0.3
    return adapter


def test_ubatch_layout_covers_every_token_once_in_llama_cpp_order():
    assert split.ubatch_layout([3, 5], 4, n_streams=1) == [
        [split.Chunk(0, 0, 3), split.Chunk(1, 0, 1)], [split.Chunk(1, 1, 4)]]
    # one stream per sequence: equal shares of the run of sequences with tokens left, sequence after sequence
    assert split.ubatch_layout([2, 5, 5], 6, n_streams=3) == [
        [split.Chunk(0, 0, 2), split.Chunk(1, 0, 2), split.Chunk(2, 0, 2)],
        [split.Chunk(1, 2, 3), split.Chunk(2, 2, 3)]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = list(rng.integers(1, 40, size=rng.integers(1, 9)))
        n_ubatch = int(rng.integers(len(lengths), 64))
        layout = split.ubatch_layout(lengths, n_ubatch, n_streams=len(lengths))
        seen = sorted((c.seq, c.start + i) for ub in layout for c in ub for i in range(c.count))
        assert seen == [(s, p) for s, n in enumerate(lengths) for p in range(n)]
        assert all(sum(c.count for c in ub) <= n_ubatch for ub in layout)


def test_split_files_hold_their_blocks_renumbered(tiny4):
    prefix, suffix = split.split_files(tiny4, 3, 4)
    head, tail = read_header(prefix), read_header(suffix)
    assert head.metadata["llama.block_count"] == 4 and head.metadata[split.SPLIT_KEY] == 0  # blocks 0..3: one past
    assert tail.metadata["llama.block_count"] == 1 and tail.metadata[split.SPLIT_KEY] == 3
    assert "blk.0.attn_q.weight" in tail.tensor_dims and not any(n.startswith("blk.1.") for n in tail.tensor_dims)
    assert "token_embd.weight" in tail.tensor_dims and "output_norm.weight" in tail.tensor_dims  # tied head
    np.testing.assert_array_equal(*(gguf.GGUFReader(p).get_tensor(i).data for p, i in ((tiny4, 0), (prefix, 0))))
    with pytest.raises(EdgezoError, match="cannot split a 4-block model at block 4"):
        split.split_files(tiny4, 4, 4)
    with pytest.raises(EdgezoError, match="outside the part"):
        split.rename_for_suffix({"blk.1.attn_q.weight.lora_a": None}, 2)


def test_a_changed_or_unfinished_part_is_never_used(tiny4):
    prefix, suffix = split.split_files(tiny4, 2, 4)
    data = bytearray(suffix.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    suffix.write_bytes(bytes(data))
    with pytest.raises(EdgezoError, match="changed since edgezo wrote it"):
        split.split_files(tiny4, 2, 4)
    split.write_part_gguf(tiny4, range(1, 4), suffix)  # as if written for a split at block 1 ...
    suffix.with_name(suffix.name + ".sha256").write_text(store.cached_sha256(suffix))  # ... with its digest
    with pytest.raises(EdgezoError, match="records blocks from 1, not 2"):
        split.split_files(tiny4, 2, 4)
    suffix.with_name(suffix.name + ".sha256").unlink()  # interrupted after the part, before its digest: rewritten
    split.split_files(tiny4, 2, 4)
    assert read_header(suffix).metadata[split.SPLIT_KEY] == 2


def test_resume_through_the_split_engine_is_bit_exact(tiny4, sentiment_dir, tmp_path, capsys):
    common = ["--model", str(tiny4), "--data", str(sentiment_dir), "--eval-every", "0", "--num-layers", "2",
              "--batch-size", "4", "--threads", "1", "--save-every", "2", "--json"]
    assert main(["finetune", *common, "--steps", "4", "--out", str(tmp_path / "straight")]) == 0
    assert main(["finetune", *common, "--steps", "2", "--out", str(tmp_path / "resumed")]) == 0
    assert main(["finetune", *common, "--steps", "4", "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    capsys.readouterr()
    assert (tmp_path / "straight" / "adapter.gguf").read_bytes() == (tmp_path / "resumed" / "adapter.gguf").read_bytes()


@pytest.mark.parametrize("n_seq_max,n_ubatch", [(4, 1024), (4, 16), (4, 7), (1, 16)])
def test_split_logits_equal_the_full_model_bit_for_bit(tiny4, tmp_path, n_seq_max, n_ubatch):
    config = EngineConfig(n_seq_max=n_seq_max, n_ctx_per_seq=256, n_threads=1, n_ubatch=n_ubatch)
    adapter = trained_adapter(tiny4, 2)
    with Engine(tiny4, config) as full, SplitEngine(*split.split_files(tiny4, 2, 4), 2, config) as parts:
        full.set_adapter(adapter)
        parts.set_adapter(adapter)
        seqs = [full.tokenize(t, add_special=True) for t in TEXTS[:n_seq_max]]
        every = [list(range(len(s))) for s in seqs]
        np.testing.assert_array_equal(parts.logits(seqs, every), full.logits(seqs, every))
        before = full.logits(seqs, every)
        moved = {k: v * 1.5 for k, v in adapter.tensors.items()}
        full.update_adapter(moved)
        parts.update_adapter(moved)
        after = full.logits(seqs, every)
        assert not np.array_equal(after, before)  # the update reaches the suffix blocks
        np.testing.assert_array_equal(parts.logits(seqs, every), after)
        assert parts.prefix_passes == 1  # the adapter changed, the blocks below it did not run again
        with full.adapter_detached(), parts.adapter_detached():
            np.testing.assert_array_equal(parts.logits(seqs, every), full.logits(seqs, every))


def test_a_repeated_batch_is_cached_and_scores_the_same(tiny4, tmp_path):
    config = EngineConfig(n_seq_max=4, n_ctx_per_seq=256, n_threads=1)
    files = split.split_files(tiny4, 1, 4)
    with SplitEngine(*files, 1, config) as parts:
        seqs = [parts.tokenize(t, add_special=True) for t in TEXTS]
        a, b = seqs[:2], seqs[2:]
        first = [parts.logits(batch, [[len(s) - 1] for s in batch]) for batch in (a, b)]
        again = [parts.logits(batch, [[len(s) - 1] for s in batch]) for batch in (a, b, a, b)]
        assert parts.prefix_passes == 4 and parts.cached_bytes > 0  # run, run, run + cache, run + cache, hit, hit
        for x, y in zip(first * 2, again):
            np.testing.assert_array_equal(x, y)
    with SplitEngine(*files, 1, config, cache_bytes=0) as parts:
        for batch in (a, b, a, b, a):
            parts.logits(batch, [[len(s) - 1] for s in batch])
        assert parts.prefix_passes == 5 and parts.cached_bytes == 0


def test_mezo_and_fzoo_steps_are_identical_through_the_split_engine(tiny4, tmp_path, sentiment_dir):
    from edgezo.data import build_examples, build_task, read_jsonl

    config = EngineConfig(n_seq_max=4, n_ctx_per_seq=256, n_threads=1)
    records = []
    for engine in (Engine(tiny4, config), SplitEngine(*split.split_files(tiny4, 3, 4), 3, config)):
        with engine:
            rows = read_jsonl(sentiment_dir / "train.jsonl")
            task = build_task(rows, sentiment_dir / "train.jsonl", engine, None, None)
            batch = build_examples(rows, sentiment_dir / "train.jsonl", task, engine, 256)[:4]
            adapter = LoraAdapter.init(read_base_model_info(tiny4), LoraConfig(rank=4, layers=(3, None)), seed=0)
            engine.set_adapter(adapter)
            loss = loss_function(engine, batch, task)
            for estimator in ("mezo", "fzoo"):
                mezo = MezoConfig(learning_rate=1e-2, eps=1e-2, estimator=estimator, n_directions=3)
                records.append(zo_step(adapter.tensors, loss, mezo, 0, 0, 10))
    assert records[:2] == records[2:]


def test_finetune_with_prefix_reuse_logs_the_same_run(tiny4, sentiment_dir, tmp_path, capsys):
    runs = {}
    for mode in ("auto", "off"):
        out = tmp_path / mode
        assert main(["finetune", "--model", str(tiny4), "--data", str(sentiment_dir), "--steps", "4", "--eval-every", "2",
                     "--num-layers", "2", "--batch-size", "4", "--threads", "1", "--prefix-reuse", mode,
                     "--out", str(out), "--json"]) == 0
        err = capsys.readouterr().err
        assert ("prefix reuse: blocks 0-1 run once per batch" in err) == (mode == "auto")
        runs[mode] = [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "train_seconds", "rss_bytes")}
                      for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert runs["auto"] == runs["off"] and len(runs["auto"]) == 4 + 3


@pytest.mark.real_model
@pytest.mark.parametrize("model,quant,first_block", [("smollm2-135m", "q4_0", 24), ("gemma3-270m", None, 13)])
def test_real_models_split_logits_equal_the_full_model(model, quant, first_block):
    """Gemma 3 at block 13: the suffix's sliding-window blocks must follow the base's numbering (13 % 6 != 0), and
    the local and global blocks use different RoPE bases, so a wrong pattern changes the logits (by 0.5 here)."""
    base = store.resolve_model(model, quant)
    config = EngineConfig(n_seq_max=8, n_ctx_per_seq=256, n_threads=2)
    adapter = LoraAdapter.init(read_base_model_info(base), LoraConfig(layers=(first_block, None)), seed=1)
    for v in adapter.tensors.values():
        v[...] = np.random.default_rng(0).standard_normal(v.shape).astype(np.float32) * 0.05
    rows = [json.loads(line) for line in (store.fetch("movie-reviews") / "valid.jsonl").read_text().splitlines()[:8]]
    n_layers = read_base_model_info(base).n_layers
    with Engine(base, config) as full, SplitEngine(*split.split_files(base, first_block, n_layers), first_block,
                                                   config) as parts:
        full.set_adapter(adapter)
        parts.set_adapter(adapter)
        seqs = [full.tokenize(f"Review: {r['text']}\nSentiment:", add_special=True) for r in rows]
        last = [[len(s) - 1] for s in seqs]
        np.testing.assert_array_equal(parts.logits(seqs, last), full.logits(seqs, last))


def test_prefix_reuse_turns_itself_off_where_it_would_exceed_the_memory_budget(tiny4, sentiment_dir, tmp_path, capsys):
    common = ["--model", str(tiny4), "--data", str(sentiment_dir), "--num-layers", "2", "--batch-size", "4",
              "--steps", "2", "--json"]
    predicted = {}
    for mode in ("auto", "off"):
        assert main(["memory", *common, "--prefix-reuse", mode]) == 0
        predicted[mode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predicted_bytes"]
    assert predicted["auto"] > predicted["off"]
    budget = (predicted["auto"] + predicted["off"]) // 2
    # in this pytest process the measured RSS may exceed a budget sized for a fresh one (exit 130 with a
    # checkpoint); the decision under test is taken before the engine opens
    assert main(["finetune", *common, "--eval-every", "0", "--threads", "1", "--max-memory", str(budget),
                 "--out", str(tmp_path / "run")]) in (0, 130)
    err = capsys.readouterr().err
    assert "prefix reuse off: with it the predicted peak RSS" in err and "prefix reuse: blocks" not in err
