"""--prefix-reuse cache (issue 32, part 6): every example's hidden states below the adapter computed once, memory-mapped,
checked, and the same run whether the table was kept or rebuilt."""

import json

import numpy as np
import pytest
from tests.tiny_model import TinyLlama, write_tiny_llama

from edgezo import split
from edgezo.cli import main
from edgezo.engine import Engine, EngineConfig, SplitEngine
from edgezo.engine.hidden_states import HiddenStateTable, build_table, open_table
from edgezo.files import EdgezoError, home

TEXTS = ["a good movie indeed", "Label: bad", "xyz and more text here to make it long", "q", "a fine one"]
CONFIG = EngineConfig(n_seq_max=2, n_ctx_per_seq=256, n_threads=1)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    path = tmp_path_factory.mktemp("hidden") / "tiny4.gguf"
    write_tiny_llama(path, TinyLlama(n_layers=4))
    return path


def fake_block_inputs(batch):  # rows that name their sequence and position, so misplaced rows show
    return np.concatenate([np.stack([np.full(3, 100 * sum(s) + i, np.float32) for i in range(len(s))])
                           for s in batch])


def test_a_table_returns_each_examples_rows_and_refuses_changed_bytes(tmp_path):
    seqs = [[1, 2, 3], [4, 5], [1, 2, 3], [6]]  # a repeated example is stored once
    table = build_table(tmp_path / "t.f32", seqs, fake_block_inputs, 2, 3)
    assert table.rows.shape == (6, 3) and table.get([9, 9]) is None
    for s in seqs:
        np.testing.assert_array_equal(table.get(s), fake_block_inputs([s]))
    data = bytearray((tmp_path / "t.f32").read_bytes())
    data[-1] ^= 0x01
    (tmp_path / "t.f32").write_bytes(bytes(data))
    with pytest.raises(EdgezoError, match="changed since they were written"):
        HiddenStateTable(tmp_path / "t.f32")
    logged = []
    table = open_table(tmp_path / "t.f32", seqs, fake_block_inputs, 2, 3, log=logged.append)
    assert any("rebuilding" in line for line in logged)
    np.testing.assert_array_equal(table.get([6]), fake_block_inputs([[6]]))
    (tmp_path / "t.f32").write_bytes(bytes(data[:-4]))  # truncated
    with pytest.raises(EdgezoError, match="its index says"):
        HiddenStateTable(tmp_path / "t.f32")


def test_the_split_engine_serves_stored_examples_without_the_prefix(tiny4, tmp_path):
    with Engine(tiny4, CONFIG) as full, SplitEngine(*split.split_files(tiny4, 2, 4), 2, CONFIG) as parts:
        seqs = [full.tokenize(t, add_special=True) for t in TEXTS]
        nbytes = parts.store_hidden_states(seqs, directory=tmp_path / "tables")
        assert nbytes == sum(len(s) for s in seqs) * parts.n_embd * 4
        assert parts.table.path.parent == tmp_path / "tables" and not (home() / "hidden-states").exists()
        assert parts.prefix_passes == 0  # the table is built by block_inputs, outside the counted passes
        for batch in ([seqs[0], seqs[3]], [seqs[4], seqs[1]]):  # compositions other than the table's
            last = [[len(s) - 1] for s in batch]
            np.testing.assert_allclose(parts.logits(batch, last), full.logits(batch, last), rtol=1e-4, atol=1e-4)
        assert parts.prefix_passes == 0
        unseen = [full.tokenize("never stored", add_special=True)]
        parts.logits(unseen, [[len(unseen[0]) - 1]])
        assert parts.prefix_passes == 1  # a sequence outside the table runs the prefix


def test_finetune_with_the_table_resumes_bit_exactly_and_rebuilds_it_identically(tiny4, sentiment_dir, tmp_path,
                                                                                 capsys):
    common = ["--model", str(tiny4), "--data", str(sentiment_dir), "--eval-every", "2", "--num-layers", "2",
              "--batch-size", "4", "--threads", "1", "--save-every", "2", "--prefix-reuse", "cache", "--json"]
    assert main(["finetune", *common, "--steps", "4", "--out", str(tmp_path / "straight")]) == 0
    err = capsys.readouterr().err
    assert "computing the hidden states entering the trained blocks once, for 80 examples" in err
    assert "blocks 0-1 run once per example, stored before the first step" in err and "once per batch" not in err
    tables = sorted((home() / "hidden-states").glob("*.f32"))
    assert len(tables) == 1
    first_bytes = tables[0].read_bytes()
    for path in tables + [tables[0].with_suffix(".json")]:
        path.unlink()  # rebuilt by the next run: the same bits
    assert main(["finetune", *common, "--steps", "2", "--out", str(tmp_path / "resumed")]) == 0
    assert tables[0].read_bytes() == first_bytes
    capsys.readouterr()
    assert main(["finetune", *common, "--steps", "4", "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    assert "computing the hidden states" not in capsys.readouterr().err  # the table is reused
    assert (tmp_path / "straight" / "adapter.gguf").read_bytes() == (tmp_path / "resumed" / "adapter.gguf").read_bytes()
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["hidden_state_table"] is True
    # the same run with the prefix computed per batch is another run: its resume refuses the table's
    assert main(["finetune", *common[:-3], "--prefix-reuse", "auto", "--json", "--steps", "6",
                 "--out", str(tmp_path / "resumed"), "--resume"]) == 1
    assert "hidden_state_table" in capsys.readouterr().err


def test_the_table_needs_lora_on_the_top_blocks_and_is_counted_by_the_accountant(tiny4, sentiment_dir, tmp_path,
                                                                                  capsys):
    assert main(["finetune", "--model", str(tiny4), "--data", str(sentiment_dir), "--steps", "1", "--threads", "1",
                 "--prefix-reuse", "cache", "--out", str(tmp_path / "run")]) == 1
    assert "--prefix-reuse cache needs LoRA on the top blocks only" in capsys.readouterr().err
    common = ["memory", "--model", str(tiny4), "--data", str(sentiment_dir), "--num-layers", "2", "--batch-size", "4",
              "--steps", "2", "--json"]
    breakdown = {}
    for mode in ("auto", "cache"):
        assert main([*common, "--prefix-reuse", mode]) == 0
        breakdown[mode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["breakdown"]
    assert "split_table_bytes" not in breakdown["auto"]
    # 64 training and 16 validation examples, every token's row of n_embd float32
    n_embd = TinyLlama().n_embd
    assert breakdown["cache"]["split_table_bytes"] % (n_embd * 4) == 0
    assert breakdown["cache"]["split_table_bytes"] > breakdown["auto"]["split_cache_bytes"] > 0
