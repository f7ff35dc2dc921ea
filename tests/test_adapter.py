import numpy as np
import pytest

from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info, read_lora_gguf, write_lora_gguf
from edgezo.files import EdgezoError


def test_init_shapes_and_zero_b(tiny_gguf):
    base = read_base_model_info(tiny_gguf)
    adapter = LoraAdapter.init(base, LoraConfig(rank=4, targets=("attn_q", "attn_v")), seed=0)
    assert base.architecture == "llama" and base.n_layers == 2
    assert len(adapter.tensors) == 2 * 2 * 2  # layers x targets x (A, B)
    a, b = adapter.tensors["blk.1.attn_v.weight.lora_a"], adapter.tensors["blk.1.attn_v.weight.lora_b"]
    assert a.shape == (4, 64) and b.shape == (32, 4)  # v: 64 -> 2 kv heads x 16
    assert a.dtype == np.float32 and not b.any() and np.abs(a).max() <= 1 / np.sqrt(64)


def test_gguf_round_trip_is_exact(tiny_gguf, tmp_path):
    base = read_base_model_info(tiny_gguf)
    adapter = LoraAdapter.init(base, LoraConfig(rank=3, alpha=5.0, targets=("attn_q", "ffn_down")), seed=1)
    for v in adapter.tensors.values():
        v += np.random.default_rng(2).standard_normal(v.shape).astype(np.float32)
    adapter.save(tmp_path / "a.gguf")
    loaded = LoraAdapter.load(tmp_path / "a.gguf", base)
    assert loaded.config == adapter.config and loaded.architecture == "llama"
    assert list(loaded.tensors) == list(adapter.tensors)
    for k, v in adapter.tensors.items():
        np.testing.assert_array_equal(loaded.tensors[k], v)


def test_validation_reports_every_problem_at_once(tiny_gguf, tmp_path):
    base = read_base_model_info(tiny_gguf)
    tensors = {
        "blk.0.attn_q.weight.lora_a": np.zeros((4, 64), np.float32),
        "blk.0.attn_q.weight.lora_b": np.zeros((63, 4), np.float32),  # wrong n_out
        "blk.9.attn_q.weight.lora_a": np.zeros((4, 64), np.float32),  # no such layer
        "blk.9.attn_q.weight.lora_b": np.zeros((64, 4), np.float32),
    }
    write_lora_gguf(tmp_path / "bad.gguf", "qwen2", 8.0, tensors)  # also the wrong architecture
    with pytest.raises(EdgezoError) as info:
        read_lora_gguf(tmp_path / "bad.gguf", base)
    message = str(info.value)
    assert "bad.gguf" in message
    assert "architecture 'qwen2'" in message
    assert "blk.0.attn_q.weight: adapter maps 64 -> 63" in message
    assert "blk.9.attn_q.weight: no such tensor" in message


def test_missing_alpha_and_non_gguf(tmp_path, tiny_gguf):
    from gguf import GGUFWriter

    path = tmp_path / "noalpha.gguf"
    w = GGUFWriter(path, "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EdgezoError, match="missing adapter.lora.alpha"):
        read_lora_gguf(path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(EdgezoError, match="junk.gguf is not a readable GGUF"):
        read_lora_gguf(junk)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank"),                      # a rank-0 adapter does nothing
    ({"alpha": float("nan")}, "alpha"),         # scale would be NaN
    ({"targets": ("attn_x",)}, "attn_x"),       # typo in a target name
])
def test_config_validation(kwargs, message):
    with pytest.raises(EdgezoError, match=message):
        LoraConfig(**kwargs)
