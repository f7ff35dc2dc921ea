"""No surprises with your own model (issue 16, item 5): shared --model/--quant, a run's own base as default,
GGUF paths used as they are, the sha256 cache, and the best-validation adapter (adapter.best.gguf, RUN:best)."""

import json
import os

import numpy as np
import pytest

from edgezo import files, store
from edgezo.adapter import LoraAdapter
from edgezo.cli import main
from tests.helpers import finetune_args, run_json


@pytest.mark.parametrize("spec, quant, expected, why", [
    ("smollm2-135m", None, "q4_0", "a built-in name keeps the documented default (make demo unchanged)"),
    ("smollm2-135m", "Q8_0", "q8_0", "an explicit --quant wins, case-insensitive"),
    ("my/model.Q4_K_M.gguf", None, None, "a user's GGUF is used as it is: no silent requantization"),
    ("my/model.gguf", "q8_0", "q8_0", "a user's GGUF is requantized only when asked"),
    ("smollm2-135m", "none", "none", "'none' stays distinct from 'not given' (the original shipped file)"),
])
def test_effective_quant(spec, quant, expected, why):
    assert store.effective_quant(spec, quant) == expected, why


def finetune_on_own_model(model, data, out, steps, *extra):
    """finetune_args without --quant: the model is a GGUF path, which must then be used as it is."""
    argv = finetune_args(model, data, out, steps, *extra)
    i = argv.index("--quant")
    return argv[:i] + argv[i + 2:]


def test_a_gguf_path_is_used_as_it_is_and_commands_default_to_the_runs_base(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run_json(capsys, finetune_on_own_model(tiny_gguf, sentiment_dir, run, 2))
    config = json.loads((run / "config.json").read_text())
    assert config["model_path"] == str(tiny_gguf) and config["quant"] is None  # not requantized to q4_0
    assert not (tmp_path / "edgezo-home" / "quantized").exists()

    # no --model: eval / generate / export run on the run's own base, not on the default built-in model
    evaluated = run_json(capsys, ["eval", "--adapter", str(run), "--threads", "1", "--batch-size", "4", "--json"])
    assert evaluated["model"] == str(tiny_gguf)
    generated = run_json(capsys, ["generate", "--adapter", str(run), "-p", "a fine movie", "--max-tokens", "2",
                                  "--threads", "1", "--json"])
    assert generated["n_tokens"] <= 2
    merged = run_json(capsys, ["export", "--adapter", str(run), "--to", "merged-gguf", "--outtype", "f32",
                               "-o", str(tmp_path / "merged.gguf"), "--json"])
    assert merged["outtype"] == "f32" and (tmp_path / "merged.gguf").exists()


def test_export_takes_the_same_quant_flag_as_finetune(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, run, 2, "--quant", "q8_0"))
    config = json.loads((run / "config.json").read_text())
    assert config["quant"] == "q8_0" and config["model_path"] != str(tiny_gguf)
    # export --quant used to be refused as an unknown argument
    out = run_json(capsys, ["export", "--model", str(tiny_gguf), "--quant", "q8_0", "--adapter", str(run),
                            "-o", str(tmp_path / "lora.gguf"), "--json"])
    assert out["format"] == "gguf-lora"
    # the run's own quant when the model is the run's: eval reports the requantized q8_0 copy
    evaluated = run_json(capsys, ["eval", "--model", str(tiny_gguf), "--adapter", str(run), "--threads", "1",
                                  "--batch-size", "4", "--limit", "4", "--json"])
    assert evaluated["model"] == config["model_path"]


def test_resume_without_model_flags_continues_on_the_runs_base(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, run, 2, "--quant", "q8_0"))
    argv = finetune_args(tiny_gguf, sentiment_dir, run, 4, "--resume")
    i = argv.index("--model")
    argv = argv[:i] + argv[i + 6:]  # drop --model M --quant f32 --data D
    assert run_json(capsys, argv)["steps"] == 4


def test_sha256_is_cached_by_size_mtime_and_inode(tmp_path, monkeypatch):
    calls = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda path: calls.append(path) or real(path))
    f = tmp_path / "model.gguf"
    f.write_bytes(b"a" * 1000)
    first = store.cached_sha256(f)
    assert store.cached_sha256(f) == first and len(calls) == 1  # the second use reads the cache
    f.write_bytes(b"b" * 1000)  # same size, new content (and mtime)
    os.utime(f, ns=(1, 1))
    assert store.cached_sha256(f) != first and len(calls) == 2
    os.utime(f, ns=(2, 2))  # only the mtime changed: hashed again, same digest
    assert store.cached_sha256(f) != first and len(calls) == 3
    g = tmp_path / "other.gguf"
    g.write_bytes(b"c" * 1000)  # same size and mtime, another inode (both files exist at once), other bytes
    os.utime(g, ns=(2, 2))
    os.replace(g, f)
    assert store.cached_sha256(f) == real(f) and len(calls) == 4


def test_a_requantized_user_gguf_is_hashed_once(tiny_gguf, tmp_path, monkeypatch):
    calls = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda path: calls.append(str(path)) or real(path))
    first = store.resolve_model(str(tiny_gguf), "q8_0")
    n_after_first = calls.count(str(tiny_gguf.resolve()))
    assert store.resolve_model(str(tiny_gguf), "q8_0") == first
    assert calls.count(str(tiny_gguf.resolve())) == n_after_first == 1


def test_best_validation_adapter_is_kept_and_accepted_as_run_best(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run = tmp_path / "run"
    result = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, run, 6, "--eval-every", "1",
                                            "--learning-rate", "0.5"))
    evals = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "valid_loss" in e]
    best = min(evals, key=lambda e: e["valid_loss"])
    assert result["best_adapter"] == str(run / "adapter.best.gguf")
    assert (result["best_step"], result["best_valid_loss"]) == (best["step"], best["valid_loss"])
    scored = run_json(capsys, ["eval", "--adapter", f"{run}:best", "--split", "valid", "--threads", "1",
                               "--batch-size", "4", "--json"])
    assert scored["adapter"] == str(run / "adapter.best.gguf")
    assert scored["loss"] == pytest.approx(best["valid_loss"], rel=1e-5)  # the adapter of that evaluation
    exported = run_json(capsys, ["export", "--adapter", f"{run}:best", "-o", str(tmp_path / "best.gguf"), "--json"])
    a, b = LoraAdapter.load(run / "adapter.best.gguf"), LoraAdapter.load(exported["output"])
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_best_adapter_survives_resume(tiny_gguf, sentiment_dir, tmp_path, capsys):
    extra = ("--eval-every", "2", "--learning-rate", "0.5")
    full = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "full", 6, *extra))
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "split", 4, *extra))
    resumed = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "split", 6, "--resume", *extra))
    assert (resumed["best_step"], resumed["best_valid_loss"]) == (full["best_step"], full["best_valid_loss"])
    a = LoraAdapter.load(tmp_path / "full" / "adapter.best.gguf").tensors
    b = LoraAdapter.load(tmp_path / "split" / "adapter.best.gguf").tensors
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_run_best_without_validation_is_a_clear_error(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run = tmp_path / "run"
    result = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir / "train.jsonl", run, 2))
    assert result["best_adapter"] is None
    assert main(["export", "--adapter", f"{run}:best", "-o", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert "holds no adapter.best.gguf" in err and "Traceback" not in err
