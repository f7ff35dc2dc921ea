"""Largest model each fine-tuning method fits against the memory budget: bench/results/capacity.{png,json}.

    python -m bench.capacity_plot [--batch-size 16] [--seq-len 64] [--rank 16]

For budgets from 256 MiB to 32 GiB, edgezo.capacity picks the largest model of the known families
(edgezo/model_families.toml) whose predicted peak RSS (edgezo.memory, the functions `edgezo memory` uses) fits; the
y axis is its parameter count; BP as `reference-bp --release-freed-memory` runs it (edgezo.capacity). Device
profiles are marked on the x axis. Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import sys

from bench import common

from edgezo.adapter import LoraConfig  # noqa: E402
from edgezo.capacity import METHODS, largest_fitting, load_specs, prediction_table  # noqa: E402
from edgezo.memory import load_device_profile  # noqa: E402

RESULTS = common.RESULTS
SHOWN = ["mezo-q4_0", "mezo-f16", "bp-f32-lora", "bp-f32-lora-ckpt", "bp-bf16-lora-ckpt", "bp-q4_0-lora",
         "bp-q4_0-lora-ckpt", "bp-f32-full", "bp-bf16-full-ckpt"]
MARKED_DEVICES = ["raspberry-pi-zero-2w", "android-4gb", "raspberry-pi-5-8gb", "laptop-16gb"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = load_specs()
    lora = LoraConfig(rank=args.rank)
    table = prediction_table(specs, args.batch_size, args.seq_len, lora)
    budgets = sorted({int(256 * 2**20 * 2 ** (i / 16)) for i in range(0, 16 * 7 + 1)}
                     | {b for row in table.values() for b in row.values()})
    budgets = [b for b in budgets if 256 * 2**20 <= b <= 32 * 2**30]
    curves = {}
    for key in SHOWN:
        curves[key] = [(largest_fitting(specs, table, key, b) or None) for b in budgets]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    labels = {m.key: m.label for m in METHODS}
    for key in SHOWN:
        y = [s.params / 1e9 if s else 0 for s in curves[key]]
        ax.step([b / 2**30 for b in budgets], y, where="post", label=labels[key],
                linestyle="-" if key.startswith("mezo") else "--", linewidth=2 if key.startswith("mezo") else 1.4)
    for name in MARKED_DEVICES:
        prof = load_device_profile(name)
        ax.axvline(prof.usable_ram_bytes / 2**30, color="grey", linewidth=0.6, linestyle=":")
        ax.text(prof.usable_ram_bytes / 2**30, 0.6, prof.key, rotation=90, fontsize=7, va="center", ha="right",
                color="grey", transform=ax.get_xaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory budget (GiB, usable RAM)")
    ax.set_ylabel("largest model that fits (billions of parameters)")
    ax.set_title(f"Largest fine-tunable model by predicted peak RSS (batch {args.batch_size} x {args.seq_len} tokens, "
                 f"LoRA r{args.rank} on k,v)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "capacity.png", dpi=110)
    (RESULTS / "capacity.json").write_text(json.dumps({
        "batch_size": args.batch_size, "seq_len": args.seq_len, "rank": args.rank,
        "predictions": table, "params": {s.name: s.params for s in specs}}, indent=1) + "\n")
    print(f"wrote {RESULTS / 'capacity.png'} and capacity.json")
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
