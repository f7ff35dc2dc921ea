"""The memory accountant (edgezo.memory) and the device profiles."""

import dataclasses
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info
from edgezo.files import EdgezoError
from edgezo.memory import (F16_BYTES, F32_BYTES, kv_cache_bytes, kv_cells, predict_llama_cpp, read_model_shape,
                           weights_bytes)

ROOT = Path(__file__).parent.parent
PROFILES = ROOT / "device_profiles"
REQUIRED_PROFILES = ["android-4gb", "android-8gb", "iphone-8gb", "raspberry-pi-5-4gb", "raspberry-pi-5-8gb",
                     "raspberry-pi-zero-2w", "jetson-orin-nano-8gb", "laptop-8gb", "laptop-16gb", "ci-2core-24gb"]


def test_weights_term_is_the_sum_of_tensor_bytes_gguf_reader_sees(tiny_gguf):
    from gguf import GGUFReader

    expected = sum(int(t.n_bytes) for t in GGUFReader(tiny_gguf).tensors)
    assert weights_bytes(read_model_shape(tiny_gguf)) == expected
    assert predict_llama_cpp(tiny_gguf, "inference", 2, 64).breakdown["weights_mapped_bytes"] == expected


def test_kv_cache_is_linear_in_batch_and_layers(tiny_gguf):
    shape = read_model_shape(tiny_gguf)
    one = kv_cache_bytes(shape, 1, 256)
    assert kv_cache_bytes(shape, 8, 256) == 8 * one
    assert kv_cache_bytes(dataclasses.replace(shape, n_layers=3 * shape.n_layers), 1, 256) == 3 * one
    # K and V: n_head_kv x head_dim F16 values each, per layer and cell
    assert one == shape.n_layers * 256 * 2 * shape.n_head_kv * (shape.n_embd // shape.n_head) * F16_BYTES
    assert kv_cache_bytes(shape, 1, 256, F32_BYTES) == 2 * one


@pytest.mark.parametrize("n_ctx_per_seq, cells_per_seq", [
    (64, 256),  # llama.cpp gives each sequence at least 256 cells
    (256, 256),
    (300, 512),  # and rounds up to a multiple of 256 (seen in its log: 4 seqs x 300 -> 512 cells each)
    (1000, 1024),
])
def test_kv_cells_are_padded_per_sequence(n_ctx_per_seq, cells_per_seq):
    assert kv_cells(4, n_ctx_per_seq) == 4 * cells_per_seq


def test_mezo_prediction_is_inference_plus_adapter_terms(tiny_gguf):
    lora = LoraConfig(rank=4, alpha=8.0, targets=("attn_q", "attn_v"))
    inference = predict_llama_cpp(tiny_gguf, "inference", 4, 64, n_tokens_per_seq=20)
    mezo = predict_llama_cpp(tiny_gguf, "mezo", 4, 64, lora, n_tokens_per_seq=20)
    n_params = LoraAdapter.init(read_base_model_info(tiny_gguf), lora, seed=0).n_params
    assert mezo.breakdown["lora_backend_bytes"] == 4 * n_params  # one float32 copy in llama.cpp
    assert mezo.breakdown["lora_host_bytes"] == 2 * 4 * n_params  # theta + init temporaries kept by the heap
    for term, value in inference.breakdown.items():
        if term == "compute_bytes":  # LoRA adds A x and B (A x) to each targeted layer's activations
            assert mezo.breakdown[term] > value
        else:
            assert mezo.breakdown[term] == value, term
    adapter_terms = {k: v for k, v in mezo.breakdown.items() if k not in inference.breakdown}
    assert set(adapter_terms) == {"lora_host_bytes", "lora_backend_bytes", "lora_perturbation_bytes",
                                 "adapter_setup_excess_bytes"}
    extra_compute = mezo.breakdown["compute_bytes"] - inference.breakdown["compute_bytes"]
    assert mezo.total_bytes == inference.total_bytes + sum(adapter_terms.values()) + extra_compute
    assert sum(mezo.breakdown.values()) == mezo.total_bytes


def test_worst_case_is_the_default_and_larger(tiny_gguf):
    worst = predict_llama_cpp(tiny_gguf, "inference", 4, 256)
    assert worst == predict_llama_cpp(tiny_gguf, "inference", 4, 256, n_tokens_per_seq=256)
    assert worst.total_bytes > predict_llama_cpp(tiny_gguf, "inference", 4, 256, n_tokens_per_seq=10).total_bytes


@pytest.mark.parametrize("kwargs", [
    dict(method="training"),  # only inference and mezo are accounted
    dict(batch_size=0),
])
def test_bad_arguments_are_user_errors(tiny_gguf, kwargs):
    args = dict(method="inference", batch_size=2, n_ctx_per_seq=64) | kwargs
    with pytest.raises(EdgezoError):
        predict_llama_cpp(tiny_gguf, **args)


def test_not_a_gguf_is_a_user_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(EdgezoError, match="x.gguf"):
        predict_llama_cpp(bad, "inference", 1, 64)


def test_accountant_imports_neither_torch_nor_llama_cpp():
    code = "import sys, edgezo.memory; print(sorted(m for m in ('torch', 'llama_cpp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_device_profiles_parse_and_are_consistent():
    found = {p.stem: tomllib.loads(p.read_text()) for p in PROFILES.glob("*.toml")}
    assert set(REQUIRED_PROFILES) <= set(found)
    for stem, profile in found.items():
        assert profile["kind"] in ("phone", "sbc", "laptop", "server"), stem
        assert isinstance(profile["name"], str) and profile["name"], stem
        assert 0 < profile["usable_ram_bytes"] <= profile["total_ram_bytes"], stem
        assert len(profile["usable_ram_source"].strip()) > 20, stem
        assert isinstance(profile["cores"], int) and profile["cores"] >= 1, stem
        assert profile["cpu"].strip(), stem
    assert found["raspberry-pi-zero-2w"]["total_ram_bytes"] == 512 * 2**20
    assert found["ci-2core-24gb"]["cores"] == 2


_MEASURE = textwrap.dedent("""
    import json, sys
    from edgezo import store, adapter, data, mezo, objective  # what an edgezo process imports (the baseline term)
    from edgezo.engine import Engine, EngineConfig
    from edgezo.files import peak_rss_bytes
    adapter.read_base_model_info(sys.argv[1])  # the CLI reads the header first (imports gguf: part of the baseline)
    batch_size, n_ctx, n_tokens = 4, 64, 24
    engine = Engine(sys.argv[1], EngineConfig(n_seq_max=batch_size, n_ctx_per_seq=n_ctx, n_threads=2))
    tokens = [[10 + (i + j) % 200 for j in range(n_tokens)] for i in range(batch_size)]
    for _ in range(3):
        engine.logits(tokens, [[n_tokens - 1]] * batch_size)
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
""")


def test_prediction_is_within_10_percent_of_a_fresh_process(tiny_gguf):
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tiny_gguf)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    if measured == 0:
        pytest.skip("no /proc/self/status VmHWM on this platform")
    predicted = predict_llama_cpp(tiny_gguf, "inference", 4, 64, n_tokens_per_seq=24).total_bytes
    assert abs(predicted / measured - 1) <= 0.10, (predicted / 2**20, measured / 2**20)
