"""The command line end to end on the tiny model: finetune, resume, eval, generate, export."""

import json

import numpy as np
import pytest

from edgezo.adapter import LoraAdapter
from edgezo.cli import build_parser, command_line, main
from edgezo.files import sha256_file
from edgezo.rundir import RunDir

from tests.helpers import finetune_args, run_json


def test_finetune_writes_run_and_reports_json(tiny_gguf, sentiment_dir, tmp_path, capsys):
    out = tmp_path / "run"
    result = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, out, 6))
    assert result["steps"] == 6 and result["adapter"] == str(out / "adapter.gguf")
    assert np.isfinite(result["final_loss"]) and result["seconds"] > 0 and 0 <= result["valid_accuracy"] <= 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in lines if "valid_loss" in r] == [0, 3, 6]
    assert all(len(r["seeds"]) == 1 and len(r["projected_grads"]) == 1 for r in lines if "loss" in r)
    config = json.loads((out / "config.json").read_text())
    assert config["lora"]["targets"] == ["attn_k", "attn_v"] and config["task"]["labels"] == ["bad", "good"]
    adapter = LoraAdapter.load(out / "adapter.gguf")
    assert any(np.abs(v).max() > 0 for k, v in adapter.tensors.items() if k.endswith("lora_b"))  # B moved off zero


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "full", 7))
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "split", 4))
    resumed = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "split", 7, "--resume"))
    full = LoraAdapter.load(tmp_path / "full" / "adapter.gguf").tensors
    split = LoraAdapter.load(tmp_path / "split" / "adapter.gguf").tensors
    for k in full:
        np.testing.assert_array_equal(full[k], split[k])
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 8))  # the log has every step exactly once
    log = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    step_seconds = sum(e["seconds"] for e in log if "loss" in e)
    assert resumed["train_seconds"] == pytest.approx(step_seconds)  # the whole run's step time, not this process's


def test_a_training_time_limit_ends_the_run_validated_and_saved(tiny_gguf, sentiment_dir, tmp_path, capsys):
    """Any step takes more than a nanosecond: the limit ends the run after its first step, with the final validation
    and checkpoint at that step; resumed with the same limit it trains no further, with a higher one it continues."""
    out = tmp_path / "run"
    result = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, out, 6, "--max-train-seconds", "1e-9"))
    assert result["steps"] == 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1] and [r["step"] for r in lines if "valid_loss" in r] == [0, 1]
    assert json.loads((out / "state.json").read_text())["step"] == 1 and (out / "adapter.gguf").exists()
    again = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, out, 6, "--resume", "--max-train-seconds", "1e-9"))
    assert again["steps"] == 1
    assert run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, out, 6, "--resume"))["steps"] == 6


def test_resume_refuses_a_changed_config_naming_the_fields(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 2))
    code = main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 4, "--resume", "--eps", "0.05", "--rank", "2"))
    err = capsys.readouterr().err
    assert code == 1 and "mezo.eps: 0.01 -> 0.05" in err and "lora.rank: 16 -> 2" in err


def test_existing_run_is_not_overwritten_without_resume(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 2))
    before = (tmp_path / "run" / "adapter.gguf").read_bytes()
    assert main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 2)) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "adapter.gguf").read_bytes() == before


def test_eval_generate_export(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, run, 2))
    common = ["--model", str(tiny_gguf), "--quant", "f32", "--threads", "1", "--json"]
    zero = run_json(capsys, ["eval", *common, "--data", str(sentiment_dir), "--template", "{text}\nLabel:", "--batch-size", "4"])
    tuned = run_json(capsys, ["eval", *common, "--adapter", str(run), "--batch-size", "4"])  # data/template from the run
    assert zero["n_examples"] == tuned["n_examples"] == 16 and zero["split"] == "test"
    assert zero["loss"] != tuned["loss"] and {"accuracy", "loss", "n_examples"} <= set(tuned)

    gen = run_json(capsys, ["generate", *common, "--adapter", str(run), "-p", "a good movie\\nLabel:", "--max-tokens", "5"])
    assert gen["prompt"] == "a good movie\nLabel:" and gen["n_tokens"] <= 5

    exported = run_json(capsys, ["export", "--model", str(tiny_gguf), "--adapter", str(run), "--to", "gguf-lora",
                                 "-o", str(tmp_path / "out.gguf"), "--json"])
    assert exported["rank"] == 16
    a, b = LoraAdapter.load(run / "adapter.gguf"), LoraAdapter.load(tmp_path / "out.gguf")
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "/nonexistent.gguf"], "no such GGUF file"),
    (["fetch", "no-such-model"], "unknown built-in name"),
    (["finetune", "--model", "{tiny}", "--quant", "f32", "--data", "{tmp}/missing.jsonl"], "no such dataset"),
    (["finetune", "--model", "{tiny}", "--quant", "f32", "--targets", "attn_x"], "unknown LoRA target"),
])
def test_errors_are_one_clear_line_and_exit_1(argv, message, tiny_gguf, tmp_path, capsys):
    argv = [a.format(tiny=tiny_gguf, tmp=tmp_path) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_finetune_with_a_single_train_file_skips_validation(tiny_gguf, sentiment_dir, tmp_path, capsys):
    assert main(finetune_args(tiny_gguf, sentiment_dir / "train.jsonl", tmp_path / "run", 2)) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert "valid_accuracy" not in result and result["steps"] == 2
    assert "no validation split" in captured.err


def test_sigint_stops_between_steps_with_a_checkpoint_and_resume_completes_exactly(tiny_gguf, sentiment_dir, tmp_path, capsys):
    import os
    import signal

    from edgezo import steppers

    calls = {"n": 0}
    original = steppers.zo_step

    def interrupted_mezo_step(*args, **kwargs):  # SIGINT arrives in the middle of step 3
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    steppers.zo_step = interrupted_mezo_step
    try:
        code = main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "cut", 6, "--save-every", "100"))
    finally:
        steppers.zo_step = original
    assert code == 130 and "stopped at step 3 of 6" in capsys.readouterr().err
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["step"] == 3
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "cut", 6, "--resume"))
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "full", 6))
    a = LoraAdapter.load(tmp_path / "cut" / "adapter.gguf").tensors
    b = LoraAdapter.load(tmp_path / "full" / "adapter.gguf").tensors
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_export_peft_and_merged_gguf_and_convert_back(tiny_gguf, sentiment_dir, tmp_path, capsys):
    from edgezo.engine import Engine, EngineConfig

    run = tmp_path / "run"
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, run, 3, "--learning-rate", "0.5"))
    export = ["export", "--model", str(tiny_gguf), "--adapter", str(run), "--json"]
    run_json(capsys, [*export, "--to", "peft", "-o", str(tmp_path / "peft")])
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    run_json(capsys, ["convert", "peft-to-gguf", str(tmp_path / "peft"), "--base", str(tiny_gguf),
                      "-o", str(tmp_path / "back.gguf"), "--json"])
    a, b = LoraAdapter.load(run / "adapter.gguf"), LoraAdapter.load(tmp_path / "back.gguf")
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)  # GGUF -> PEFT -> GGUF is exact

    merged = run_json(capsys, [*export, "--to", "merged-gguf", "--outtype", "f32", "-o", str(tmp_path / "merged.gguf")])
    assert merged["outtype"] == "f32"
    config = EngineConfig(n_seq_max=1, n_ctx_per_seq=256, n_threads=1, flash_attn=False, kv_f32=True)
    with Engine(tiny_gguf, config) as with_adapter, Engine(tmp_path / "merged.gguf", config) as folded:
        with_adapter.set_adapter(a)
        tokens = with_adapter.tokenize("a fine movie\nLabel:", add_special=True)
        positions = [list(range(len(tokens)))]
        delta = np.abs(with_adapter.logits([tokens], positions) - folded.logits([tokens], positions)).max()
    assert delta < 1e-4


def test_the_default_mezo_learning_rate_follows_the_built_in_model():
    from edgezo.cli import build_parser, mezo_learning_rate

    def lr(*argv):
        return mezo_learning_rate(build_parser().parse_args(list(argv)))

    assert lr("finetune") == 1e-3  # smollm2-135m, the default model
    assert lr("finetune", "--model", "gemma3-270m") == 1e-4  # 1e-3 and 3e-4 diverged on Gemma-3-270M
    assert lr("finetune", "--model", "gemma3-270m", "--learning-rate", "0.002") == 0.002
    assert lr("finetune", "--model", "some/model.gguf") == 1e-3
    assert lr("reference-mezo", "--model", "gemma3-270m") == 1e-4


def test_lora_fa_trains_only_b_and_num_layers_puts_lora_on_the_last_blocks(tiny_gguf, sentiment_dir, tmp_path, capsys):
    out = tmp_path / "fa"
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, out, 4, "--lora-fa", "--num-layers", "1"))
    trained = LoraAdapter.load(out / "adapter.gguf").tensors
    assert sorted(trained) == ["blk.1.attn_k.weight.lora_a", "blk.1.attn_k.weight.lora_b",
                               "blk.1.attn_v.weight.lora_a", "blk.1.attn_v.weight.lora_b"]  # tiny model: 2 blocks
    from edgezo.adapter import LoraConfig, read_base_model_info
    initial = LoraAdapter.init(read_base_model_info(tiny_gguf), LoraConfig(layers=(-1, None)), seed=0).tensors
    for name, value in trained.items():
        if name.endswith("lora_a"):
            np.testing.assert_array_equal(value, initial[name])  # A frozen at its init
        else:
            assert np.abs(value).max() > 0  # B trained
    config = json.loads((out / "config.json").read_text())
    assert config["lora"]["layers"] == [-1, None] and config["train"]["freeze_lora_a"] is True


def test_layers_range_and_bad_layer_flags(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "r", 1, "--layers", "0:1"))
    assert {k.split(".")[1] for k in LoraAdapter.load(tmp_path / "r" / "adapter.gguf").tensors} == {"0"}
    for flags, message in ((["--layers", "5:9"], "select no block of a 2-block model"),
                           (["--layers", "x"], "--layers: expected START:STOP"),
                           (["--num-layers", "1", "--layers", "0:1"], "give one"),
                           (["--num-layers", "0"], "--num-layers must be >= 1")):
        assert main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "bad", 1, *flags)) == 1
        assert message in capsys.readouterr().err


def test_fzoo_resume_reproduces_the_uninterrupted_run_bit_for_bit(tiny_gguf, sentiment_dir, tmp_path, capsys):
    extra = ("--estimator", "fzoo", "--n-directions", "3", "--lora-fa")
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "full", 5, *extra))
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "split", 2, *extra))
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "split", 5, "--resume", *extra))
    full = LoraAdapter.load(tmp_path / "full" / "adapter.gguf").tensors
    split = LoraAdapter.load(tmp_path / "split" / "adapter.gguf").tensors
    for k in full:
        np.testing.assert_array_equal(full[k], split[k])
    steps = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(e["seeds"]) == 3 and "loss_0" in e for e in steps if "loss" in e)
    assert main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "full", 6, "--resume")) == 1  # estimator changed
    assert "mezo.estimator: 'fzoo' -> 'mezo'" in capsys.readouterr().err


def test_conmezo_resume_with_its_momentum_reproduces_the_uninterrupted_run_bit_for_bit(tiny_gguf, sentiment_dir,
                                                                                      tmp_path, capsys):
    extra = ("--estimator", "conmezo", "--cone-momentum", "0.5", "--save-every", "1")
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "full", 6, *extra))
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "split", 3, *extra))
    state = json.loads((tmp_path / "split" / "state.json").read_text())
    assert state["optimizer"] == "checkpoint-000003.optimizer.npz"
    assert sorted(p.name for p in (tmp_path / "split").glob("checkpoint-*")) == sorted(
        [state["checkpoint"], state["optimizer"], state["best"]])
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "split", 6, "--resume", *extra))
    full = LoraAdapter.load(tmp_path / "full" / "adapter.gguf").tensors
    split = LoraAdapter.load(tmp_path / "split" / "adapter.gguf").tensors
    for k in full:
        np.testing.assert_array_equal(full[k], split[k])
    # a changed momentum file is refused; one with the momentum zeroed (and its hash updated) resumes to another
    # adapter: the momentum carries the run
    cold = tmp_path / "cold"
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, cold, 3, *extra))
    saved = cold / "checkpoint-000003.optimizer.npz"
    with np.load(saved) as arrays:
        zeros = {k: np.zeros_like(arrays[k]) for k in arrays.files}
    with open(saved, "wb") as f:
        np.savez(f, **zeros)
    assert main(finetune_args(tiny_gguf, sentiment_dir, cold, 6, "--resume", *extra)) == 1
    assert "changed since it was written" in capsys.readouterr().err
    state = json.loads((cold / "state.json").read_text())
    (cold / "state.json").write_text(json.dumps({**state, "optimizer_sha256": sha256_file(saved)}))
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, cold, 6, "--resume", *extra))
    restarted = LoraAdapter.load(cold / "adapter.gguf").tensors
    assert any(not np.array_equal(full[k], restarted[k]) for k in full)


def test_a_config_written_before_the_new_keys_still_resumes(tiny_gguf, sentiment_dir, tmp_path, capsys):
    out = tmp_path / "old"
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, out, 2))
    config = json.loads((out / "config.json").read_text())
    del config["lora"]["layers"], config["mezo"]["estimator"], config["train"]["freeze_lora_a"]
    (out / "config.json").write_text(json.dumps(config))
    assert run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, out, 3, "--resume"))["steps"] == 3


def test_distributed_refuses_fzoo_and_lora_fa(tiny_gguf, sentiment_dir, tmp_path, capsys):
    for flags in (["--lora-fa"], ["--estimator", "fzoo"]):
        assert main(finetune_args(tiny_gguf, sentiment_dir, tmp_path / "d", 2, "--workers", "2", *flags)) == 1
        assert "distributed MeZO runs a two-sided estimator (mezo, conmezo)" in capsys.readouterr().err


def test_command_line_parses_back_to_the_same_arguments():
    """What a local rank process is started with (edgezo.distributed.launch_local): the same Namespace."""
    parser = build_parser()
    argv = ["finetune", "--model", "m.gguf", "--steps", "7", "--learning-rate", "0.0003", "--no-mask-prompt",
            "--lora-fa", "--workers", "2", "--max-memory", "2G", "--targets", "attn_q,attn_v", "--alpha", "8"]
    args = parser.parse_args(argv)
    line = command_line("finetune", args)
    assert vars(parser.parse_args(line)) == vars(args)
    assert "--json" not in line and "--seed" not in line  # defaults are left to the rank's own parser


def test_finetune_spec_defaults_are_the_command_lines():
    """edgezo.session.FinetuneSpec (the library's options) and `edgezo finetune`'s parser agree on every default,
    and a parsed command line converts to the spec field for field."""
    import dataclasses

    from edgezo.cli import build_parser
    from edgezo.session import FinetuneSpec

    parsed = vars(build_parser().parse_args(["finetune"]))
    fields = {f.name for f in dataclasses.fields(FinetuneSpec)}
    assert fields == set(parsed) - {"command", "config", "json"}
    assert {name: getattr(FinetuneSpec(), name) for name in fields} == {name: parsed[name] for name in fields}
    args = build_parser().parse_args(["finetune", "--steps", "7", "--lora-fa", "--layers", "2:4"])
    spec = FinetuneSpec.from_options(args)
    assert (spec.steps, spec.lora_fa, spec.layers) == (7, True, "2:4")


def auto_rate_args(tiny_gguf, sentiment_dir, out, steps, *extra):
    args = finetune_args(tiny_gguf, sentiment_dir, out, steps, *extra)
    args[args.index("--learning-rate") + 1] = "auto"
    return args


def test_the_auto_rate_resumes_bit_for_bit_from_its_step_log(tiny_gguf, sentiment_dir, tmp_path, capsys):
    full = run_json(capsys, auto_rate_args(tiny_gguf, sentiment_dir, tmp_path / "full", 6))
    run_json(capsys, auto_rate_args(tiny_gguf, sentiment_dir, tmp_path / "split", 3))
    resumed = run_json(capsys, auto_rate_args(tiny_gguf, sentiment_dir, tmp_path / "split", 6, "--resume"))
    assert resumed["steps"] == full["steps"] == 6
    for name in ("adapter.gguf", "adapter.last.gguf", "adapter.best.gguf"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "split" / name).read_bytes(), name
    steps = [[(e["lr"], e["projected_grads"]) for e in RunDir(tmp_path / d).events() if "lr" in e] for d in ("full", "split")]
    assert steps[0] == steps[1] and len({lr for lr, _ in steps[0]}) > 1  # the rate moved with the gradients' scale
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["mezo"]["learning_rate"] == "auto" and config["train"]["rollback"] is True


def test_a_fixed_rate_does_not_roll_back_unless_asked(tiny_gguf, sentiment_dir, tmp_path, capsys):
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "fixed", 2))
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "asked", 2, "--rollback"))
    rollback = {d: json.loads((tmp_path / d / "config.json").read_text())["train"]["rollback"] for d in ("fixed", "asked")}
    assert rollback == {"fixed": False, "asked": True}
