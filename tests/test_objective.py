"""Losses through the real engine on the tiny model, checked against a direct computation from full logits."""

import numpy as np
import pytest

from edgezo.data import Example, Format, Task
from edgezo.engine import Engine, EngineConfig
from edgezo.objective import evaluate, log_softmax, score

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
    from conftest import write_jsonl

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
