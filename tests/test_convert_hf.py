"""HF <-> GGUF conversion, checked against the references: transformers' logits and tokenizer, llama.cpp's loader,
tokenizer and quantizer, and the exact round trip HF -> GGUF -> HF.

The tiny models are random transformers models built in fixtures (nothing is downloaded) with tokenizers
trained here: a byte-level BPE (`tokenizers`) for llama and qwen2, a SentencePiece BPE for gemma3.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgezo.convert.gguf_to_hf import convert_gguf_to_hf  # noqa: E402
from edgezo.convert.hf_to_gguf import convert_hf_to_gguf  # noqa: E402
from edgezo.engine import Engine, EngineConfig, quantize_gguf  # noqa: E402
from edgezo.files import EdgezoError  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ENGINE = EngineConfig(n_seq_max=1, n_ctx_per_seq=64, n_ubatch=64, n_threads=1, flash_attn=False,
                      kv_f32=True)  # an F16 KV cache alone moves tiny-model logits by ~1.4e-3
SAMPLE = "Hello world! Ça va? 你好 123"
CORPUS = [
    "Hello world! How are you today?", "Ça va? Très bien, merci beaucoup.", "你好，世界。你好吗？",
    "The quick brown fox jumps over the lazy dog 12345.", "A good movie, a bad movie, 2024 and 1999.",
    "Numbers like 3.14 and 42 appear here, don't they? It's fine.", "Label: positive. Label: negative.",
] * 10
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# ---- tokenizers ------------------------------------------------------------------------------------------------
def bpe_tokenizer(directory: Path, split: str) -> Path:
    """A byte-level BPE of ~400 tokens with SmolLM's ("smollm") or Qwen2's ("qwen2") pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if split == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[2],
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(directory)
    return directory


def sentencepiece_tokenizer(directory: Path) -> Path:
    """A Gemma-like SentencePiece BPE: no dummy prefix, byte fallback, digits split, ids pad 0 eos 1 bos 2 unk 3."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(directory / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, split_digits=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        minloglevel=2)
    (directory / "tokenizer.vocab").unlink()
    (directory / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    AutoTokenizer.from_pretrained(directory).save_pretrained(directory)
    (directory / "config.json").unlink()
    return directory


# ---- tiny random models -----------------------------------------------------------------------------------------
def configs(vocab_size: int) -> dict:
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0,
                  eos_token_id=2)
    return {
        # untied lm_head, a rope_theta other than the default
        "llama": transformers.LlamaConfig(**common, rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
        "qwen2": transformers.Qwen2Config(**common, rope_theta=20000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
        # one sliding-window layer with a window shorter than the test sequences, one global layer
        "gemma3": transformers.Gemma3TextConfig(
            **{**common, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}, head_dim=32,
            query_pre_attn_scalar=32, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
            architectures=["Gemma3ForCausalLM"]),
    }


def randomize(model, arch: str, seed: int = 0) -> None:
    """Weights of O(1) effect (HF's 0.02 init gives near-uniform logits, useless for an argmax check), and
    norms away from their identity so that Gemma's 1 + w and the Q/K permutation are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                base = 0.0 if (arch == "gemma3" or "bias" in name) else 1.0
                p.copy_(base + 0.1 * noise)
            elif "embed" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


def build_model(directory: Path, arch: str, tokenizer_dir: Path) -> Path:
    n_vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
    config = configs(n_vocab)[arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, arch)
    model.save_pretrained(directory)
    for file in tokenizer_dir.iterdir():
        if file.name != "config.json":
            shutil.copy(file, directory / file.name)
    return directory


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    tokenizers = {"llama": bpe_tokenizer(root / "tok-smollm", "smollm"), "qwen2": bpe_tokenizer(root / "tok-qwen2", "qwen2"),
                  "gemma3": sentencepiece_tokenizer(root / "tok-spm")}
    return {arch: build_model(root / arch, arch, tok) for arch, tok in tokenizers.items()}


@pytest.fixture(scope="module")
def f32_ggufs(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {arch: convert_hf_to_gguf(d, root / f"{arch}.f32.gguf") for arch, d in tiny_models.items()}


class GgmlGelu(torch.nn.Module):
    """llama.cpp's CPU GELU (ggml-cpu/vec.h, GGML_GELU_FP16): the tanh GELU looked up in a table indexed by the
    input rounded to fp16, holding fp16 outputs. Its rounding alone moves the tiny gemma3's logits by ~2e-3."""

    def forward(self, x):
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def hf_logits(model_dir: Path, ids: list[int], gelu_like_llama_cpp: bool = False) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    if gelu_like_llama_cpp:
        for layer in model.model.layers:
            layer.mlp.act_fn = GgmlGelu()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    with Engine(gguf_path, ENGINE) as engine:
        return engine.logits([ids], [list(range(len(ids)))])


# ---- HF -> GGUF: logits and tokens agree with transformers ------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_f32_gguf_logits_match_transformers(arch, tiny_models, f32_ggufs):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_models[arch])
    ids = tok(CORPUS[3] + " " + CORPUS[5], add_special_tokens=False).input_ids[:40]
    assert len(ids) >= 20  # longer than gemma3's sliding window of 6: the window is exercised
    ours, ref = llama_logits(f32_ggufs[arch], ids), hf_logits(tiny_models[arch], ids, gelu_like_llama_cpp=arch == "gemma3")
    diff = float(np.abs(ours - ref).max())
    print(f"{arch}: max abs logit diff {diff:.2e} over {len(ids)} positions, logit std {ref.std():.2f}")
    assert diff <= 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tokenization_matches_transformers(arch, tiny_models, f32_ggufs):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_models[arch])
    with Engine(f32_ggufs[arch], ENGINE) as engine:
        for text in (SAMPLE, CORPUS[5], "  two  spaces\nand a newline 2024"):
            assert engine.tokenize(text, add_special=False) == tok(text, add_special_tokens=False).input_ids, text
        assert engine.tokenize("<|im_start|>user", add_special=False)[0] == tok.convert_tokens_to_ids("<|im_start|>") \
            if arch != "gemma3" else True


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(EdgezoError, match=r"GPTNeoXForCausalLM is not supported; supported: LlamaForCausalLM"):
        convert_hf_to_gguf(tmp_path, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


# ---- quantization: gguf-py's quantizers are llama.cpp's, bit for bit ---------------------------------------------
def raw_tensor(path: Path, name: str):
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(path).tensors if t.name == name)
    return t.tensor_type.name, bytes(np.asarray(t.data).tobytes())


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16"])
def test_quantized_tensors_equal_llama_cpp_quantizer(quant, tiny_models, f32_ggufs, tmp_path):
    ours = convert_hf_to_gguf(tiny_models["llama"], tmp_path / f"ours.{quant}.gguf", outtype=quant)
    theirs = tmp_path / f"llama-cpp.{quant}.gguf"
    quantize_gguf(f32_ggufs["llama"], theirs, quant, n_threads=1)
    # llama.cpp may give token_embd / output other types; the block weights get the requested one
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_up.weight", "blk.1.ffn_down.weight"):
        (our_type, our_bytes), (their_type, their_bytes) = raw_tensor(ours, name), raw_tensor(theirs, name)
        assert our_type == their_type == quant.upper(), name
        assert our_bytes == their_bytes, name
    assert raw_tensor(ours, "blk.0.attn_norm.weight")[0] == "F32"  # norms stay F32


# Bounds on the max abs logit change vs f32 for the tiny llama (logit std ~1; random weights amplify errors).
OUTTYPE_BOUNDS = {"f16": 0.02, "bf16": 0.15, "q8_0": 0.3, "q5_0": 1.5, "q5_1": 1.5, "q4_0": 3.0, "q4_1": 3.0}


@pytest.mark.parametrize("outtype", OUTTYPE_BOUNDS)
def test_every_outtype_loads_in_llama_cpp_and_stays_close(outtype, tiny_models, f32_ggufs, tmp_path):
    calls = []
    path = convert_hf_to_gguf(tiny_models["llama"], tmp_path / f"q.{outtype}.gguf", outtype=outtype,
                              progress=lambda done, total: calls.append((done, total)))
    ids = list(range(5, 25))
    diff = np.abs(llama_logits(path, ids) - llama_logits(f32_ggufs["llama"], ids)).max()
    print(f"{outtype}: max abs logit diff to f32 {diff:.3f}")
    assert 0 < diff < OUTTYPE_BOUNDS[outtype], diff
    assert calls[-1][0] == calls[-1][1] == len(calls)  # one call per tensor, ending at (total, total)


# ---- GGUF -> HF ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_hf_gguf_hf_round_trip_is_exact(arch, tiny_models, f32_ggufs, tmp_path):
    back = convert_gguf_to_hf(f32_ggufs[arch], tmp_path / "back")
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).state_dict()
    restored = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).state_dict()
    assert original.keys() == restored.keys()
    for name, value in original.items():
        if arch == "gemma3" and name.endswith("norm.weight"):
            # stored as 1 + w in float32: w comes back to within half an ulp of 1 (2**-24), not bit for bit
            torch.testing.assert_close(restored[name], value, rtol=0, atol=2.0**-24)
        else:
            assert torch.equal(restored[name], value), name
    tok, tok_back = (transformers.AutoTokenizer.from_pretrained(d) for d in (tiny_models[arch], back))
    for text in (SAMPLE, CORPUS[5]):
        assert tok_back(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids


def test_quantized_gguf_dequantizes_to_a_model_close_to_the_original(tiny_models, tmp_path):
    q8 = convert_hf_to_gguf(tiny_models["llama"], tmp_path / "l.q8_0.gguf", outtype="q8_0")
    back = convert_gguf_to_hf(q8, tmp_path / "back")
    ids = list(range(10, 40))
    diff = np.abs(hf_logits(back, ids) - hf_logits(tiny_models["llama"], ids)).max()
    assert 0 < diff < 0.1, diff


# ---- the real SmolLM2-135M-Instruct: GGUF Q4_1 -> HF -> GGUF f16 -------------------------------------------------
ENGLISH = ("The river rose slowly through the night, and by morning the lower fields were under water. "
           "Farmers moved their animals to the hills while the children watched from the bridge. "
           "Nobody could remember a flood like it since the old mill burned down forty years ago.")


def mean_nll(path: Path, ids: list[int]) -> float:
    with Engine(path, EngineConfig(n_seq_max=1, n_ctx_per_seq=128, n_ubatch=128, n_threads=2, flash_attn=False)) as e:
        logits = e.logits([ids], [list(range(len(ids)))]).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


@pytest.mark.real_model
def test_real_smollm2_survives_gguf_hf_gguf(tmp_path):
    from edgezo import store

    original = store.resolve_model("smollm2-135m")
    hf_dir = convert_gguf_to_hf(original, tmp_path / "hf")
    f16 = convert_hf_to_gguf(hf_dir, tmp_path / "smollm2.f16.gguf", outtype="f16")
    with Engine(original, ENGINE) as a, Engine(f16, ENGINE) as b:
        ids = a.tokenize(ENGLISH, add_special=True)
        assert b.tokenize(ENGLISH, add_special=True) == ids
        assert b.tokenize(SAMPLE, add_special=True) == a.tokenize(SAMPLE, add_special=True)
        assert b.meta("tokenizer.ggml.pre") == a.meta("tokenizer.ggml.pre") == "smollm"
    before, after = mean_nll(original, ids), mean_nll(f16, ids)
    # the HF directory itself: transformers' tokenizer and model agree with llama.cpp's
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    with Engine(original, ENGINE) as a:
        assert tok(SAMPLE, add_special_tokens=False).input_ids == a.tokenize(SAMPLE, add_special=False)
    logits = torch.log_softmax(torch.from_numpy(hf_logits(hf_dir, ids)).double(), -1)
    torch_nll = float(-logits[torch.arange(len(ids) - 1), ids[1:]].mean())
    print(f"SmolLM2 mean NLL over {len(ids)} tokens: Q4_1 original {before:.4f}, GGUF->HF->GGUF f16 {after:.4f}, "
          f"HF directory in torch {torch_nll:.4f}")
    assert abs(after - before) <= 0.05
    assert abs(torch_nll - before) <= 0.05
