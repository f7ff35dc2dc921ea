"""Merged models (base + LoRA folded into one GGUF), checked against llama.cpp running the same adapter at run
time, against llama.cpp's own quantizer, and for the file-level promises (metadata copied, fallbacks recorded)."""

import numpy as np
import pytest
from gguf import GGUFReader

from edgezo.convert.merge import merge_adapter, merge_report
from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info
from edgezo.engine import Engine, EngineConfig, quantize_gguf
from edgezo.files import EdgezoError
from tests.tiny_model import TinyLlama, write_tiny_llama

CONFIG = EngineConfig(n_seq_max=1, n_ctx_per_seq=64, n_ubatch=64, n_threads=1, flash_attn=False)
ALL_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
SEQ = [40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150]  # byte tokens of the tiny vocabulary


def random_adapter(gguf, seed=0, scale=0.3, targets=ALL_TARGETS) -> LoraAdapter:
    adapter = LoraAdapter.init(read_base_model_info(gguf), LoraConfig(rank=4, alpha=8.0, targets=targets), seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, v in adapter.tensors.items():
        if name.endswith(".lora_b"):  # nonzero B: the adapter changes the model
            v[...] = rng.standard_normal(v.shape).astype(np.float32) * scale
    return adapter


def logits(gguf, adapter=None) -> np.ndarray:
    """Logits at every position of SEQ, with `adapter` applied by llama.cpp at run time."""
    with Engine(gguf, CONFIG) as engine:
        if adapter is not None:
            engine.set_adapter(adapter, in_place=False)
        return engine.logits([SEQ], [list(range(len(SEQ)))])


def test_merged_f32_equals_base_plus_runtime_adapter(tiny_gguf, tmp_path):
    adapter = random_adapter(tiny_gguf)
    merged = merge_adapter(tiny_gguf, adapter, tmp_path / "merged.f32.gguf", outtype="f32")
    runtime, folded, plain = logits(tiny_gguf, adapter), logits(merged), logits(tiny_gguf)
    diff = float(np.abs(folded - runtime).max())
    print(f"merged f32 vs runtime adapter: max abs logit diff {diff:.2e} (adapter effect {np.abs(runtime - plain).max():.2f})")
    assert np.abs(runtime - plain).max() > 0.1  # the adapter matters ...
    assert diff < 1e-4  # ... and folding it in changes only float rounding, at every position


def test_merged_q8_0_error_is_the_q8_0_error(tiny_gguf, tmp_path):
    """|merged q8_0 - (f32 base + adapter)| is q8_0's own error: compare it with |q8_0 base - f32 base|.

    Both sides round the same kind of weights (same shapes, similar magnitudes; the delta changes W by a few %)
    to 8-bit blocks and run the same 8-bit-activation matmuls, so their logit errors are of the same size but
    not identical values. 2x that baseline plus 0.01 leaves room for that spread and still fails for any real
    mistake: a missing delta (the adapter's effect here is ~1.8) or a wrongly oriented one is far larger.
    B is drawn at 0.1 so that the delta is ~1/3 of W, as for a real fine-tune; at 0.3 the delta is as large as W,
    the merged model is a different, more sensitive model and its q8_0 error grows accordingly (measured 0.23)."""
    adapter = random_adapter(tiny_gguf, scale=0.1)
    base_q8 = tmp_path / "base.q8_0.gguf"
    quantize_gguf(tiny_gguf, base_q8, "q8_0", n_threads=1)  # llama.cpp's own quantizer
    merged_q8 = merge_adapter(tiny_gguf, adapter, tmp_path / "merged.q8_0.gguf", outtype="q8_0")
    baseline = float(np.abs(logits(base_q8) - logits(tiny_gguf)).max())
    error = float(np.abs(logits(merged_q8) - logits(tiny_gguf, adapter)).max())
    print(f"merged q8_0 vs f32+adapter: {error:.2e}; q8_0 base vs f32 base: {baseline:.2e}")
    assert 0 < baseline and 0 < error < 2 * baseline + 0.01


def test_q8_0_merge_is_bit_identical_to_llama_cpp_quantizing_the_f32_merge(tiny_gguf, tmp_path):
    """Our numpy path (dequantize, add the delta in f32, gguf-py's quantizer) must write the bytes llama.cpp's
    quantizer writes for the f32 merge: same tensor types, same blocks."""
    adapter = random_adapter(tiny_gguf)
    ours = GGUFReader(merge_adapter(tiny_gguf, adapter, tmp_path / "ours.gguf", outtype="q8_0"))
    merged_f32 = merge_adapter(tiny_gguf, adapter, tmp_path / "f32.gguf", outtype="f32")
    quantize_gguf(merged_f32, tmp_path / "ref.gguf", "q8_0", n_threads=1)
    ref = {t.name: t for t in GGUFReader(tmp_path / "ref.gguf").tensors}  # llama.cpp writes its own tensor order
    assert sorted(t.name for t in ours.tensors) == sorted(ref)
    for a in ours.tensors:
        b = ref[a.name]
        assert a.tensor_type == b.tensor_type, a.name
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data), err_msg=a.name)


def test_metadata_is_copied_and_the_merge_recorded(tiny_gguf, tmp_path):
    calls = []
    merged = merge_adapter(tiny_gguf, random_adapter(tiny_gguf), tmp_path / "m.gguf", outtype="q4_0",
                           progress=lambda done, total, name: calls.append((done, total, name)))
    base, out = GGUFReader(tiny_gguf), GGUFReader(merged)
    for name, field in base.fields.items():
        if not name.startswith("GGUF.") and name != "general.file_type":
            assert out.fields[name].contents() == field.contents(), name  # tokenizer, template, hparams...
    report = merge_report(merged)
    assert report["file_type"] == 2 and report["lora_rank"] == 4 and report["lora_alpha"] == 8.0
    assert report["tensor_types"]["blk.0.attn_q.weight"] == "Q4_0"
    assert report["tensor_types"]["blk.0.attn_norm.weight"] == "F32"  # 1-D stays F32
    # tied embeddings: token_embd is the output projection, kept at 8 bits as llama.cpp keeps it above 4
    assert report["tensor_types"]["token_embd.weight"] == "Q8_0"
    assert report["type_fallbacks"] == ["token_embd.weight: Q8_0, output projection kept at Q8_0 (llama.cpp keeps Q6_K)"]
    n = len(base.tensors)
    assert [c[:2] for c in calls] == [(i + 1, n) for i in range(n)] and calls[-1][2] == base.tensors[-1].name


def test_rows_that_do_not_split_into_blocks_fall_back_to_f16(tmp_path):
    """n_embd 48 is not a multiple of q8_0's block of 32: those weights become F16 (as in llama.cpp's converter)
    and the file records it; ffn_down (rows of n_ff 64) stays q8_0. llama.cpp runs the result."""
    gguf = write_tiny_llama(tmp_path / "odd.gguf", TinyLlama(n_embd=48, n_head=4, n_head_kv=2, n_ff=64))
    adapter = random_adapter(gguf)
    merged = merge_adapter(gguf, adapter, tmp_path / "odd.q8_0.gguf", outtype="q8_0")
    report = merge_report(merged)
    assert report["tensor_types"]["blk.0.attn_q.weight"] == "F16"
    assert report["tensor_types"]["blk.0.ffn_down.weight"] == "Q8_0"
    assert any(f.startswith("blk.0.attn_q.weight: F16, rows of 48") for f in report["type_fallbacks"])
    assert np.abs(logits(merged) - logits(gguf, adapter)).max() < 0.05


def test_k_quants_go_through_llama_cpp(tiny_gguf, tmp_path):
    """q4_k_m has no numpy quantizer: the merge is written as f16 and requantized by llama.cpp (which itself
    falls back from k-quants for rows of 64); no intermediate file is left behind."""
    merged = merge_adapter(tiny_gguf, random_adapter(tiny_gguf), tmp_path / "m.q4_k_m.gguf", outtype="q4_k_m")
    assert merge_report(merged)["file_type"] == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.q4_k_m.gguf"]
    assert np.isfinite(logits(merged)).all()


def test_adapter_for_another_model_is_refused_with_every_mismatch(tiny_gguf, tmp_path):
    other = write_tiny_llama(tmp_path / "other.gguf", TinyLlama(n_embd=32, n_ff=64))
    adapter = random_adapter(other, targets=("attn_q", "ffn_up"))
    with pytest.raises(EdgezoError) as err:
        merge_adapter(tiny_gguf, adapter, tmp_path / "m.gguf")
    message = str(err.value)
    assert str(tiny_gguf) in message
    assert "blk.0.attn_q.weight.lora_a: shape (4, 32), expected (4, 64)" in message
    assert "blk.1.ffn_up.weight.lora_b: shape (64, 4), expected (128, 4)" in message
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(EdgezoError, match="unknown merge type"):
        merge_adapter(tiny_gguf, adapter, tmp_path / "m.gguf", outtype="q3_x")
