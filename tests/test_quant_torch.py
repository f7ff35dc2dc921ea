"""BP on a quantized base (edgezo.quant_torch): GGUF blocks dequantize bit for bit as gguf-py does them, QuantLinear is
autograd's linear on the dequantized weight while saving only the blocks, and reference-bp --base-dtype trains the
float reference's model on the same file, holding blocks instead of float weights."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import torch.nn.functional as F  # noqa: E402
from gguf import GGML_QUANT_SIZES, quants  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from tests.test_convert_hf import f32_ggufs, tiny_models  # noqa: E402,F401  (fixtures: tiny llama / qwen2 / gemma3 GGUFs)
from tests.helpers import classification_batch, reference_args, trained_adapter  # noqa: E402

from edgezo import reference  # noqa: E402
from edgezo.adapter import LoraAdapter, read_base_model_info  # noqa: E402
from edgezo.cli import main  # noqa: E402
from edgezo.engine import Engine, EngineConfig, Vocabulary, quantize_gguf  # noqa: E402
from edgezo.files import EdgezoError  # noqa: E402
from edgezo.quant_torch import _WORKSPACE, QuantLinear, causal_lm_from_gguf, dequantize  # noqa: E402
from edgezo.reference import ReferenceConfig, TorchScorer, batch_loss, load_model, lora_parameters  # noqa: E402

N_IN = 256  # one K-quant super-block, eight 32-weight blocks


def type_name(qtype: Q) -> str:  # test ids
    return qtype.name


def random_weights(n_rows: int = 24, seed: int = 0) -> np.ndarray:
    """Rows of very different scales, one all-zero row (d = 0) and one row with a single large outlier."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_rows, N_IN)) * rng.uniform(1e-3, 10, (n_rows, 1))).astype(np.float32)
    w[0] = 0
    w[1, 7] = 300.0
    return w


def blocks_of(w: np.ndarray, qtype: Q) -> np.ndarray:
    """(n_rows, row bytes) uint8 as a GGUF stores `w` in `qtype` (gguf-py's quantizers are llama.cpp's, bit for bit:
    tests/test_convert_hf.py)."""
    if qtype == Q.F32:
        return w.view(np.uint8)
    if qtype == Q.F16:
        return w.astype(np.float16).view(np.uint8)
    return quants.quantize(w, qtype)


def random_blocks(qtype: Q, n_rows: int = 24, seed: int = 1) -> np.ndarray:
    """Random bytes in `qtype`'s layout with finite float16 scales: every bit pattern of the codes (a quantizer's
    output never sets some high bits of Q5 blocks in some combinations)."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_rows * N_IN // block_size, type_size), dtype=np.uint8)
    scale_bytes = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q5_0: [0], Q.Q4_1: [0, 2], Q.Q5_1: [0, 2], Q.Q6_K: [type_size - 2]}
    for at in scale_bytes[qtype]:
        blocks[:, at : at + 2] = rng.uniform(-2, 2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(n_rows, -1)


# ---- (a) dequantization is gguf-py's, bit for bit --------------------------------------------------------------
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16, Q.F32], ids=type_name)
def test_dequantize_equals_gguf_py_on_quantized_weights(qtype):
    blocks = blocks_of(random_weights(), qtype)
    got = dequantize(torch.from_numpy(blocks), qtype)
    assert got.dtype == torch.float32 and got.shape == (24, N_IN)
    assert torch.equal(got, torch.from_numpy(quants.dequantize(blocks, qtype)))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=type_name)
def test_dequantize_equals_gguf_py_on_every_bit_pattern(qtype):
    blocks = random_blocks(qtype)
    assert torch.equal(dequantize(torch.from_numpy(blocks), qtype), torch.from_numpy(quants.dequantize(blocks, qtype)))


# ---- (b) QuantLinear is F.linear on the dequantized weight, forward and backward -----------------------------
@pytest.mark.parametrize("with_bias", [False, True])
# Q6_K: through gguf-py's own dequantizer
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.F16, Q.Q6_K], ids=type_name)
def test_quant_linear_is_the_linear_of_the_dequantized_weight(qtype, with_bias):
    blocks = random_blocks(qtype) if qtype == Q.Q6_K else blocks_of(random_weights(), qtype)
    weight = torch.from_numpy(quants.dequantize(blocks, qtype))
    bias = torch.randn(24) if with_bias else None
    layer = QuantLinear(torch.from_numpy(blocks), qtype, N_IN, bias=bias)
    x = torch.randn(3, 5, N_IN, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        y = layer(x)
    y_ref = F.linear(x_ref, weight, bias)
    assert torch.equal(y, y_ref)  # the same BLAS call on the same float weight
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    # what backward keeps is the blocks, not a float weight; the layer has no weight parameter to train or copy
    assert saved == [(torch.uint8, tuple(blocks.shape))]
    assert layer.weight is None and [n for n, _ in layer.named_parameters()] == (["bias"] if with_bias else [])


def test_quant_linear_refuses_blocks_of_the_wrong_shape():
    blocks = torch.from_numpy(blocks_of(random_weights(), Q.Q4_0))
    with pytest.raises(ValueError, match="Q4_0 blocks for 512 inputs"):
        QuantLinear(blocks, Q.Q4_0, 2 * N_IN)
    with pytest.raises(ValueError, match="not a whole number"):
        QuantLinear(blocks, Q.Q4_0, N_IN + 16)


# ---- (c) the tiny model: llama.cpp's logits, the float reference's gradients ----------------------------------
@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory, tiny_gguf):
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for quant in ("q8_0", "q4_0"):
        out[quant] = root / f"tiny.{quant}.gguf"
        quantize_gguf(tiny_gguf, out[quant], quant, n_threads=1)  # llama.cpp's own quantizer
    return out


def models(path, adapter, quant, gradient_checkpointing=False):
    """(model on the blocks, float32 reference model of the same file's dequantized weights), same adapter."""
    base = read_base_model_info(path)
    on_blocks = load_model(path, adapter, base, ReferenceConfig(base_dtype=quant,
                                                                gradient_checkpointing=gradient_checkpointing))
    return on_blocks, load_model(path, adapter, base, ReferenceConfig(gradient_checkpointing=gradient_checkpointing))


def llama_cpp_rounding(x: torch.Tensor) -> torch.Tensor:
    """What llama.cpp does to the input of every matmul with Q8_0 / Q4_0 weights: ggml's quantize_row_q8_0 (blocks of
    32, d = max|x| / 127 kept as float16, q = round(x * 127 / max|x|)), here turned back into float32."""
    blocks = x.reshape(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax == 0, 0.0, 127 / amax))
    return (q * (amax / 127).half().float()).reshape(x.shape)


class RoundedOutput(torch.nn.Module):
    """The tied output layer with its input rounded as llama.cpp's output matmul rounds it (no `weight` attribute, so
    TorchScorer calls it)."""

    def __init__(self, weight):
        super().__init__()
        self.embedding = weight

    def forward(self, hidden):
        return F.linear(llama_cpp_rounding(hidden), self.embedding)


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_logits_equal_llama_cpp_on_the_same_file(quant, quantized_tiny, monkeypatch):
    path = quantized_tiny[quant]
    adapter = trained_adapter(path)
    model, float_model = models(path, adapter, quant)
    batch, task = classification_batch(Vocabulary(path))
    sequences = [ex.tokens for ex in batch]
    positions = [range(len(s)) for s in sequences]
    config = EngineConfig(n_seq_max=len(batch), n_ctx_per_seq=64, flash_attn=False, kv_f32=True)
    with Engine(path, config) as engine:
        engine.set_adapter(adapter)
        expected = engine.logits(sequences, positions)
    got = TorchScorer(model).logits(sequences, positions)
    # the float reference on the dequantized file computes the same numbers: its weights are equal bit for bit
    np.testing.assert_allclose(got, TorchScorer(float_model).logits(sequences, positions), rtol=0, atol=1e-6)
    # llama.cpp rounds the activations to 8 bits before each quantized matmul, torch multiplies float32 activations:
    # both models are this far from llama.cpp (measured 0.036 for q8_0, 0.038 for q4_0 on logits of std ~1) ...
    assert 1e-3 < np.abs(got - expected).max() < 0.1
    # ... and with that rounding done in torch too (not in LoRA's matmuls: llama.cpp runs those in F32), they agree
    # within the float reference test's tolerance (measured 8e-7 / 1e-6)
    monkeypatch.setattr(QuantLinear, "forward",
                        lambda self, x: F.linear(llama_cpp_rounding(x), self.dequantize(), self.bias))
    causal_lm = model.get_base_model()
    monkeypatch.setattr(causal_lm, "lm_head", RoundedOutput(causal_lm.lm_head.weight))
    np.testing.assert_allclose(TorchScorer(model).logits(sequences, positions), expected, atol=1e-4)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_lora_gradients_equal_the_float_reference(quant, gradient_checkpointing, quantized_tiny):
    path = quantized_tiny[quant]
    model, float_model = models(path, trained_adapter(path), quant, gradient_checkpointing)
    batch, task = classification_batch(Vocabulary(path))
    losses, grads = [], []
    for m in (model, float_model):
        loss = batch_loss(TorchScorer(m), batch, task)
        losses.append(loss.item())
        grads.append(torch.autograd.grad(loss, lora_parameters(m)))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert len(grads[0]) == len(grads[1]) == 4 * 2 * 2  # 4 targets x 2 blocks x (A, B)
    for g, g_ref in zip(*grads):  # equal bit for bit here (the same BLAS calls on the same float weights)
        assert g.abs().max() > 0
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_model_holds_blocks_and_no_float_linear_weight(quantized_tiny):
    path = quantized_tiny["q4_0"]
    model, float_model = models(path, trained_adapter(path), "q4_0")
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks (lm_head is the embedding)
    assert all(m.weight is None and m.qtype == Q.Q4_0 and m.qweight.dtype == torch.uint8 for m in quantized.values())
    # the LoRA targets are PEFT layers around a QuantLinear
    assert {type(m.base_layer) for n, m in model.named_modules() if n.endswith("q_proj")} == {QuantLinear}
    float_params = {n for n, p in model.named_parameters() if "lora_" not in n}
    assert float_params and not any(n.endswith(("_proj.weight", "_proj.base_layer.weight")) for n in float_params)
    # what is float is what the float model has besides its linear weights: embedding and norms
    expected = {n for n, p in float_model.named_parameters() if "lora_" not in n and "_proj" not in n}
    assert float_params == expected


def test_the_accountant_counts_what_the_model_on_blocks_holds(quantized_tiny):
    """edgezo.memory's bp-quant weights terms against the model itself, and its blocks are the mapped file's pages."""
    from edgezo.memory import quantized_base_terms, read_model_shape

    path = quantized_tiny["q4_0"]
    model = causal_lm_from_gguf(path)
    terms = quantized_base_terms(read_model_shape(path), full_vocab_logits=True)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert terms["quant_blocks_bytes"] == sum(m.qweight.numel() for m in linears)
    floats = {p.data_ptr(): p.numel() for p in model.parameters()}  # a tied lm_head is the embedding: counted once
    assert terms["float_weights_bytes"] == 4 * sum(floats.values())
    shapes = {(m.out_features, m.in_features) for m in linears}  # the workspace is shared with other models loaded
    buffers = [t for shape in shapes for w, scratch in [_WORKSPACE.buffers[shape]] for t in (w, *scratch)]
    assert terms["dequant_buffers_bytes"] == sum(t.numel() * t.element_size() for t in buffers)
    assert str(path) in Path("/proc/self/maps").read_text()  # the blocks are views of the file, not copies


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_every_architecture_on_blocks_equals_its_converted_float_model(arch, f32_ggufs, tmp_path):  # noqa: F811
    """llama: Q/K rows un-permuted and an untied output layer in blocks; qwen2: q/k/v biases; gemma3: 1 + w norms."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"{arch}.q8_0.gguf"
    quantize_gguf(f32_ggufs[arch], path, "q8_0", n_threads=1)
    on_blocks = causal_lm_from_gguf(path)
    float_model = AutoModelForCausalLM.from_pretrained(reference.hf_model_dir(path), dtype=torch.float32,
                                                       attn_implementation="sdpa")
    ids = torch.arange(5, 29).reshape(2, 12)
    with torch.no_grad():
        got, expected = on_blocks(input_ids=ids).logits, float_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (arch == "llama") == isinstance(on_blocks.lm_head, QuantLinear)  # only llama's output layer is untied


# ---- (d) the command line ------------------------------------------------------------------------------------
def test_reference_bp_on_a_q4_0_base_writes_a_run_llama_cpp_evaluates(quantized_tiny, sentiment_dir, tmp_path,
                                                                       capsys, monkeypatch):
    path, out = quantized_tiny["q4_0"], tmp_path / "run"
    loaded = []
    real_load_model = reference.load_model
    monkeypatch.setattr(reference, "load_model", lambda *a, **k: loaded.append(real_load_model(*a, **k)) or loaded[-1])
    args = reference_args(path, sentiment_dir, out, "--base-dtype", "q4_0", "--gradient-checkpointing")
    args[args.index("--steps") + 1] = "3"
    assert main(["reference-bp", *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3
    assert json.loads((out / "config.json").read_text())["reference"]["base_dtype"] == "q4_0"
    adapter = LoraAdapter.load(out / "adapter.gguf", read_base_model_info(path))
    assert any(np.abs(t).max() > 0 for n, t in adapter.tensors.items() if n.endswith("lora_b"))  # it trained
    (model,) = loaded
    replaced = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(replaced) == 14 and all(m.weight is None for m in replaced)
    assert not any(p.numel() > 0 and n.endswith("_proj.weight") for n, p in model.named_parameters())
    # llama.cpp evaluates the exported adapter on the same q4_0 file to the torch run's final validation loss
    assert main(["eval", "--model", str(path), "--quant", "none", "--adapter", str(out / "adapter.gguf"),
                 "--data", str(sentiment_dir), "--split", "valid", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["loss"] == pytest.approx(summary["valid_loss"], abs=EVAL_LOSS_ABS)


EVAL_LOSS_ABS = 5e-3  # as test_reference's float runs


def test_a_quantized_base_needs_the_file_of_that_type(tiny_gguf, sentiment_dir, tmp_path, capsys):
    args = reference_args(tiny_gguf, sentiment_dir, tmp_path / "run", "--base-dtype", "q4_0")  # an f32 file
    assert main(["reference-bp", *args]) == 1
    assert "pass --quant q4_0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run directory is created


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="mezo", base_dtype="q4_0"), "float base"),  # the torch MeZO baseline stays the float one
    (dict(dtype="bfloat16", base_dtype="q8_0"), "dequantizes to float32"),  # blocks dequantize to float32 only
    (dict(base_dtype="q6_k"), "--base-dtype must be one of"),
])
def test_reference_config_refuses_quantized_base_combinations(kwargs, match):
    with pytest.raises(EdgezoError, match=match):
        ReferenceConfig(**kwargs)
