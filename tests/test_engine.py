"""The llama.cpp engine on a tiny generated model: in-place adapter updates, output positions, batching, export."""

import ctypes

import numpy as np
import pytest

from edgezo import kernels
from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info
from edgezo.engine import Engine, EngineConfig, GgmlTensor, check_tensor_layout, quantize_gguf, system_info
from edgezo.files import EdgezoError

CONFIG = EngineConfig(n_seq_max=4, n_ctx_per_seq=256, n_threads=1, flash_attn=False)


def random_adapter(path, seed, targets=("attn_q", "attn_v"), scale=0.3):
    base = read_base_model_info(path)
    adapter = LoraAdapter.init(base, LoraConfig(rank=4, alpha=8.0, targets=targets), seed=seed)
    rng = np.random.default_rng(seed + 100)
    for v in adapter.tensors.values():
        v[...] = rng.standard_normal(v.shape).astype(np.float32) * scale
    return adapter


@pytest.fixture
def engine(tiny_gguf):
    with Engine(tiny_gguf, CONFIG) as e:
        yield e


def sequences(engine):
    return [engine.tokenize(t, add_special=True) for t in ("a good movie", "Label: bad", "xyz")]


def last_positions(seqs):
    return [[len(s) - 1] for s in seqs]


def test_in_place_update_is_bit_identical_to_loading_a_fresh_gguf(engine, tiny_gguf):
    seqs = sequences(engine)
    first, second = random_adapter(tiny_gguf, 1), random_adapter(tiny_gguf, 2)
    engine.set_adapter(first)
    with_first = engine.logits(seqs, last_positions(seqs))
    engine.update_adapter(second.tensors)
    updated = engine.logits(seqs, last_positions(seqs))
    with Engine(tiny_gguf, CONFIG) as fresh:
        fresh.set_adapter(second, in_place=False)  # the reload path: a freshly written GGUF
        reloaded = fresh.logits(seqs, last_positions(seqs))
    assert not np.array_equal(with_first, updated)  # the update took effect ...
    np.testing.assert_array_equal(updated, reloaded)  # ... and equals a fresh load bit for bit


def test_zero_b_adapter_leaves_logits_unchanged(engine, tiny_gguf):
    seqs = sequences(engine)
    base_logits = engine.logits(seqs, last_positions(seqs))
    engine.set_adapter(LoraAdapter.init(read_base_model_info(tiny_gguf), LoraConfig(rank=4), seed=0))
    np.testing.assert_array_equal(engine.logits(seqs, last_positions(seqs)), base_logits)


def test_adapter_detached_scores_the_base_model_then_restores_the_adapter(engine, tiny_gguf):
    seqs = sequences(engine)
    base = engine.logits(seqs, last_positions(seqs))
    adapter = random_adapter(tiny_gguf, 3)
    engine.set_adapter(adapter)
    adapted = engine.logits(seqs, last_positions(seqs))
    assert not np.allclose(adapted, base, atol=1e-3)
    with engine.adapter_detached():
        np.testing.assert_array_equal(engine.logits(seqs, last_positions(seqs)), base)
    np.testing.assert_array_equal(engine.logits(seqs, last_positions(seqs)), adapted)
    engine.update_adapter({k: v * 0.5 for k, v in adapter.tensors.items()})  # in-place addresses still valid
    assert not np.allclose(engine.logits(seqs, last_positions(seqs)), adapted, atol=1e-4)


def test_output_positions_select_rows_of_the_full_logits(engine):
    seq = engine.tokenize("a good movie, a bad one", add_special=True)
    full = engine.logits([seq], [list(range(len(seq)))])
    some = engine.logits([seq], [[1, 4, len(seq) - 1]])
    np.testing.assert_allclose(some, full[[1, 4, len(seq) - 1]], atol=1e-5)
    cols = engine.logits([seq], [[2]], columns=[5, 7])
    np.testing.assert_allclose(cols, full[[2]][:, [5, 7]], atol=1e-5)


def batch_tolerance(logits: np.ndarray) -> float:
    """How far one decode of several sequences may differ from decodes of one: 1e-4 (x86, and ARM without llamafile:
    3.6e-7 and 0), except where llama.cpp multiplies the F16 KV cache in float16, as llamafile's tinyBLAS does on
    ARM with FP16 vector arithmetic (the Cortex-A76 build under qemu: 1.1e-3 on logits of 2.85, 9.5e-7 with an F32
    cache): there batched and single-sequence matmuls round differently, by float16's precision (2^-10 relative)
    at the logits' scale. A sequence that saw another's cells would differ by far more."""
    features = kernels.build_features(system_info())
    if features.get("LLAMAFILE") == "1" and features.get("FP16_VA") == "1":
        return 2**-10 * float(np.abs(logits).max())
    return 1e-4


def test_many_sequences_in_one_decode_match_one_at_a_time(engine):
    seqs = sequences(engine)
    together = engine.logits(seqs, last_positions(seqs))
    alone = np.concatenate([engine.logits([s], [[len(s) - 1]]) for s in seqs])
    np.testing.assert_allclose(together, alone, atol=batch_tolerance(alone))  # split KV: sequences do not see each other


def test_too_many_or_too_long_sequences_are_refused_before_llama_cpp(engine):
    with pytest.raises(EdgezoError, match="5 sequences"):
        engine.logits([[1]] * 5, [[0]] * 5)
    with pytest.raises(EdgezoError, match="exceeds the context"):
        engine.logits([[1] * 300], [[0]])


def test_update_requires_matching_adapter(engine, tiny_gguf):
    with pytest.raises(EdgezoError, match="set_adapter"):
        engine.update_adapter({})
    engine.set_adapter(random_adapter(tiny_gguf, 1))
    wrong = {k: np.zeros((v.shape[0], v.shape[1] + 1), np.float32) for k, v in random_adapter(tiny_gguf, 1).tensors.items()}
    with pytest.raises(EdgezoError, match="bytes given"):
        engine.update_adapter(wrong)


def test_exported_adapter_loads_in_llama_cpp_python_with_the_same_logits(engine, tiny_gguf, tmp_path):
    import llama_cpp

    adapter = random_adapter(tiny_gguf, 3, targets=("attn_q", "attn_v", "ffn_down"))
    engine.set_adapter(adapter)
    adapter.save(tmp_path / "lora.gguf")
    seq = engine.tokenize("a good movie, a bad one", add_special=True)
    ours = engine.logits([seq], [list(range(len(seq)))])
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), lora_path=str(tmp_path / "lora.gguf"), n_ctx=256,
                          n_threads=1, logits_all=True, verbose=False, flash_attn=False)
    llm.eval(seq)
    theirs = np.asarray(llm.scores[: len(seq)])
    llm.close()
    assert np.abs(ours - theirs).max() < 1e-4


def test_generate_is_greedy_and_deterministic(engine):
    prompt = engine.tokenize("a good", add_special=True)
    first = list(engine.generate(prompt, 8))
    second = list(engine.generate(prompt, 8))
    assert first == second and 0 < len(first) <= 8
    full = engine.logits([prompt], [[len(prompt) - 1]])
    assert first[0] == int(np.argmax(full[0]))


def test_quantize_to_q8_0_stays_close(tiny_gguf, tmp_path):
    out = tmp_path / "tiny.q8_0.gguf"
    quantize_gguf(tiny_gguf, out, "q8_0")
    seq = [40, 50, 60, 70]
    with Engine(tiny_gguf, CONFIG) as f32, Engine(out, CONFIG) as q8:
        a, b = f32.logits([seq], [[3]]), q8.logits([seq], [[3]])
    assert 0 < np.abs(a - b).max() < 0.1
    with pytest.raises(EdgezoError, match="unknown quant type"):
        quantize_gguf(tiny_gguf, out, "q3_x")


def test_missing_and_invalid_model_files(tmp_path):
    with pytest.raises(EdgezoError, match="no such model file"):
        Engine(tmp_path / "nope.gguf", CONFIG)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EdgezoError, match="could not load"):
        Engine(junk, CONFIG)


def test_ggml_tensor_mirror_matches_the_loaded_ggml_and_a_shifted_one_is_refused():
    check_tensor_layout(GgmlTensor)  # also run at import: a mismatch would have failed the import above

    class Shifted(ctypes.Structure):  # as if ggml had dropped a field before `data` and `name`
        _fields_ = [f for f in GgmlTensor._fields_ if f[0] != "view_offs"]

    with pytest.raises(EdgezoError) as err:
        check_tensor_layout(Shifted)
    assert "name offset 248 (ggml: 256)" in str(err.value) and "llama-cpp-python==0.3.36" in str(err.value)
