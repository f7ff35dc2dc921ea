"""PEFT LoRA directories <-> GGUF LoRA adapters, against the references: PEFT's own files (round trip exact) and
transformers + PEFT logits vs llama.cpp with the converted adapter (parity).

Adapters come from real `peft.get_peft_model` on tiny random transformers models built here (nothing downloaded),
with lora_B drawn random so that every adapter changes the logits.
"""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

from edgezo.convert.peft import (CONFIG_FILE, HF_TO_GGUF, WEIGHTS_FILE, adapter_to_peft, gguf_to_peft,  # noqa: E402
                          peft_to_adapter, peft_to_gguf)
from edgezo.adapter import read_base_model_info, read_lora_gguf  # noqa: E402
from edgezo.engine import Engine, EngineConfig  # noqa: E402
from edgezo.files import EdgezoError  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ENGINE = EngineConfig(n_seq_max=1, n_ctx_per_seq=64, n_ubatch=64, n_threads=1, flash_attn=False,
                      kv_f32=True)  # an F16 KV cache alone moves these logits by 2e-3..7e-3
ALL_MODULES = tuple(HF_TO_GGUF)  # q_proj ... down_proj
# The shapes of tests/tiny_model.py's TinyLlama (the tiny_gguf fixture): 4 heads of 16, 2 KV heads, n_ff 128.
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


# ---- helpers ---------------------------------------------------------------------------------------------------
def hf_model(arch: str, vocab_size: int = 300, seed: int = 0):
    """A tiny random transformers causal LM with O(1) weights (HF's 0.02 init makes near-uniform logits)."""
    configs = {
        "llama": lambda: transformers.LlamaConfig(vocab_size=vocab_size, **DIMS, rope_theta=5000.0, rms_norm_eps=1e-5,
                                                  tie_word_embeddings=False),
        "qwen2": lambda: transformers.Qwen2Config(vocab_size=vocab_size, **DIMS, rms_norm_eps=1e-6,
                                                  tie_word_embeddings=True),
        # head_dim 32 != hidden / heads: q_proj is 64 -> 128, o_proj 128 -> 64
        "gemma3": lambda: transformers.Gemma3TextConfig(vocab_size=vocab_size, **DIMS, head_dim=32,
                                                        query_pre_attn_scalar=32, sliding_window=8),
    }
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(configs[arch](), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise * (0.5 if "embed" in name else p.shape[1] ** -0.5))
    return model.eval()


def make_peft(model, out_dir: Path, modules, seed: int = 1, r: int = 4, alpha: int = 8):
    """Wrap `model` with PEFT LoRA (random nonzero B) and save it; returns the PeftModel."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules), lora_dropout=0.0, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    wrapped.save_pretrained(out_dir)
    return wrapped.eval()


def shapes_gguf(path: Path, arch: str, model) -> Path:
    """A GGUF with the header fields and linear tensors (zeros) PEFT conversion reads; enough for base-model checks."""
    from gguf import GGUFWriter

    cfg = model.config
    writer = GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    for name, p in model.named_parameters():
        m = re.fullmatch(r"model\.layers\.(\d+)\.\w+\.(\w+)\.weight", name)
        if m and m[2] in HF_TO_GGUF:
            writer.add_tensor(f"blk.{m[1]}.{HF_TO_GGUF[m[2]][1]}.weight", np.zeros(tuple(p.shape), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_tokenizer(directory: Path) -> Path:
    """A ~300-token byte-level BPE with SmolLM's pre-tokenizer: the HF -> GGUF converter needs a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a good movie, a bad movie", "the quick brown fox jumps over the lazy dog"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(directory)
    return directory


def peft_tensors(peft_dir: Path) -> dict:
    return load_file(str(peft_dir / WEIGHTS_FILE))


def peft_config(peft_dir: Path) -> dict:
    return json.loads((peft_dir / CONFIG_FILE).read_text())


# ---- PEFT -> GGUF LoRA -> PEFT is exact -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def round_trip_cases(tmp_path_factory, tiny_gguf):
    """arch -> (base GGUF, PEFT dir): llama on the tiny_gguf fixture (q/k permuted), qwen2 and gemma3 on
    shape-only GGUFs (not permuted)."""
    root = tmp_path_factory.mktemp("peft-rt")
    make_peft(hf_model("llama"), root / "llama", ALL_MODULES)  # same shapes as tiny_gguf
    cases = {"llama": (tiny_gguf, root / "llama")}
    for arch in ("qwen2", "gemma3"):
        model = hf_model(arch)
        base = shapes_gguf(root / f"{arch}.gguf", arch, model)
        make_peft(model, root / arch, ALL_MODULES)
        cases[arch] = (base, root / arch)
    return cases


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_peft_to_gguf_to_peft_reproduces_the_peft_tensors_exactly(arch, round_trip_cases, tmp_path):
    base, original = round_trip_cases[arch]
    lora_gguf = peft_to_gguf(original, base, tmp_path / "lora.gguf")
    back = gguf_to_peft(lora_gguf, base, tmp_path / "back")
    before, after = peft_tensors(original), peft_tensors(back)
    assert sorted(after) == sorted(before) and len(before) == 2 * 2 * len(ALL_MODULES)
    for key in before:
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    c0, c1 = peft_config(original), peft_config(back)
    assert (c1["r"], c1["lora_alpha"], set(c1["target_modules"])) == (c0["r"], c0["lora_alpha"], set(c0["target_modules"]))


@pytest.mark.parametrize("arch, permuted", [("llama", True), ("qwen2", False)])
def test_only_llama_q_and_k_rows_of_b_are_permuted(arch, permuted, round_trip_cases):
    base, original = round_trip_cases[arch]
    adapter = peft_to_adapter(original, read_base_model_info(base))
    src = {k: v.numpy() for k, v in peft_tensors(original).items()}
    prefix = "base_model.model.model.layers.1"
    for module, stem in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        a, b = adapter.tensors[f"blk.1.{stem}.weight.lora_a"], adapter.tensors[f"blk.1.{stem}.weight.lora_b"]
        np.testing.assert_array_equal(a, src[f"{prefix}.self_attn.{module}.lora_A.weight"])  # A never moves
        peft_b = src[f"{prefix}.self_attn.{module}.lora_B.weight"]
        moved = permuted and module != "v_proj"
        assert np.array_equal(b, peft_b) != moved, module
        assert sorted(map(tuple, b)) == sorted(map(tuple, peft_b))  # a permutation of the rows, nothing else
    assert adapter.config.alpha == 8.0 and adapter.config.rank == 4  # PEFT's scale lora_alpha / r survives


def test_adapter_to_peft_loads_in_peft_with_the_same_delta(round_trip_cases, tmp_path):
    """A GGUF-side adapter written as PEFT loads in PeftModel.from_pretrained and reproduces the original model."""
    base, original = round_trip_cases["qwen2"]
    adapter = peft_to_adapter(original, read_base_model_info(base))
    out = adapter_to_peft(adapter, tmp_path / "out", read_base_model_info(base))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(hf_model("qwen2"), original).eval()(ids).logits
        ours = peft.PeftModel.from_pretrained(hf_model("qwen2"), out).eval()(ids).logits
    assert torch.equal(ours, ref)


# ---- parity: llama.cpp with the converted adapter == transformers + PEFT ----------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("arch, modules", [("llama", ("q_proj", "k_proj", "v_proj", "o_proj")), ("qwen2", ALL_MODULES)])
def test_llama_cpp_with_converted_adapter_matches_transformers_peft(arch, modules, tokenizer_dir, tmp_path):
    from edgezo.convert.hf_to_gguf import convert_hf_to_gguf

    n_vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    model_dir = tmp_path / "hf"
    hf_model(arch, vocab_size=n_vocab).save_pretrained(model_dir)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    base = convert_hf_to_gguf(model_dir, tmp_path / "base.f32.gguf", outtype="f32")
    wrapped = make_peft(hf_model(arch, vocab_size=n_vocab), tmp_path / "peft", modules)
    lora = peft_to_gguf(tmp_path / "peft", base, tmp_path / "lora.gguf")

    ids = [int(i) for i in np.random.default_rng(0).integers(0, n_vocab, size=24)]
    with torch.no_grad():
        ref = wrapped(torch.tensor([ids])).logits[0].numpy()
    with Engine(base, ENGINE) as engine:
        plain = engine.logits([ids], [list(range(len(ids)))])
        engine.set_adapter(read_lora_gguf(lora, read_base_model_info(base)), in_place=False)
        ours = engine.logits([ids], [list(range(len(ids)))])
    diff = float(np.abs(ours - ref).max())
    print(f"{arch}: max abs logit diff vs transformers+PEFT {diff:.2e}, adapter effect {np.abs(plain - ref).max():.2f}")
    assert float(np.abs(plain - ref).max()) > 50 * max(diff, 1e-4)  # the adapter matters far more than the error
    assert diff < 1e-3, diff


# ---- errors ----------------------------------------------------------------------------------------------------
@pytest.fixture
def llama_peft(round_trip_cases, tmp_path) -> tuple[Path, Path]:
    base, original = round_trip_cases["llama"]
    copy = tmp_path / "peft"
    shutil.copytree(original, copy)
    return base, copy


def test_wrong_shape_and_unknown_module_are_reported_together_naming_the_file(llama_peft):
    base, peft_dir = llama_peft
    tensors = peft_tensors(peft_dir)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 65)
    tensors["base_model.model.model.layers.0.mlp.fc_extra.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(300, 4)
    save_file(tensors, str(peft_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(EdgezoError) as err:
        peft_to_adapter(peft_dir, read_base_model_info(base))
    message = str(err.value)
    assert str(peft_dir / WEIGHTS_FILE) in message
    assert "layers.0.self_attn.q_proj.lora_A.weight: shape (4, 65), expected (4, 64)" in message
    assert "mlp.fc_extra" in message and "lm_head" in message


def test_missing_adapter_config_is_named(llama_peft):
    base, peft_dir = llama_peft
    (peft_dir / CONFIG_FILE).unlink()
    with pytest.raises(EdgezoError, match=re.escape(str(peft_dir / CONFIG_FILE))):
        peft_to_gguf(peft_dir, base, peft_dir / "out.gguf")
    assert not (peft_dir / "out.gguf").exists()


def test_missing_weights_file_is_named(llama_peft):
    base, peft_dir = llama_peft
    (peft_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(EdgezoError, match=re.escape(str(peft_dir / WEIGHTS_FILE))):
        peft_to_adapter(peft_dir, read_base_model_info(base))


@pytest.mark.parametrize("change, reason", [
    ({"use_rslora": True}, "use_rslora"),  # scale alpha/sqrt(r) is not alpha/r
    ({"use_dora": True}, "use_dora"),  # DoRA adds a magnitude vector
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),  # per-module ranks: one GGUF alpha/r cannot hold them
    ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern"),
    ({"bias": "all"}, "bias"),  # trained biases live outside A and B
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),  # full weights, not a LoRA
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),  # only the 7 linear modules of a block
    ({"peft_type": "IA3"}, "peft_type"),
])
def test_unsupported_peft_features_are_refused_by_name(llama_peft, change, reason):
    base, peft_dir = llama_peft
    config = {**peft_config(peft_dir), **change}
    (peft_dir / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(EdgezoError, match=re.escape(reason)) as err:
        peft_to_adapter(peft_dir, read_base_model_info(base))
    assert str(peft_dir / CONFIG_FILE) in str(err.value)


def test_adapter_of_another_architecture_is_refused(round_trip_cases, tmp_path):
    llama_base, llama_dir = round_trip_cases["llama"]
    qwen_base, _ = round_trip_cases["qwen2"]
    adapter = peft_to_adapter(llama_dir, read_base_model_info(llama_base))
    with pytest.raises(EdgezoError, match="architecture 'llama'"):
        adapter_to_peft(adapter, tmp_path / "out", read_base_model_info(qwen_base))
