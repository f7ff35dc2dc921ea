"""Nothing lost, clear errors: SIGKILL + resume, corrupted state, non-finite training, failed writes, bad files."""

import errno
import json
import os
import signal
import subprocess

import numpy as np
import pytest

from edgezo import store
from edgezo.adapter import LoraAdapter
from edgezo.cli import main
from edgezo.files import EdgezoError, write_text_atomic

from tests.helpers import dying_cli, finetune_args, run_json


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tiny_gguf, sentiment_dir, tmp_path, capsys):
    steps = 40
    argv = finetune_args(tiny_gguf, sentiment_dir, tmp_path / "killed", steps, "--save-every", "1")
    kill_at = int(np.random.default_rng().integers(3, 30))  # a random step, different on every run
    proc = subprocess.run(dying_cli(kill_at, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    state = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert state["step"] == kill_at - 1  # every step before the crash was checkpointed (--save-every 1)
    run_json(capsys, [*argv, "--resume"])
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "whole", steps, "--save-every", "1"))
    killed = LoraAdapter.load(tmp_path / "killed" / "adapter.gguf").tensors
    whole = LoraAdapter.load(tmp_path / "whole" / "adapter.gguf").tensors
    assert all(np.array_equal(killed[k], whole[k]) for k in whole)
    metrics = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["step"] for line in metrics if '"loss"' in line]
    assert logged == list(range(1, steps + 1))


def test_corrupted_checkpoint_is_refused_on_resume(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 4))
    checkpoint = tmp_path / "run" / "checkpoint-000004.gguf"
    data = bytearray(checkpoint.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the tensor data
    checkpoint.write_bytes(bytes(data))
    assert main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 8, "--resume")) == 1
    assert "checkpoint-000004.gguf: checkpoint missing or does not match state.json" in capsys.readouterr().err
    (tmp_path / "run" / "state.json").write_text("{not json")
    assert main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 8, "--resume")) == 1
    assert "state.json: corrupted or missing checkpoint state" in capsys.readouterr().err


def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(tiny_gguf, sentiment_dir, tmp_path, capsys):
    argv = finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 10, "--save-every", "1")
    argv[argv.index("--learning-rate") + 1] = "1e38"  # the first update overflows float32
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "last good checkpoint" in err
    state = json.loads((tmp_path / "run" / "state.json").read_text()) if (tmp_path / "run" / "state.json").exists() else None
    assert state is None  # nothing bad was ever saved (the run failed at step 1)
    assert not (tmp_path / "run" / "adapter.gguf").exists()


def test_unwritable_output_directory(tiny_gguf, sentiment_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(finetune_args(tiny_gguf, sentiment_dir, blocker / "run", 2)) == 1
    err = capsys.readouterr().err
    assert "cannot create the run directory" in err and "a-file/run" in err
    assert blocker.read_text() == "not a directory"


def test_a_disk_that_fills_during_a_save_leaves_the_old_file_untouched(tmp_path, monkeypatch):
    target = tmp_path / "adapter.gguf"
    target.write_bytes(b"previous good adapter")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("edgezo.files.os.fsync", full_disk)
    with pytest.raises(EdgezoError, match=r"cannot write .*adapter.gguf: No space left on device"):
        write_text_atomic(target, "new content")
    assert target.read_bytes() == b"previous good adapter"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.gguf"]  # no temporary file left behind


def test_cached_file_with_a_wrong_sha256_is_reported(tmp_path):
    model = store.MODELS["smollm2-135m"]
    cached = store.home() / "models" / model.name / model.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF but corrupted")
    with pytest.raises(EdgezoError, match=r"SmolLM2-135M-Instruct.Q4_1.gguf: sha256 .* does not match .* fetch"):
        store.resolve_model("smollm2-135m")
    assert cached.read_bytes() == b"GGUF but corrupted"  # reported, not silently replaced


@pytest.mark.parametrize("cut", [0.5, 0.02])  # truncated tensor data; truncated key-value header
def test_truncated_model_gguf_gives_a_clear_error(tiny_gguf, tmp_path, capsys, cut):
    data = tiny_gguf.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: int(len(data) * cut)])
    assert main(["eval", "--model", str(truncated), "--quant", "none", "--data", "x.jsonl"]) == 1
    err = capsys.readouterr().err
    assert "truncated.gguf" in err and "not a readable GGUF" in err


def test_unsupported_architecture(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "alien.gguf"
    w = GGUFWriter(path, "alien-arch")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from edgezo.engine import Engine

    with pytest.raises(EdgezoError,
                       match=r"alien.gguf: llama.cpp could not load this model .*unknown model architecture: 'alien-arch'"):
        Engine(path)


def test_same_config_twice_and_across_thread_counts_is_bit_identical(tiny_gguf, sentiment_dir, tmp_path, capsys):
    results = {}
    for name, threads in (("a", "1"), ("b", "1"), ("c", "2")):
        argv = finetune_args(tiny_gguf, sentiment_dir, tmp_path / name, 5)
        argv[argv.index("--threads") + 1] = threads
        run_json(capsys, argv)
        results[name] = LoraAdapter.load(tmp_path / name / "adapter.gguf").tensors
    for other in ("b", "c"):
        assert all(np.array_equal(results["a"][k], results[other][k]) for k in results["a"]), other


def nan_loss_at_step(monkeypatch, step: int) -> None:
    """Every loss of the `step`-th training step (1-based) is NaN, as a diverged or broken model gives."""
    from edgezo import steppers

    real, calls = steppers.loss_function, {"n": 0}

    def loss_function(engine, batch, task):
        calls["n"] += 1
        return (lambda params: float("nan")) if calls["n"] == step else real(engine, batch, task)

    monkeypatch.setattr(steppers, "loss_function", loss_function)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_gguf, sentiment_dir, tmp_path, capsys, monkeypatch):
    nan_loss_at_step(monkeypatch, 3)
    assert main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 10, "--save-every", "1")) == 1
    err = capsys.readouterr().err
    assert "step 3: loss is not finite" in err and "the last good checkpoint" in err
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 2
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*.gguf")) == [
        "checkpoint-000002.best.gguf", "checkpoint-000002.gguf"]
    good = LoraAdapter.load(tmp_path / "run" / "checkpoint-000002.gguf").tensors
    assert all(np.isfinite(v).all() for v in good.values())


def test_with_the_auto_rate_a_nan_loss_rolls_back_and_the_run_goes_on(tiny_gguf, sentiment_dir, tmp_path, capsys,
                                                                      monkeypatch):
    nan_loss_at_step(monkeypatch, 5)
    args = finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 8)
    args[args.index("--learning-rate") + 1] = "auto"
    result = run_json(capsys, args)
    assert result["steps"] == 8 and result["rollbacks"] == 1
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rollback = next(e for e in events if "rollback_to" in e)
    assert rollback["step"] == 5 and "loss is not finite" in rollback["reason"] and rollback["rate_scale"] == 0.5
    assert rollback["rollback_to"] in {e["step"] for e in events if "valid_loss" in e and e["step"] < 5}
    assert not any(e["step"] == 5 and "loss" in e for e in events)  # the failed step left no update


def test_memory_budget_refuses_to_start_then_stops_cleanly_with_a_checkpoint(tiny_gguf, sentiment_dir, tmp_path, capsys):
    # The budget check predicts this run's own batches: `edgezo memory` with the same arguments gives that figure.
    predicted = run_json(capsys, ["memory", "--method", "mezo",
                                  *finetune_args(tiny_gguf, sentiment_dir, tmp_path / "x", 10)[1:]])["predicted_bytes"]
    below = f"{(predicted - 2**20) // 2**20}M"
    assert main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "refused", 10, "--max-memory", below)) == 1
    assert "predicted peak RSS" in capsys.readouterr().err and not (tmp_path / "refused").exists()

    # Above the prediction but below this pytest process's RSS (torch and friends are loaded): measured RSS trips it.
    above = f"{(predicted + 2**20) // 2**20}M"
    code = main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 10, "--max-memory", above))
    err = capsys.readouterr().err
    assert code == 130 and "memory budget exceeded at step 1" in err and "continue with --resume" in err
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 1
    assert main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run2", 2, "--max-memory", "lots")) == 1
    assert "expected a size like 512M" in capsys.readouterr().err


def test_device_profile_sets_the_budget(tiny_gguf, sentiment_dir, tmp_path, capsys):
    assert main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 2, "--device", "no-such-phone")) == 1
    assert "unknown device profile 'no-such-phone'; known: android-4gb" in capsys.readouterr().err
    result = run_json(capsys, ["memory", "--model", str(tiny_gguf), "--quant", "f32", "--device", "raspberry-pi-zero-2w",
                               "--json"])
    assert result["fits"] is True and result["predicted_bytes"] == sum(result["breakdown"].values())


def test_rss_does_not_grow_over_2000_steps(tiny_gguf, sentiment_dir, tmp_path, capsys):
    """No leak from adapter updates: RSS after warm-up (step 200) vs step 2000 grows by less than 1 %."""
    argv = finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 2000, "--eval-every", "0", "--save-every", "500")
    run_json(capsys, argv)
    rss = {r["step"]: r["rss_bytes"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if "rss_bytes" in r}
    assert rss[2000] < 1.01 * rss[200], (rss[200], rss[2000])


def test_the_metrics_log_reader_skips_blank_lines_and_names_a_broken_one(tmp_path):
    from edgezo.rundir import RunDir

    run = RunDir(tmp_path / "run")
    assert run.events() == []  # no log yet
    run.create()
    run.metrics.write_text('{"step": 1, "loss": 0.5}\n\n{"step": 2, "valid_loss": 0.4}\n')
    assert [e["step"] for e in run.events()] == [1, 2]
    run.metrics.write_text('{"step": 1, "loss": 0.5}\n\n{"step": 2, "lo')  # a write cut short
    with pytest.raises(EdgezoError, match=r"metrics.jsonl:3: not JSON"):
        run.events()
    run.truncate_metrics(after_step=1)  # on resume: the torn last line goes with the steps after the checkpoint
    assert run.metrics.read_text() == '{"step": 1, "loss": 0.5}\n'
    run.metrics.write_text('{"st\n{"step": 2, "loss": 0.4}\n')  # a broken line that is not the last stays an error
    with pytest.raises(EdgezoError, match=r"metrics.jsonl:1: not JSON"):
        run.truncate_metrics(after_step=2)
