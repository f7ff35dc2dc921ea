"""The memory accountant (edgezo.memory) and the device profiles."""

import dataclasses
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from edgezo import kernels
from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info
from edgezo.capacity import load_specs
from edgezo.files import EdgezoError
from edgezo.memory import (ANY_BUILD_SYSTEM_INFO, CALIBRATION_SYSTEM_INFO, F16_BYTES, F32_BYTES, MIB, kv_cache_bytes,
                           kv_cells, load_device_profile, predict_llama_cpp, read_model_shape, repack_bytes,
                           shape_from_spec, weights_bytes)

ROOT = Path(__file__).parent.parent
PROFILES = ROOT / "edgezo" / "device_profiles"
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
    # ConMeZO keeps one more float32 copy of the adapter: its momentum
    conmezo = predict_llama_cpp(tiny_gguf, "mezo", 4, 64, lora, n_tokens_per_seq=20, momentum=True)
    assert conmezo.total_bytes - mezo.total_bytes == conmezo.breakdown["momentum_bytes"] == 4 * n_params


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
    for stem in ("raspberry-pi-5-4gb", "raspberry-pi-5-8gb", "android-4gb", "android-8gb", "raspberry-pi-zero-2w"):
        assert kernels.build_features(found[stem]["llama_cpp_system_info"])["NEON"] == "1", stem  # an ARM build
    assert kernels.build_features(found["ci-2core-24gb"]["llama_cpp_system_info"])["AVX512"] == "1"
    assert load_device_profile("iphone-8gb").llama_cpp_system_info == ANY_BUILD_SYSTEM_INFO  # the build is not known


A76_BUILD = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"
A53_BUILD = "CPU : NEON = 1 | ARM_FMA = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"  # no dotprod: no repack


def test_repacked_weights_follow_the_builds_rules_and_the_tied_outputs_copy():
    """SmolLM2-135M Q4_0 (tied embeddings, token_embd Q8_0): x86 repacks the Q4_0 blocks only; an ARM dotprod build
    also the Q8_0 copy of token_embd llama.cpp loads as the output matrix (measured under qemu: 85.6 MiB against
    56.95 on x86, tools/arm64-check); without dotprod or without REPACK, nothing."""
    spec = next(s for s in load_specs(["smollm2"]) if s.name == "SmolLM2-135M")
    shape = shape_from_spec(spec, "q4_0")
    blocks = sum(b for n, b in shape.tensor_bytes.items() if n.startswith("blk.") and len(shape.linear_shapes.get(n, ())) == 2)
    embd = shape.tensor_bytes["token_embd.weight"]
    assert repack_bytes(shape, CALIBRATION_SYSTEM_INFO) == blocks
    assert repack_bytes(shape, A76_BUILD) == blocks + embd
    assert repack_bytes(shape, A76_BUILD) / MIB == pytest.approx(85.64, abs=0.01)
    assert repack_bytes(shape, A53_BUILD) == 0
    assert repack_bytes(shape, A76_BUILD.replace("REPACK = 1", "REPACK = 0")) == 0
    assert repack_bytes(shape, ANY_BUILD_SYSTEM_INFO) == blocks + embd  # the upper bound
    untied = shape_from_spec(dataclasses.replace(spec, tied=False), "q4_0")  # output.weight its own (Q8_0) tensor
    assert repack_bytes(untied, A76_BUILD) == blocks + untied.tensor_bytes["output.weight"]
    assert repack_bytes(untied, CALIBRATION_SYSTEM_INFO) == blocks
    on_pi = predict_llama_cpp(shape, "mezo", 4, 64, system_info=A76_BUILD)
    assert on_pi.total_bytes - predict_llama_cpp(shape, "mezo", 4, 64).total_bytes == embd


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



# ---- shapes from an architecture (capacity analysis) -----------------------------------------------------------------
def _spec_of(shape, name="m"):
    from edgezo.memory import ModelSpec

    return ModelSpec(name=name, architecture=shape.architecture, n_layers=shape.n_layers, hidden=shape.n_embd,
                     intermediate=shape.n_ff, n_heads=shape.n_head, n_kv_heads=shape.n_head_kv, head_dim=shape.key_length,
                     vocab=shape.n_vocab, tied=shape.tied_embeddings)


def test_shape_from_spec_reproduces_the_gguf_header(tiny_gguf):
    from edgezo.memory import shape_from_spec

    read = read_model_shape(tiny_gguf)
    assert shape_from_spec(_spec_of(read), "f32") == read  # every tensor's name, dims, type and bytes
    assert predict_llama_cpp(shape_from_spec(_spec_of(read), "f32"), "mezo", 4, 64) == predict_llama_cpp(tiny_gguf, "mezo", 4, 64)


@pytest.mark.real_model
@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
def test_shape_from_spec_matches_llama_cpp_quantizer_on_smollm2(quant):
    from edgezo import store
    from edgezo.capacity import load_specs
    from edgezo.memory import shape_from_spec

    spec = next(s for s in load_specs(["smollm2"]) if s.name == "SmolLM2-135M")
    assert shape_from_spec(spec, quant) == read_model_shape(store.resolve_model("smollm2-135m", quant))


# ---- the torch BP terms ----------------------------------------------------------------------------------------------
def test_bp_terms_behave(tiny_gguf):
    from edgezo.memory import predict_torch

    shape = read_model_shape(tiny_gguf)
    bp = predict_torch(shape, "bp", 4, 64)
    assert sum(bp.breakdown.values()) == bp.total_bytes
    assert predict_torch(shape, "bp-ckpt", 4, 64).breakdown["activations_bytes"] < bp.breakdown["activations_bytes"]
    for bigger in (dict(batch_size=8, seq_len=64), dict(batch_size=4, seq_len=128)):
        assert predict_torch(shape, "bp", **bigger).total_bytes > bp.total_bytes
    assert bp.breakdown["activations_bytes"] * 2 == predict_torch(shape, "bp", 8, 64).breakdown["activations_bytes"]
    all_targets = LoraConfig(targets=("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))
    assert predict_torch(shape, "bp", 4, 64, all_targets).total_bytes > bp.total_bytes
    full = predict_torch(shape, "bp", 4, 64, full=True)
    assert full.breakdown["trainable_state_bytes"] == 3 * 4 * shape.n_params  # gradient + two AdamW moments
    bf16 = predict_torch(shape, "bp", 4, 64, dtype="bfloat16")
    assert bf16.breakdown["activations_bytes"] < bp.breakdown["activations_bytes"]


def test_bp_on_a_quantized_base_counts_the_files_blocks(tiny_gguf, tmp_path):
    from edgezo.engine import quantize_gguf
    from edgezo.memory import predict_torch

    q4 = tmp_path / "tiny.q4_0.gguf"
    quantize_gguf(tiny_gguf, q4, "q4_0", n_threads=1)
    shape, float_shape = read_model_shape(q4), read_model_shape(tiny_gguf)
    bp, quant = predict_torch(float_shape, "bp", 4, 64), predict_torch(shape, "bp-quant", 4, 64)
    linears = [n for n in shape.linear_shapes if n.startswith("blk.")]
    assert quant.breakdown["quant_blocks_bytes"] == sum(shape.tensor_bytes[n] for n in linears)
    assert "weights_bytes" not in quant.breakdown and quant.total_bytes < bp.total_bytes
    for term in ("activations_bytes", "trainable_state_bytes", "backward_bytes", "heap_retention_bytes"):
        assert quant.breakdown[term] == bp.breakdown[term], term  # the same LoRA and activations as float BP
    assert (predict_torch(shape, "bp-quant-ckpt", 4, 64).breakdown["activations_bytes"]
            == predict_torch(float_shape, "bp-ckpt", 4, 64).breakdown["activations_bytes"])
    with pytest.raises(EdgezoError, match="quantized base"):
        predict_torch(shape, "bp-quant", 4, 64, dtype="bfloat16")


def test_an_untied_output_layer_counts_only_for_a_language_modelling_loss():
    from edgezo.capacity import load_specs
    from edgezo.memory import quantized_base_terms, shape_from_spec

    spec = next(s for s in load_specs(["qwen2.5-coder"]) if not s.tied)
    shape = shape_from_spec(spec, "q4_0")
    classify, lm = quantized_base_terms(shape, False), quantized_base_terms(shape, True)
    assert lm["quant_blocks_bytes"] - classify["quant_blocks_bytes"] == shape.tensor_bytes["output.weight"]
    assert lm["dequant_buffers_bytes"] - classify["dequant_buffers_bytes"] == int(5.125 * spec.vocab * spec.hidden)
    assert classify["float_weights_bytes"] == lm["float_weights_bytes"] > 4 * spec.vocab * spec.hidden


@pytest.mark.parametrize("kwargs", [dict(method="mezo"), dict(dtype="float16"), dict(batch_size=0)])
def test_bp_bad_arguments_are_user_errors(tiny_gguf, kwargs):
    from edgezo.memory import predict_torch

    with pytest.raises(EdgezoError):
        predict_torch(read_model_shape(tiny_gguf), **(dict(method="bp", batch_size=2, seq_len=16) | kwargs))


def test_run_batches_follow_the_training_order():
    from edgezo.data import batch_indices
    from edgezo.memory import run_batches

    train = [tuple(range(i, i + 5 + (7 * i) % 23)) for i in range(40)]
    evaluated = [(1000,) * 50] * 4 + [(7,)]
    batches = run_batches(train, 4, seed=3, steps=6, evaluated=evaluated)
    expected = max(max(len(train[i]) for i in batch_indices(40, 4, 3, s)) for s in range(6))
    assert batches.padded_len == expected
    assert batches.max_batch_tokens == 200  # the first validation batch is the fullest
    assert run_batches(train, 4, 3, 1).padded_len <= batches.padded_len
    assert 1000 in batches.token_ids and 7 in batches.token_ids
    used = {t for s in range(6) for i in batch_indices(40, 4, 3, s) for t in train[i]}
    assert batches.token_ids == used | {1000, 7}


def test_embedding_pages_read_follow_the_tokens(tiny_gguf):
    from edgezo.memory import EMBEDDING_READ_WINDOW_BYTES, embedding_bytes_read, predict_torch

    shape = read_model_shape(tiny_gguf)
    table = shape.n_vocab * shape.n_embd * F32_BYTES
    assert embedding_bytes_read(shape, []) == 0
    assert embedding_bytes_read(shape, [0]) == EMBEDDING_READ_WINDOW_BYTES or table < EMBEDDING_READ_WINDOW_BYTES
    assert embedding_bytes_read(shape, range(shape.n_vocab)) == table
    worst = predict_torch(shape, "bp", 2, 16).breakdown["weights_bytes"]
    assert worst == 4 * shape.n_params
    assert predict_torch(shape, "bp", 2, 16, token_ids=[]).breakdown["weights_bytes"] == worst - table


SAVED = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from edgezo import reference
    from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info
    from edgezo.data import Example, Format, Task
    gguf, dtype, targets = sys.argv[1], sys.argv[2], tuple(sys.argv[3].split(","))
    base = read_base_model_info(gguf)
    adapter = LoraAdapter.init(base, LoraConfig(rank=4, alpha=8, targets=targets), seed=0)
    model = reference.load_model(Path(gguf), adapter, base, reference.ReferenceConfig(dtype=dtype))
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}
    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    task = Task(format=Format.CLASSIFICATION, labels=("a", "b"), label_token_ids=(10, 11))
    batch = [Example(tuple(range(20, 52)), target_start=32, label=i % 2) for i in range(3)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference.batch_loss(reference.TorchScorer(model), batch, task)
    print(json.dumps({"saved_bytes": sum(saved.values())}))
""")


@pytest.mark.parametrize("dtype, targets", [("float32", "attn_k,attn_v"), ("bfloat16", "attn_k,attn_v"),
                                            ("float32", "attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down"),
                                            ("bfloat16", "attn_q,attn_output,ffn_up,ffn_down")])
def test_stored_activations_are_what_autograd_saves(tiny_gguf, dtype, targets):
    """The analytic per-token count against torch's own saved-tensor hooks on the reference's forward (3 x 32 tokens)."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from edgezo.memory import torch_saved_bytes_per_token_layer

    out = subprocess.run([sys.executable, "-c", SAVED, str(tiny_gguf), dtype, targets], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["saved_bytes"]
    shape = read_model_shape(tiny_gguf)
    lora = LoraConfig(rank=4, alpha=8.0, targets=tuple(targets.split(",")))
    predicted = 3 * 32 * shape.n_layers * torch_saved_bytes_per_token_layer(shape, lora, dtype)
    # not counted: RoPE tables, the first block's input norm (nothing before it needs a gradient), the head's rows
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured)


def test_memory_cli_predicts_the_runs_own_batches(tiny_gguf, sentiment_dir):
    from edgezo.cli import main

    def run(*extra):
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["memory", "--model", str(tiny_gguf), "--quant", "none", "--batch-size", "4", "--json", *extra]) == 0
        return json.loads(buf.getvalue().strip().splitlines()[-1])

    worst = run("--method", "bp", "--max-seq-len", "64")
    assert worst["seq_len"] == 64 and worst["method"] == "bp" and worst["dtype"] == "float32"
    assert {"predicted_bytes", "breakdown", "method", "seq_len"} <= set(worst)
    data = run("--method", "bp", "--max-seq-len", "64", "--data", str(sentiment_dir), "--steps", "3")
    assert data["seq_len"] < 64  # the tiny reviews are a few tokens long
    assert data["predicted_bytes"] < worst["predicted_bytes"]
    assert run("--method", "bp", "--gradient-checkpointing", "--max-seq-len", "64")["method"] == "bp-ckpt"
    released = run("--method", "bp", "--max-seq-len", "64", "--release-freed-memory")  # no heap retention, else the same
    assert worst["breakdown"]["heap_retention_bytes"] > 0 and released["breakdown"]["heap_retention_bytes"] == 0
    assert released["predicted_bytes"] == worst["predicted_bytes"] - worst["breakdown"]["heap_retention_bytes"]
    assert run("--method", "mezo", "--max-seq-len", "64")["predicted_bytes"] < worst["predicted_bytes"]
    # an f32 file has no blocks to train BP on
    assert main(["memory", "--model", str(tiny_gguf), "--quant", "none", "--method", "bp-quant"]) == 1


def test_memory_cli_bp_quant_is_reference_bp_with_base_dtype(tiny_gguf, tmp_path):
    import contextlib
    import io

    from edgezo.cli import main
    from edgezo.engine import quantize_gguf

    q8 = tmp_path / "tiny.q8_0.gguf"
    quantize_gguf(tiny_gguf, q8, "q8_0", n_threads=1)

    def run(*extra):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["memory", "--model", str(q8), "--batch-size", "4", "--max-seq-len", "64", "--json", *extra]) == 0
        return json.loads(buf.getvalue().strip().splitlines()[-1])

    quant = run("--method", "bp-quant", "--gradient-checkpointing")
    assert quant["method"] == "bp-quant-ckpt" and "quant_blocks_bytes" in quant["breakdown"]
    assert run("--method", "bp", "--base-dtype", "q8_0", "--gradient-checkpointing") == quant
    assert run("--method", "bp")["predicted_bytes"] > quant["predicted_bytes"]


# ---- language-modelling data: terms that grow with the scored positions ---------------------------------------------
@pytest.mark.parametrize("lengths, outputs, n_ubatch, expected, reason", [
    ([10, 10], [[9], [9]], 1024, (2, 2), "classification: the last position of each, one micro-batch"),
    ([10, 10], [[9], [9]], 8, (2, 2), "split_equal takes 4 + 4, 4 + 4, 2 + 2 tokens: both last positions in the third"),
    ([10, 10], [list(range(2, 9))] * 2, 8, (14, 8), "targets at 2..8: 2..3 in the first, 4..7 in the second (8)"),
    ([4, 12], [[1, 2], list(range(12))], 8, (14, 8), "the second sequence's 8 tokens after the first runs out"),
    ([6], [list(range(6))], 4, (6, 4), "one stream: split_simple, 4 then 2 tokens"),
])
def test_decode_outputs_follow_llama_cpp_micro_batches(lengths, outputs, n_ubatch, expected, reason):
    from edgezo.memory import decode_outputs

    assert decode_outputs(lengths, outputs, n_ubatch, n_streams=len(lengths)) == expected, reason


def test_lm_terms_grow_with_the_scored_positions_as_llama_cpp_sizes_them(tiny_gguf):
    from edgezo.memory import LOGITS_ROW_FACTOR
    from edgezo.objective import chunk_rows

    shape = read_model_shape(tiny_gguf)
    row = shape.n_vocab * F32_BYTES

    def predict(n_outputs, n_ubatch_outputs, lm_loss=True):
        return predict_llama_cpp(tiny_gguf, "mezo", 4, 64, n_tokens_per_seq=60, n_outputs=n_outputs,
                                 n_ubatch_outputs=n_ubatch_outputs, lm_loss=lm_loss).breakdown

    classification = predict_llama_cpp(tiny_gguf, "mezo", 4, 64, n_tokens_per_seq=60).breakdown
    few, many = predict(40, 40), predict(200, 120)
    assert few["output_buffer_bytes"] == 40 * row  # output_reserve: max(n_outputs, n_seq_max) rows
    assert many["output_buffer_bytes"] - few["output_buffer_bytes"] == 160 * row
    assert classification["output_buffer_bytes"] == predict(3, 3)["output_buffer_bytes"] == 4 * row  # n_seq_max rows
    assert many["compute_bytes"] - few["compute_bytes"] == pytest.approx(LOGITS_ROW_FACTOR * 80 * row, abs=1)
    assert few["lm_loss_bytes"] == min(40, chunk_rows(shape.n_vocab)) * shape.n_vocab * 8
    assert "lm_loss_bytes" not in classification and "lm_loss_bytes" not in predict(40, 40, lm_loss=False)
    assert predict(4, 4, lm_loss=False) == classification  # one output per sequence is the classification case


def test_memory_cli_counts_the_completion_tokens(tiny_gguf, tmp_path):
    from tests.helpers import write_jsonl
    from edgezo.cli import main
    from edgezo.engine import Vocabulary

    def completion(n_words: int) -> str:
        return " good" * n_words  # every record alike, so every batch holds the same number of targets

    def predict(n_words: int) -> dict:
        data = tmp_path / f"completions-{n_words}"
        data.mkdir()
        records = [{"prompt": f"say {w}", "completion": completion(n_words)} for w in ("good", "bad", "fine", "dull") * 2]
        for split in ("train", "valid"):
            write_jsonl(data / f"{split}.jsonl", records)
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["memory", "--model", str(tiny_gguf), "--quant", "none", "--batch-size", "4", "--json",
                         "--method", "mezo", "--data", str(data), "--steps", "2", "--max-seq-len", "128"]) == 0
        return json.loads(buf.getvalue().strip().splitlines()[-1])["breakdown"]

    short, long = predict(2), predict(20)
    with Vocabulary(tiny_gguf) as vocab:
        more_targets = len(vocab.tokenize(completion(20), False)) - len(vocab.tokenize(completion(2), False))
    assert more_targets >= 18
    # 4 sequences per decode, each with more_targets more positions scored: as many more output-buffer rows
    row = read_model_shape(tiny_gguf).n_vocab * F32_BYTES
    assert long["output_buffer_bytes"] - short["output_buffer_bytes"] == 4 * more_targets * row
    assert long["compute_bytes"] > short["compute_bytes"] and "lm_loss_bytes" in short


def test_prefix_reuse_counts_both_parts_and_the_hidden_states(tmp_path):
    from tests.tiny_model import TinyLlama, write_tiny_llama

    from edgezo.memory import part_shape, predict_llama_cpp, read_model_shape, weights_bytes

    path = tmp_path / "tiny4.gguf"
    write_tiny_llama(path, TinyLlama(n_layers=4))
    shape = read_model_shape(path)
    full = predict_llama_cpp(shape, "mezo", 4, 64, n_tokens_per_seq=32)
    split = predict_llama_cpp(shape, "mezo", 4, 64, n_tokens_per_seq=32, split_at=3, n_cached_tokens=1000)
    prefix, suffix = part_shape(shape, range(0, 4), with_head=False), part_shape(shape, range(3, 4))
    assert split.breakdown["weights_mapped_bytes"] == weights_bytes(prefix)  # blocks 0..3, no head: the base unloaded
    assert weights_bytes(suffix) < split.breakdown["split_suffix_model_bytes"]
    assert split.breakdown["split_cache_bytes"] == 1000 * shape.n_embd * 4
    assert split.breakdown["split_hidden_bytes"] == 3 * 4 * 32 * shape.n_embd * 4
    assert split.total_bytes > full.total_bytes  # a second model and context: prefix reuse costs memory
    assert set(full.breakdown) < set(split.breakdown)


# ---- freed training memory goes back to the kernel (edgezo.files.map_large_allocations) --------------------------
FREED_ARRAY_PROBE = textwrap.dedent("""
    import sys
    import numpy as np
    from edgezo.files import current_rss_bytes, map_large_allocations
    mapped = map_large_allocations() if sys.argv[1] == "map" else None
    np.ones(24 << 20, np.uint8)  # freed at once: glibc raises its mmap threshold to it, as a model load does
    before = current_rss_bytes()
    array = np.ones(16 << 20, np.uint8)  # 16 MiB, every page touched
    held = current_rss_bytes()
    del array
    print(mapped, (held - before) >> 20, (held - current_rss_bytes()) >> 20)
""")


def freed_array_probe(mode: str, env=None) -> tuple[str, int, int]:
    """(what map_large_allocations returned, MiB a 16 MiB array added, MiB its free gave back) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", FREED_ARRAY_PROBE, mode], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc")
def test_freed_arrays_return_to_the_kernel_once_large_allocations_are_mapped():
    mapped, added, returned = freed_array_probe("map")
    assert mapped == "True" and added >= 15 and returned >= 15
    _, added, returned = freed_array_probe("default")  # glibc's own rule: the heap keeps the freed array
    assert added >= 15 and returned < 8


def test_a_threshold_the_user_chose_is_left_alone():
    import os

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="33554432")
    assert freed_array_probe("map", env)[0] == "False"


def test_the_tokenized_data_a_run_holds_is_counted(tiny_gguf, sentiment_dir, tmp_path, capsys):
    """36 B a token of every split the run reads (train and valid for MeZO): doubling the training file adds its
    tokens once more, and --method inference on the test split counts that split only."""
    from edgezo.cli import main
    from edgezo.memory import HELD_TOKEN_BYTES

    def held(data, *flags) -> int:
        assert main(["memory", "--model", str(tiny_gguf), "--data", str(data), "--quant", "none", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["breakdown"]["dataset_tokens_bytes"]

    doubled = tmp_path / "doubled"
    doubled.mkdir()
    for split in ("train", "valid", "test"):
        text = (sentiment_dir / f"{split}.jsonl").read_text()
        (doubled / f"{split}.jsonl").write_text(text * 2 if split == "train" else text)
    both, train_twice = held(sentiment_dir), held(doubled)
    train, valid = train_twice - both, both - (train_twice - both)
    assert train > 0 and valid > 0 and both % HELD_TOKEN_BYTES == 0
    assert train > 3 * valid  # 64 training reviews against 16 validation ones, of the same lengths
    assert held(sentiment_dir, "--method", "inference", "--split", "test") < train
