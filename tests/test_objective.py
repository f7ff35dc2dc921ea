"""Losses through the real engine on the tiny model, checked against a direct computation from full logits."""

import numpy as np
import pytest

from edgezo.data import Example, Format, Task
from edgezo.engine import Engine, EngineConfig
from edgezo import objective
from edgezo.objective import evaluate, log_softmax, score, target_log_probs

CONFIG = EngineConfig(n_seq_max=4, n_ctx_per_seq=256, n_threads=1, flash_attn=False)


@pytest.fixture
def engine(tiny_gguf):
    with Engine(tiny_gguf, CONFIG) as e:
        yield e


def test_lm_loss_is_the_mean_nll_of_the_target_tokens(engine):
    tokens = engine.tokenize("a good movie, a bad one", add_special=True)
    example = Example(tuple(tokens), target_start=4)
    totals = score(engine, [example], Task(format=Format.COMPLETIONS))
    full = log_softmax(engine.logits([tokens], [list(range(len(tokens)))]))
    expected = -np.mean([full[i - 1, tokens[i]] for i in range(4, len(tokens))])
    assert totals.n_targets == len(tokens) - 4
    assert totals.loss == pytest.approx(expected, abs=1e-5)


def test_classification_loss_is_restricted_to_the_label_words(engine):
    good, bad = engine.tokenize(" good", False)[0], engine.tokenize(" bad", False)[0]
    task = Task(format=Format.CLASSIFICATION, labels=("bad", "good"), label_token_ids=(bad, good))
    seqs = [engine.tokenize(t, add_special=True) for t in ("a fine movie\nLabel:", "a dull movie\nLabel:")]
    examples = [Example(tuple(s), len(s), label) for s, label in zip(seqs, (1, 0))]
    totals = evaluate(engine, examples, task, batch_size=1)  # one per batch: also checks the batch sums
    expected, correct = 0.0, 0
    for s, ex in zip(seqs, examples):
        row = engine.logits([s], [[len(s) - 1]])[0][[bad, good]]
        logp = log_softmax(row)
        expected -= logp[ex.label]
        correct += int(np.argmax(logp) == ex.label)
    assert totals.loss == pytest.approx(expected / 2, abs=1e-5)
    assert totals.n_correct == correct and totals.n_examples == 2


def test_chat_and_text_datasets_train_through_the_cli(tiny_gguf, tmp_path, capsys):
    import json

    from edgezo.cli import main
    from tests.helpers import write_jsonl

    chat = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("good", "bad", "fine", "dull")]
    text = [{"text": f"a {w} movie"} for w in ("good", "bad", "fine", "dull")]
    for name, records in (("chat", chat), ("text", text)):
        data = write_jsonl(tmp_path / f"{name}.jsonl", records)
        argv = ["finetune", "--model", str(tiny_gguf), "--quant", "f32", "--data", str(data), "--valid", str(data),
                "--steps", "2", "--batch-size", "2", "--threads", "1", "--out", str(tmp_path / name), "--json"]
        assert main(argv) == 0, name
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert np.isfinite(result["final_loss"]) and result["final_loss"] > 0.5  # ~ln(291) on an untrained tiny model
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["task"]["format"] == {"chat": "chat", "text": "text"}[name]


# ---- the lean LM loss: target log-probabilities without [n_targets, n_vocab] float64 temporaries -------------------
SMOLLM2_VOCAB = 49152  # the vocabulary size the LM loss's memory matters for


def random_logits(n_rows: int, n_vocab: int, scale: float, offset: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_rows, n_vocab)) * scale + offset).astype(np.float32)


@pytest.mark.parametrize("scale, offset, reason", [
    (3.0, 0.0, "ordinary logits"),
    (50.0, 0.0, "a peaked softmax: most exp terms underflow"),
    (1.0, 1e4, "large common offset: only the max subtraction keeps exp finite"),
    (2e3, -3e4, "large magnitudes both ways"),
])
def test_target_log_probs_equal_the_float64_log_softmax(scale, offset, reason):
    # 50 rows: two full chunks of chunk_rows(49152) = 21 and a partial one
    logits = random_logits(50, SMOLLM2_VOCAB, scale, offset, seed=1)
    targets = np.random.default_rng(2).integers(0, SMOLLM2_VOCAB, 50)
    targets[:5] = logits[:5].argmax(axis=1)  # some targets are the argmax, so accuracy is exercised both ways
    expected = log_softmax(logits)  # the previous formula, on the whole [n_rows, n_vocab] in float64
    logp, is_argmax = target_log_probs(logits, targets)
    np.testing.assert_allclose(logp, expected[np.arange(50), targets], rtol=1e-12, atol=1e-12, err_msg=reason)
    np.testing.assert_array_equal(is_argmax, expected.argmax(axis=1) == targets)
    assert is_argmax[:5].all() and not is_argmax[5:].all()


def test_target_log_probs_are_deterministic_and_independent_of_the_chunking(monkeypatch):
    logits = random_logits(30, 1000, 5.0, 0.0, seed=3)
    targets = np.random.default_rng(4).integers(0, 1000, 30)
    first, again = target_log_probs(logits, targets), target_log_probs(logits.copy(), targets)
    assert first[0].tobytes() == again[0].tobytes()  # MeZO subtracts two losses: same inputs, same bits
    monkeypatch.setattr(objective, "LOGSUMEXP_CHUNK_BYTES", 7 * 1000 * 8)  # 7-row chunks instead of one chunk
    assert objective.chunk_rows(1000) == 7
    assert target_log_probs(logits, targets)[0].tobytes() == first[0].tobytes()


def test_target_log_probs_allocate_one_chunk_not_the_logits():
    import tracemalloc

    n_rows = 400  # 75 MiB of float32 logits; a float64 log-softmax of them would take 150 MiB per temporary
    logits = random_logits(n_rows, SMOLLM2_VOCAB, 3.0, 0.0, seed=5)
    targets = np.zeros(n_rows, dtype=np.int64)
    tracemalloc.start()
    target_log_probs(logits, targets)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * objective.LOGSUMEXP_CHUNK_BYTES  # the float64 working rows and one float32 chunk's argmax


def test_lm_loss_reads_the_engine_logits_without_copying_and_repeats_exactly(engine):
    tokens = engine.tokenize("a good movie, a bad one, a fine one", add_special=True)
    batch = [Example(tuple(tokens), target_start=3), Example(tuple(tokens[:7]), target_start=2)]
    task = Task(format=Format.COMPLETIONS)
    first, again = score(engine, batch, task), score(engine, batch, task)
    assert (first.loss_sum, first.n_correct) == (again.loss_sum, again.n_correct)
    view = engine.logits([tokens], [[2, 3]], copy=False)
    assert not view.flags.owndata and not view.flags.writeable
    np.testing.assert_array_equal(view, engine.logits([tokens], [[2, 3]]))
