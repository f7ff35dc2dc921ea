"""The paper's closed-form model-size ratio beside the accountant's, as a function of sequence length (issue 33).

No training and no model file: every number comes from the architectures in edgezo/model_families.toml, the closed
form of docs/capacity.md and the accountant's own functions (edgezo.memory, edgezo.capacity). Three figures per
sequence length T (batch B, LoRA rank 16 on attn_k/attn_v):

1. closed form (docs/capacity.md, "The closed-form ratio of the simplified model"): P_MeZO / P_BP =
   (b_w + a(T)) / b_q with a(T) the activation bytes per parameter of one reference model (its c = P / (L h^2) and
   w = saved bytes per token and block / h, read off the accountant), fixed runtimes, KV cache and llama.cpp's
   compute buffer left out (the closed form's assumptions 1 and 3). Two BP forms: float32 LoRA without
   checkpointing (b_w = 4; the paper's) and the strongest, LoRA on the Q4_0 blocks with checkpointing
   (b_w = 0.5625 + 4 e, e the embeddings' share; a(T) = block inputs + one block's activations).
2. the accountant on the same model: BP's predicted peak over MeZO's, each less its fixed runtime (so the same
   quantity as 1, but with the KV cache, compute buffer, dequantization buffers and logits counted).
3. the accountant's capacity ratio on device profiles: the parameters of the largest model MeZO (Q4_0) fits over
   those of the largest the best BP fits (edgezo.capacity over the default families), the figure a user meets.

    python -m bench.capacity_ratio                 # writes bench/results/capacity_ratio.{jsonl,md,png}, docs block
    python -m bench.capacity_ratio --check         # exit 1 if docs/capacity.md's block is not what this gives
"""

from __future__ import annotations

import argparse
import sys

from bench import common
from bench.common import RESULTS, ROOT, machine_info, publish, table, utc_now

from edgezo.adapter import LoraConfig  # after common, which puts this checkout on the path
from edgezo.capacity import capacity, load_specs
from edgezo.cli.docs import replace_block
from edgezo.memory import (RUNTIME_BASELINE_BYTES, TORCH_RUNTIME_BASELINE_BYTES, load_device_profile,
                           predict_llama_cpp, predict_torch, shape_from_spec, torch_checkpoint_bytes_per_token,
                           torch_saved_bytes_per_token_layer)

NAME = "capacity_ratio"
TITLE = "MeZO's model-size advantage against sequence length: the closed form beside the accountant"
DOC = ROOT / "docs" / "capacity.md"
BEGIN, END = "<!-- capacity-ratio:begin -->", "<!-- capacity-ratio:end -->"
SEQ_LENS = (64, 128, 256, 512, 1024, 2048)
MODELS = ("Qwen2.5-0.5B", "Qwen2.5-1.5B")  # the reference models of the closed form (the built-ins' architecture)
DEVICES = ("android-4gb", "raspberry-pi-5-4gb", "raspberry-pi-5-8gb")
B_Q = 1.125  # MeZO's bytes per parameter on Q4_0 here: 4.5 bits mapped + the same again repacked
B_Q4_BLOCKS = 0.5625  # BP's bytes per parameter of the Q4_0 blocks (torch does not repack them)


def closed_form(spec, batch_size: int, seq_len: int, lora: LoraConfig) -> dict:
    """The simplified model's two ratios for `spec` at B x T, with its c and w (docs/capacity.md's notation)."""
    shape = shape_from_spec(spec, "f32")
    h, n_layers, n_params = shape.n_embd, shape.n_layers, shape.n_params
    c = n_params / (n_layers * h * h)
    w = torch_saved_bytes_per_token_layer(shape, lora, "float32") / h  # bytes per token, block and unit of width
    tokens = batch_size * seq_len
    a_full = tokens * w / (c * h)  # = tokens x L x w h / P
    a_ckpt = tokens * (torch_checkpoint_bytes_per_token(shape, "float32") + w * h) / n_params
    e = spec.vocab * spec.hidden / n_params  # the (tied) embedding's share of the parameters
    return {"c": c, "w": w, "e": e, "a_full": a_full, "a_ckpt": a_ckpt,
            "bp_f32": (4 + a_full) / B_Q, "bp_q4_ckpt": (B_Q4_BLOCKS + 4 * e + a_ckpt) / B_Q}


def accountant_same_model(spec, batch_size: int, seq_len: int, lora: LoraConfig) -> dict:
    """BP's predicted peak over MeZO's for the same model, fixed runtimes removed (the closed form's quantity)."""
    mezo = predict_llama_cpp(shape_from_spec(spec, "q4_0"), "mezo", batch_size, seq_len, lora).total_bytes
    bp_f32 = predict_torch(shape_from_spec(spec, "f32"), "bp", batch_size, seq_len, lora,
                           release_freed=True).total_bytes
    bp_q4 = predict_torch(shape_from_spec(spec, "q4_0"), "bp-quant-ckpt", batch_size, seq_len, lora,
                          release_freed=True).total_bytes
    mezo_net = mezo - RUNTIME_BASELINE_BYTES
    return {"mezo_bytes": mezo, "bp_f32_bytes": bp_f32, "bp_q4_ckpt_bytes": bp_q4,
            "bp_f32": (bp_f32 - TORCH_RUNTIME_BASELINE_BYTES) / mezo_net,
            "bp_q4_ckpt": (bp_q4 - TORCH_RUNTIME_BASELINE_BYTES) / mezo_net}


def device_ratios(batch_size: int, seq_len: int, lora: LoraConfig, specs) -> dict:
    out = {}
    for device in DEVICES:
        profile = load_device_profile(device)
        result = capacity(profile.usable_ram_bytes, specs, batch_size, seq_len, lora, profile.llama_cpp_system_info)
        m = result["methods"]
        out[device] = {"mezo_model": m["mezo-q4_0"]["model"], "best_bp": result["best_bp"],
                       "best_bp_model": m[result["best_bp"]]["model"], "over_best_bp": result["mezo_over_best_bp"],
                       "bp_f32_model": m["bp-f32-lora"]["model"], "over_bp_f32": result["mezo_over_bp"]["bp-f32-lora"]}
    return out


def measure(batch_size: int, seq_lens=SEQ_LENS) -> dict:
    lora = LoraConfig()
    specs = load_specs()
    by_name = {s.name: s for s in specs}
    rows = []
    for seq_len in seq_lens:
        row = {"seq_len": seq_len, "models": {}, "devices": device_ratios(batch_size, seq_len, lora, specs)}
        for name in MODELS:
            row["models"][name] = {"closed_form": closed_form(by_name[name], batch_size, seq_len, lora),
                                   "accountant": accountant_same_model(by_name[name], batch_size, seq_len, lora)}
        rows.append(row)
    return {"benchmark": NAME, "time": utc_now(), "machine": machine_info(), "batch_size": batch_size,
            "rank": lora.rank, "targets": list(lora.targets), "models": list(MODELS), "devices": list(DEVICES),
            "b_q": B_Q, "rows": rows}


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}x"


def render(result: dict) -> str:
    b, models = result["batch_size"], result["models"]
    first = result["rows"][0]["models"]
    consts = "; ".join(f"{m}: c = {first[m]['closed_form']['c']:.1f}, w = {first[m]['closed_form']['w']:.0f}, "
                       f"e = {first[m]['closed_form']['e']:.2f}" for m in models)
    head = ["T"] + [f"{m} {form}" for m in models for form in ("f32 closed", "f32 acct", "Q4+ckpt closed",
                                                               "Q4+ckpt acct")]
    rows = [[r["seq_len"], *[ratio(r["models"][m][part][key]) for m in models
                             for key, part in (("bp_f32", "closed_form"), ("bp_f32", "accountant"),
                                               ("bp_q4_ckpt", "closed_form"), ("bp_q4_ckpt", "accountant"))]]
            for r in result["rows"]]
    dev_head = ["T"] + [f"{d}: MeZO / best BP" for d in result["devices"]]
    dev_rows = [[r["seq_len"], *[f"{ratio(v['over_best_bp'])} ({v['mezo_model'] or 'none'} / "
                                 f"{v['best_bp_model'] or 'none'})" for v in r["devices"].values()]]
                for r in result["rows"]]
    return (f"Batch {b} x T tokens, LoRA rank {result['rank']} on {','.join(result['targets'])}; ratios are MeZO "
            f"(Q4_0) over BP. *Closed*: (b_w + a(T)) / b_q with b_q = {result['b_q']}, no fixed runtimes, KV cache "
            f"or compute buffer ({consts}). *Acct*: the accountant's predicted peaks for the same model, BP's less "
            f"torch's 450 MiB runtime over MeZO's less its baseline. f32: BP LoRA on float32 weights without "
            f"checkpointing (the paper's BP); Q4+ckpt: BP LoRA on the Q4_0 blocks with checkpointing, the lean "
            f"form (the strongest BP).\n\n"
            + table(head, rows)
            + "\nThe largest model each method fits on a device profile (`edgezo capacity --seq-len T`, default "
            "families, every BP variant in the lean form): MeZO's parameters over the best BP's, and the two "
            "models (Gemma 3 beyond its 512-token sliding window is not modelled: its rows at T > 512 count every "
            "layer at full attention).\n\n" + table(dev_head, dev_rows)
            + f"\n{common.provenance(result)}\n")


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    t = [r["seq_len"] for r in result["rows"]]
    for m, style in zip(result["models"], ("-", "--")):
        for key, label, color in (("bp_f32", "vs BP f32", "C0"), ("bp_q4_ckpt", "vs BP Q4_0 + ckpt", "C1")):
            ax.plot(t, [r["models"][m]["closed_form"][key] for r in result["rows"]], style, color=color, alpha=0.5,
                    label=f"{m} {label}, closed form")
            ax.plot(t, [r["models"][m]["accountant"][key] for r in result["rows"]], style, color=color, marker="o",
                    label=f"{m} {label}, accountant")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"sequence length T (batch {result['batch_size']})")
    ax.set_ylabel("MeZO / BP model size under one budget")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def doc_block(result: dict) -> str:
    return (f"<!-- generated by `python -m bench.capacity_ratio` from bench/results/{NAME}.jsonl -->\n"
            f"![MeZO's model-size ratio against sequence length](../bench/results/{NAME}.png)\n\n{render(result)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16, help="[%(default)s]")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/capacity.md's block is stale")
    args = parser.parse_args()
    if args.check:
        result = common.latest_result(NAME)
        text = DOC.read_text()
        if result is None or replace_block(text, doc_block(result), BEGIN, END) != text:
            print(f"bench.{NAME}: docs/capacity.md's block is not what results/{NAME}.jsonl gives", file=sys.stderr)
            return 1
        return 0
    result = measure(args.batch_size)
    plot(result, RESULTS / f"{NAME}.png")
    publish(NAME, TITLE, result, render(result), as_json=False)
    DOC.write_text(replace_block(DOC.read_text(), doc_block(result), BEGIN, END))
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
