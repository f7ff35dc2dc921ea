"""The capacity analysis (edgezo.capacity): model family data, largest-fitting choice, the CLI."""

import contextlib
import io
import json
import math

import pytest

from edgezo.adapter import LoraConfig
from edgezo.capacity import METHODS, capacity, largest_fitting, load_specs, predicted_bytes, prediction_table
from edgezo.files import EdgezoError
from edgezo.memory import load_device_profile, gguf_tensor_dims, predict_llama_cpp, predict_torch, shape_from_spec

SPECS = load_specs()
BATCH, SEQ = 16, 64


@pytest.fixture(scope="module")
def table():
    return prediction_table(SPECS, BATCH, SEQ, LoraConfig())


def test_families_cover_the_issue_and_match_published_parameter_counts():
    names = {s.name for s in SPECS}
    assert {"SmolLM2-135M", "SmolLM2-360M", "SmolLM2-1.7B", "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B", "Qwen2.5-7B",
            "Llama-3.2-1B", "Llama-3.2-3B", "Gemma-3-270M", "Gemma-3-1B", "Gemma-3-4B"} <= names
    for spec in SPECS:  # the architecture numbers reproduce each model's published total
        assert sum(math.prod(d) for d in gguf_tensor_dims(spec).values()) == spec.params, spec.name
    assert [s.params for s in SPECS] == sorted(s.params for s in SPECS)


def test_predictions_are_the_memory_accountants(table):
    spec, lora = SPECS[0], LoraConfig()
    assert table[spec.name]["mezo-q4_0"] == predict_llama_cpp(shape_from_spec(spec, "q4_0"), "mezo", BATCH, SEQ, lora).total_bytes
    # BP as reference-bp --release-freed-memory runs it: the lean form, the largest model BP fits
    assert table[spec.name]["bp-bf16-lora-ckpt"] == predict_torch(shape_from_spec(spec, "f32"), "bp-ckpt", BATCH, SEQ, lora,
                                                                  dtype="bfloat16", release_freed=True).total_bytes
    full = predict_torch(shape_from_spec(spec, "f32"), "bp", BATCH, SEQ, full=True, release_freed=True)
    assert table[spec.name]["bp-f32-full"] == full.total_bytes and full.breakdown["heap_retention_bytes"] == 0


def test_prediction_grows_with_the_model(table):
    for m in METHODS:
        same_family = [s for s in SPECS if s.family == "qwen2.5"]
        values = [table[s.name][m.key] for s in same_family]
        assert values == sorted(values), m.key


def test_checkpointing_and_lora_never_fit_less(table):
    for s in SPECS:
        row = table[s.name]
        for dtype in ("f32", "bf16"):
            for kind in ("lora", "full"):
                assert row[f"bp-{dtype}-{kind}-ckpt"] <= row[f"bp-{dtype}-{kind}"], (s.name, dtype, kind)
            assert row[f"bp-{dtype}-lora"] < row[f"bp-{dtype}-full"]
        assert row["bp-q4_0-lora-ckpt"] <= row["bp-q4_0-lora"] < row["bp-f32-lora"]  # the blocks hold less than f32


@pytest.mark.parametrize("method", [m.key for m in METHODS])
def test_answer_is_the_boundary_of_the_predictions(table, method):
    """Budget = a model's predicted peak: that model (or a larger one that also fits) is chosen; one byte less: not."""
    for spec in SPECS[::3]:
        budget = table[spec.name][method]
        chosen = largest_fitting(SPECS, table, method, budget)
        assert chosen is not None and chosen.params >= spec.params
        assert all(table[s.name][method] > budget for s in SPECS if s.params > chosen.params)
        below = largest_fitting(SPECS, table, method, budget - 1)
        assert below is None or below.name != spec.name


def test_capacity_result_and_ratios():
    result = capacity(8 * 2**30, SPECS, BATCH, SEQ)
    mezo = result["methods"]["mezo-q4_0"]
    assert mezo["predicted_bytes"] <= 8 * 2**30
    for key, ratio in result["mezo_over_bp"].items():
        bp = result["methods"][key]
        assert ratio is None if not bp["params"] else ratio == pytest.approx(mezo["params"] / bp["params"])
    assert result["mezo_over_bp"]["bp-f32-lora"] >= 1  # MeZO on Q4_0 fits at least the model BP f32 fits
    bp_keys = [m.key for m in METHODS if not m.is_mezo]
    best = result["methods"][result["best_bp"]]
    assert best["params"] == max(result["methods"][k]["params"] for k in bp_keys)
    assert result["mezo_over_best_bp"] == min(r for r in result["mezo_over_bp"].values() if r is not None)
    tied = [k for k in bp_keys if result["methods"][k]["params"] == best["params"]]
    assert best["predicted_bytes"] == min(result["methods"][k]["predicted_bytes"] for k in tied)
    small, large = capacity(2**30, SPECS), capacity(16 * 2**30, SPECS)
    for key in small["methods"]:
        assert small["methods"][key]["params"] <= large["methods"][key]["params"], key


def test_unknown_family_and_bad_budget_are_user_errors():
    with pytest.raises(EdgezoError, match="unknown model family"):
        load_specs(["nope"])
    with pytest.raises(EdgezoError):
        capacity(0, SPECS)
    assert {s.family for s in load_specs(["gemma3"])} == {"gemma3"}


def _cli(*argv):
    from edgezo.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["capacity", *argv])
    return code, buf.getvalue()


def test_cli_json_keys():
    code, out = _cli("--device", "raspberry-pi-5-8gb", "--family", "smollm2,qwen2.5", "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert {"device", "usable_ram_bytes", "methods", "mezo_over_bp", "predictions", "batch_size", "seq_len"} <= set(result)
    assert set(result["methods"]) == {m.key for m in METHODS}
    assert set(result["predictions"]) == {s.name for s in load_specs(["smollm2", "qwen2.5"])}
    fitted = result["methods"]["mezo-q4_0"]
    spec = next(s for s in SPECS if s.name == fitted["model"])
    pi5 = load_device_profile("raspberry-pi-5-8gb").llama_cpp_system_info  # the Pi's build, not this machine's
    assert fitted["predicted_bytes"] == predicted_bytes(spec, METHODS[0], 16, 64, LoraConfig(), pi5)
    # on ARM the tied output's Q6_K copy of token_embd is repacked, on x86 it is not
    assert fitted["predicted_bytes"] > predicted_bytes(spec, METHODS[0], 16, 64, LoraConfig())


def test_cli_unknown_device_or_family_exit_1(capsys):
    assert _cli("--device", "no-such-device")[0] == 1
    assert "unknown device profile" in capsys.readouterr().err
    assert _cli("--device", "laptop-8gb", "--family", "gpt5")[0] == 1
    assert "unknown model family" in capsys.readouterr().err
