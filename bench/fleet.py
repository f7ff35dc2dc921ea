"""Fleet projection for distributed MeZO: steps/s of W workers, from the per-step costs bench/distributed.py measured.

    python -m bench.fleet            # print the tables
    python -m bench.fleet --write    # and rewrite the block between <!-- fleet:begin --> and <!-- fleet:end -->
                                     # in docs/fleet.md

Arithmetic on measurements, not a measurement (docs/fleet.md states the model and its assumptions). Steps are
synchronous; W workers of one core each, global batch B, per-hop latency h (gloo's ring all-gather: W - 1 hops):
  data-parallel       t = 2 f(B/W) + 2 z + u + (W - 1) h      steps/s = 1 / t
  direction-parallel  t = 2 f(B) + 2 z + W u + (W - 1) h      directions/s = W / t
f(b) is the measured scoring pass over b sequences (1 thread), z the measured build of theta + eps z (per
perturbation), u the measured update of one direction. h is assumed: 0.1 ms (LAN), 5 ms (Wi-Fi), 30 ms (WAN).
"""

from __future__ import annotations

import argparse
import sys

from bench import common
from bench import report

DOC = common.ROOT / "docs" / "fleet.md"
BEGIN, END = "<!-- fleet:begin -->", "<!-- fleet:end -->"
HOPS_S = {"LAN": 1e-4, "Wi-Fi": 5e-3, "WAN": 3e-2}
DATA_WORKERS = (1, 2, 4, 8, 16)
DIRECTION_WORKERS = (1, 16, 64, 256, 1024)


def costs_of(result: dict) -> tuple[dict[int, float], float, float]:
    """(f: batch size -> seconds, z seconds, u seconds), medians from a distributed.py result."""
    c = result["costs"]
    return ({int(b): s["median"] for b, s in c["forward_seconds"].items()}, c["z_seconds"]["median"],
            c["update_seconds"]["median"])


def data_parallel_step_s(f: dict[int, float], z: float, u: float, batch: int, workers: int, hop_s: float) -> float:
    if batch % workers or batch // workers not in f:
        raise ValueError(f"no measured forward for a shard of {batch}/{workers} sequences")
    return 2 * f[batch // workers] + 2 * z + u + (workers - 1) * hop_s


def direction_parallel_step_s(f: dict[int, float], z: float, u: float, batch: int, workers: int, hop_s: float) -> float:
    return 2 * f[batch] + 2 * z + workers * u + (workers - 1) * hop_s


def measured_step_s(result: dict, config: str) -> float | None:
    run = next((r for r in result["runs"] if r["config"] == config), None)
    return run["step_seconds"]["median"] if run else None


def render(result: dict, batch: int = 16) -> str:
    f, z, u = costs_of(result)
    data_rows = []
    for w in DATA_WORKERS:
        t = {name: data_parallel_step_s(f, z, u, batch, w, h) for name, h in HOPS_S.items()}
        t1 = data_parallel_step_s(f, z, u, batch, 1, HOPS_S["LAN"])
        data_rows.append([w, f"{1 / t['LAN']:.2f}", f"{t1 / t['LAN']:.1f}", f"{1 / t['Wi-Fi']:.2f}", f"{1 / t['WAN']:.2f}"])
    direction_rows = []
    for w in DIRECTION_WORKERS:
        t = {name: direction_parallel_step_s(f, z, u, batch, w, h) for name, h in HOPS_S.items()}
        ring = (w - 1) * 24  # each worker forwards the other workers' (seed, L+, L-) around the ring
        direction_rows.append([w, f"{w / t['LAN']:.2f}", f"{w / t['WAN']:.2f}",
                               f"{ring / 1e3:.1f} KB" if ring >= 1000 else f"{ring} B"])
    checks = []
    for config, projected in (("2x1-data", data_parallel_step_s(f, z, u, batch, 2, HOPS_S["LAN"])),
                              ("2x1-direction", direction_parallel_step_s(f, z, u, batch, 2, HOPS_S["LAN"]))):
        measured = measured_step_s(result, config)
        if measured:
            checks.append([config, f"{projected:.3f}", f"{measured:.3f}", f"{measured / projected:.2f}"])
    costs = result["costs"]
    cost_rows = [["scoring pass (forward + host loss), " + " / ".join(map(str, f)) + " sequences", "f(b)",
                  " / ".join(f"{f[b]:.3f}" for b in f)],
                 ["building theta + eps z for all adapter tensors (per perturbation)", "z", f"{z:.4f}"],
                 ["the update for one direction (regenerates z)", "u", f"{u:.4f}"]]
    cost_rows += [[f"gloo all-gather of {n} bytes, 2 processes on localhost", "g", f"{s['median']:.6f}"]
                  for n, s in costs["gather_seconds"].items()]
    return (f"Per-step costs, `python -m bench.distributed` of {result['time']} ({result['model']} {result['quant']}, "
            f"one thread per measurement, the first 16 movie-review prompts of the training split, LoRA defaults "
            f"({costs['n_adapter_params']:,} parameters), seed {result['seed']}; medians, min and max in "
            f"`bench/results/distributed.md`):\n\n"
            + common.table(["cost", "symbol", "seconds (median)"], cost_rows)
            + f"\nProjected for B = {batch}:\n\n"
            + common.table(["data-parallel, W", "steps/s, LAN (h = 0.1 ms)", "speed-up", "steps/s, Wi-Fi (h = 5 ms)",
                            "steps/s, WAN (h = 30 ms)"], data_rows)
            + "\n"
            + common.table(["direction-parallel, W", "directions/s, LAN", "directions/s, WAN (h = 30 ms)",
                            "payload in (and out) per worker per step"], direction_rows)
            + f"\nIn direction-parallel the updates cost as much as the two forwards at W = 2 f({batch}) / u = "
              f"{2 * f[batch] / u:.0f}.\n"
            + "\nThe model against the run that measured the costs (2 workers x 1 thread on this machine, step seconds):\n\n"
            + common.table(["config", "projected", "measured (median)", "measured / projected"], checks))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"rewrite the generated block of {DOC.relative_to(common.ROOT)}")
    args = p.parse_args(argv)
    result = common.latest_result("distributed")
    if result is None:
        print("fleet: no bench/results/distributed.jsonl yet; run python -m bench.distributed", file=sys.stderr)
        return 1
    text = render(result)
    print(text)
    if args.write:
        block = "<!-- generated by `python -m bench.fleet --write`; edit the script, not this block -->\n\n" + text
        DOC.write_text(report.replace_block(DOC.read_text(), block, BEGIN, END))
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
