"""The torch reference trains the same thing as edgezo finetune: same logits, loss, initial adapter and outputs."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from edgezo.adapter import read_base_model_info  # noqa: E402
from edgezo.cli import main  # noqa: E402
from edgezo.engine import Engine, EngineConfig, Vocabulary  # noqa: E402
from edgezo.files import EdgezoError  # noqa: E402
from edgezo.mezo import MezoConfig  # noqa: E402
from edgezo.objective import score  # noqa: E402
from edgezo.reference import (BackpropStepper, ReferenceConfig, TorchMezoStepper, TorchScorer, batch_loss,  # noqa: E402
                              load_model, lora_parameters)
from tests.helpers import classification_batch, reference_args, trained_adapter  # noqa: E402


@pytest.fixture
def model_and_adapter(tiny_gguf):
    adapter = trained_adapter(tiny_gguf)
    model = load_model(tiny_gguf, adapter, read_base_model_info(tiny_gguf), ReferenceConfig())
    return model, adapter


def test_torch_logits_match_llama_cpp_with_the_same_adapter(tiny_gguf, model_and_adapter):
    model, adapter = model_and_adapter
    vocab = Vocabulary(tiny_gguf)
    batch, task = classification_batch(vocab)
    sequences = [ex.tokens for ex in batch]
    positions = [range(len(s)) for s in sequences]  # every position, padding included in the torch batch
    with Engine(tiny_gguf, EngineConfig(n_seq_max=len(batch), n_ctx_per_seq=64, flash_attn=False, kv_f32=True)) as engine:
        engine.set_adapter(adapter)
        expected = engine.logits(sequences, positions)
        expected_loss = score(engine, batch, task).loss
    got = TorchScorer(model).logits(sequences, positions)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert batch_loss(TorchScorer(model), batch, task).item() == pytest.approx(expected_loss, abs=1e-5)


def test_padding_does_not_change_a_sequence_loss(tiny_gguf, model_and_adapter):
    model, _ = model_and_adapter
    batch, task = classification_batch(Vocabulary(tiny_gguf))
    scorer = TorchScorer(model)
    together = batch_loss(scorer, batch, task).item()
    alone = np.mean([batch_loss(scorer, [ex], task).item() for ex in batch])
    assert together == pytest.approx(alone, abs=1e-6)


def test_torch_mezo_projected_gradient_matches_autograd(tiny_gguf, model_and_adapter):
    """(L(theta + eps z) - L(theta - eps z)) / 2 eps ~ <grad L, z>: checks the MeZO baseline and BP's gradient."""
    model, _ = model_and_adapter
    batch, task = classification_batch(Vocabulary(tiny_gguf))
    scorer = TorchScorer(model)
    params = lora_parameters(model)
    loss = batch_loss(scorer, batch, task)
    grads = torch.autograd.grad(loss, params)
    before = [p.detach().clone() for p in params]
    mezo = TorchMezoStepper(model, scorer, task, None, MezoConfig(learning_rate=1e-2, eps=1e-3), 1, run_seed=0)
    record = mezo.step(batch, 0)
    generator = torch.Generator().manual_seed(record["seeds"][0])
    zs = [torch.randn(p.shape, generator=generator) for p in params]
    directional = sum((g * z).sum() for g, z in zip(grads, zs)).item()
    assert record["projected_grads"][0] == pytest.approx(directional, rel=2e-2, abs=1e-3)
    # and the update is theta - lr * g * z (to float32 rounding of the in-place perturb/restore)
    for p, p0, z in zip(params, before, zs):
        torch.testing.assert_close(p.detach(), p0 - 1e-2 * record["projected_grads"][0] * z, atol=1e-5, rtol=0)


def test_backprop_step_lowers_the_batch_loss(tiny_gguf, model_and_adapter):
    model, _ = model_and_adapter
    batch, task = classification_batch(Vocabulary(tiny_gguf))
    scorer = TorchScorer(model)
    stepper = BackpropStepper(model, scorer, task, None, MezoConfig(learning_rate=1e-2), 5)
    first = stepper.step(batch, 0)["loss"]
    for i in range(1, 5):
        last = stepper.step(batch, i)["loss"]
    assert last < first - 1e-3


def test_sgd_step_moves_the_lora_tensors_by_the_rate_times_their_gradient(tiny_gguf, model_and_adapter):
    model, _ = model_and_adapter
    batch, task = classification_batch(Vocabulary(tiny_gguf))
    scorer = TorchScorer(model)
    before = [p.detach().clone() for p in lora_parameters(model)]
    model.zero_grad()
    batch_loss(scorer, batch, task).backward()
    grads = [p.grad.detach().clone() for p in lora_parameters(model)]
    stepper = BackpropStepper(model, scorer, task, None, MezoConfig(learning_rate=1e-2), 5, optimizer="sgd")
    stepper.step(batch, 0)
    for old, grad, new in zip(before, grads, lora_parameters(model), strict=True):
        assert torch.allclose(new, old - 1e-2 * grad, atol=1e-7)  # AdamW would move every coordinate by ~lr


def test_optimizer_is_checked():
    with pytest.raises(EdgezoError, match="--optimizer"):
        ReferenceConfig(optimizer="lion")
    with pytest.raises(EdgezoError, match="reference-bp"):
        ReferenceConfig(method="mezo", optimizer="sgd")


def test_only_lora_tensors_are_trainable(model_and_adapter):
    model, adapter = model_and_adapter
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == adapter.n_params





def test_reference_time_limit_ends_the_run_validated(tiny_gguf, sentiment_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reference-bp", *reference_args(tiny_gguf, sentiment_dir, out, "--max-train-seconds", "1e-9")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1] and [r["step"] for r in lines if "valid_loss" in r] == [0, 1]


@pytest.mark.parametrize("flag", [[], ["--release-freed-memory"]])
def test_release_freed_memory_maps_large_allocations_before_the_model_loads(flag, tiny_gguf, sentiment_dir, tmp_path,
                                                                            capsys, monkeypatch):
    """The flag reaches edgezo.files.map_large_allocations (replaced here: it would change this test process's
    allocator; tests/test_memory.py checks what it does in a fresh one) before load_model, and the run records it."""
    from edgezo import reference

    calls = []
    monkeypatch.setattr(reference, "map_large_allocations", lambda: calls.append("mapped") or True)
    load = reference.load_model
    monkeypatch.setattr(reference, "load_model", lambda *a, **k: calls.append("loaded") or load(*a, **k))
    out = tmp_path / "run"
    assert main(["reference-bp", *reference_args(tiny_gguf, sentiment_dir, out, "--steps", "1", *flag)]) == 0
    assert calls == (["mapped", "loaded"] if flag else ["loaded"])
    assert json.loads((out / "config.json").read_text())["reference"]["release_freed_memory"] is bool(flag)


@pytest.mark.parametrize("method,extra", [("bp", ["--gradient-checkpointing"]), ("mezo", [])])
def test_reference_run_writes_a_run_dir_llama_cpp_evaluates_identically(method, extra, tiny_gguf, sentiment_dir,
                                                                          tmp_path, capsys):
    out = tmp_path / "run"
    assert main([f"reference-{method}", *reference_args(tiny_gguf, sentiment_dir, out, *extra)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in lines if "loss" in e]
    evals = [e for e in lines if "valid_accuracy" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all({"lr", "seconds", "train_seconds", "rss_bytes"} <= set(e) for e in steps)
    assert summary["steps"] == 4 and summary["peak_rss_bytes"] > 0 and (out / "peft" / "adapter_config.json").exists()
    # the exported adapter, evaluated by llama.cpp, gives the torch run's final validation loss
    assert main(["eval", "--model", str(tiny_gguf), "--quant", "none", "--adapter", str(out / "adapter.gguf"),
                 "--data", str(sentiment_dir), "--split", "valid", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["loss"] == pytest.approx(summary["valid_loss"], abs=5e-3)
    assert evaluated["accuracy"] == summary["valid_accuracy"]
    # the one training loop keeps the best adapter by validation loss for reference runs too
    best = min(evals, key=lambda e: e["valid_loss"])
    assert summary["best_step"] == best["step"] and summary["best_adapter"] == str(out / "adapter.best.gguf")
    assert main(["eval", "--model", str(tiny_gguf), "--quant", "none", "--adapter", summary["best_adapter"],
                 "--data", str(sentiment_dir), "--split", "valid", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["loss"] == pytest.approx(best["valid_loss"], abs=5e-3)


def test_reference_starts_from_finetunes_initial_adapter(tiny_gguf, sentiment_dir, tmp_path, capsys):
    """Step-0 validation loss of the torch run equals the MeZO trainer's: same data, prompts, loss and adapter."""
    args = reference_args(tiny_gguf, sentiment_dir, tmp_path / "ref")
    assert main(["reference-bp", *args]) == 0
    assert main(["finetune", *reference_args(tiny_gguf, sentiment_dir, tmp_path / "mezo")]) == 0
    capsys.readouterr()

    def step0(run):
        return next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                    if "valid_loss" in json.loads(line))["valid_loss"]

    assert step0(tmp_path / "ref") == pytest.approx(step0(tmp_path / "mezo"), abs=5e-3)


def test_reference_refuses_bad_configs_and_existing_runs(tiny_gguf, sentiment_dir, tmp_path, capsys):
    with pytest.raises(EdgezoError, match="float32"):
        ReferenceConfig(method="mezo", dtype="bfloat16")
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter.gguf").write_bytes(b"x")
    assert main(["reference-bp", *reference_args(tiny_gguf, sentiment_dir, out)]) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_bfloat16_base_keeps_float32_lora_and_close_loss(tiny_gguf, model_and_adapter):
    model, adapter = model_and_adapter
    batch, task = classification_batch(Vocabulary(tiny_gguf))
    bf16 = load_model(tiny_gguf, adapter, read_base_model_info(tiny_gguf), ReferenceConfig(dtype="bfloat16"))
    dtypes = {n: p.dtype for n, p in bf16.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    f32_loss = batch_loss(TorchScorer(model), batch, task).item()
    bf16_loss = batch_loss(TorchScorer(bf16), batch, task).item()
    assert bf16_loss != f32_loss and bf16_loss == pytest.approx(f32_loss, abs=0.05)


def test_bp_run_resumed_from_its_checkpoint_is_bit_identical_to_one_run(tiny_gguf, sentiment_dir, tmp_path, capsys):
    """reference-bp --resume (issue 33's runs go in pieces): a run stopped at step 2 and continued to step 4 leaves
    the adapter, best adapter and log of a 4-step run, byte for byte (AdamW's moments and step count restored)."""
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert main(["reference-bp", *reference_args(tiny_gguf, sentiment_dir, whole, "--learning-rate", "3e-2")]) == 0
    args = reference_args(tiny_gguf, sentiment_dir, pieces, "--learning-rate", "3e-2")
    assert main(["reference-bp", *args, "--steps", "2"]) == 0
    assert json.loads((pieces / "state.json").read_text())["step"] == 2
    assert main(["reference-bp", *args, "--steps", "4", "--resume"]) == 0
    capsys.readouterr()

    def log(run):
        timing = {"seconds", "train_seconds", "rss_bytes"}
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert log(pieces) == log(whole) and len([e for e in log(whole) if "loss" in e]) == 4
    for name in ("adapter.gguf", "adapter.best.gguf"):
        assert (pieces / name).read_bytes() == (whole / name).read_bytes(), name


def test_bp_resume_refuses_a_changed_run_and_a_missing_checkpoint(tiny_gguf, sentiment_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reference-bp", *reference_args(tiny_gguf, sentiment_dir, tmp_path / "none", "--resume")]) == 1
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["reference-bp", *reference_args(tiny_gguf, sentiment_dir, out, "--steps", "2")]) == 0
    assert main(["reference-bp", *reference_args(tiny_gguf, sentiment_dir, out, "--resume", "--learning-rate", "1e-2")]) == 1
    assert "schedule.learning_rate" in capsys.readouterr().err
