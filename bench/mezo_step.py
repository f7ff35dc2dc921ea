"""MeZO step cost against bare inference through llama.cpp, each measured in a fresh process.

    python bench/mezo_step.py [--model smollm2-135m] [--quant q4_0] [--batch-size 16] [--repeats 20] [--json]

Two child processes run the same fixed batch of movie-review prompts (logits at the answer position only):
  inference: the base model, no adapter: median time of one forward pass, peak RSS (VmHWM)
  mezo:      the same engine with the default LoRA adapter, full MeZO steps (two forwards, z generation,
             adapter uploads, host loss and update): median step time, peak RSS, and the split of the step
Reported: step_over_two_forwards = median MeZO step / (2 x median bare forward)   (target <= 1.10)
          rss_mezo_over_inference = peak RSS of the MeZO process / of the inference process (target <= 1.15)
Results are appended to bench/results/mezo_step.jsonl with the machine, versions, model hash and seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "mezo_step.jsonl"


def child(args) -> dict:
    """Runs in a fresh process: one role, prints one JSON line."""
    from edgezo import store
    from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info
    from edgezo.data import build_examples, build_task, read_jsonl
    from edgezo.engine import Engine, EngineConfig
    from edgezo.files import peak_rss_bytes
    from edgezo.mezo import MezoConfig, PerturbedParams, StepRecord, apply_update, direction_seed, mezo_step
    from edgezo.objective import loss_function, score

    model_path = store.resolve_model(args.model, args.quant)
    files, template = store.resolve_data("movie-reviews")
    base = read_base_model_info(model_path)  # before the engine, as the CLI does (see edgezo.cli.open_engine)
    engine = Engine(model_path, EngineConfig(n_seq_max=args.batch_size, n_ctx_per_seq=256, n_threads=args.threads))
    records = read_jsonl(files.train)
    task = build_task(records, files.train, engine, template, None)
    batch = build_examples(records[: args.batch_size], files.train, task, engine, 256)
    out = {"role": args.role, "n_tokens": sum(len(ex.tokens) for ex in batch)}
    if args.role == "inference":
        times = []
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            score(engine, batch, task)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        out.update(forward_s=statistics.median(times), forward_min_s=min(times), forward_max_s=max(times))
    else:
        adapter = LoraAdapter.init(base, LoraConfig(), seed=args.seed)
        engine.set_adapter(adapter)
        config = MezoConfig()
        loss_fn = loss_function(engine, batch, task)
        times = []
        for step in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            mezo_step(adapter.tensors, loss_fn, config, args.seed, step, args.warmup + args.repeats)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        # The split of a step's host-side work, timed separately on the same tensors.
        theta, seed = adapter.tensors, direction_seed(args.seed, 0, 0)
        t0 = time.perf_counter()
        view = PerturbedParams(theta, seed, config.eps)
        perturbed = {k: view[k] for k in theta}
        generate_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.update_adapter(perturbed)
        upload_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        apply_update({k: v.copy() for k, v in theta.items()}, StepRecord(0, 1e-9, [seed], [0.0]), config)
        update_s = time.perf_counter() - t0
        out.update(step_s=statistics.median(times), step_min_s=min(times), step_max_s=max(times),
                   perturbation_generation_s=2 * generate_s, adapter_upload_s=2 * upload_s, update_s=update_s,
                   n_adapter_params=adapter.n_params)
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["model_path"] = str(model_path)
    return out


def run_child(args, role: str) -> dict:
    cmd = [sys.executable, __file__, "--child", role, "--model", args.model, "--quant", args.quant,
           "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{role} process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def lora_config() -> dict:
    from edgezo.adapter import LoraConfig, config_dict

    return config_dict(LoraConfig())  # the mezo child trains the default adapter


def machine() -> dict:
    import llama_cpp

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem, "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default="q4_0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", choices=["inference", "mezo"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.role = args.child
        print(json.dumps(child(args)))
        return 0
    from edgezo.files import sha256_file

    inference = run_child(args, "inference")
    mezo = run_child(args, "mezo")
    result = {
        "benchmark": "mezo_step",
        "step_over_two_forwards": mezo["step_s"] / (2 * inference["forward_s"]),
        "rss_mezo_over_inference": mezo["peak_rss_bytes"] / inference["peak_rss_bytes"],
        "inference": inference, "mezo": mezo,
        "model": args.model, "quant": args.quant, "model_sha256": sha256_file(inference["model_path"]),
        "batch_size": args.batch_size, "repeats": args.repeats, "seed": args.seed, "lora": lora_config(),
        "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(result) + "\n")
    if not args.json:
        print(f"forward {inference['forward_s']:.3f} s, MeZO step {mezo['step_s']:.3f} s "
              f"-> step / two forwards = {result['step_over_two_forwards']:.3f} (target <= 1.10)")
        print(f"peak RSS inference {inference['peak_rss_bytes'] / 2**20:.0f} MiB, MeZO {mezo['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"-> ratio {result['rss_mezo_over_inference']:.3f} (target <= 1.15)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
