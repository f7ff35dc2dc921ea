"""A MeZO step, a validation pass and generation on a machine that is doing other things, each in a fresh process.

    python -m bench.busy                      # every load x the three settings below (~12 min on 2 cores)
    python -m bench.busy --settings default,threads-all --loads idle,normal-1 --steps 3

Loads: other processes spinning (`while True: pass`) for the whole measurement, started before the child and
stopped after it: none, 1 or 2 at normal priority, 1 or 2 at nice 19.
Settings (the child's thread count and OpenMP environment):
  default       what edgezo does now: --threads not given (edgezo.threads picks them before each decode), and
                edgezo.threads.OPENMP_DEFAULTS (longer spinning)
  threads-all   edgezo before issue 30: --threads = all cores, libgomp's own defaults
  threads-1     one thread, libgomp's defaults
  and the variants of SETTINGS (--settings to run them), which measured the choice of OpenMP settings.
Each child: the movie-review batch of bench/mezo_step.py, one untimed call then timed repetitions of
  mezo_step    one MeZO step (two forwards, z, adapter uploads, update), default LoRA
  validation   objective.evaluate over 32 validation examples in batches of --batch-size
  generation   32 greedy tokens from one review prompt
Reported: median seconds of each, and each median over the same setting's idle median (the load's slow-down).
Writes bench/results/busy.jsonl (appended) and bench/results/busy.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import common
from bench.mezo_step import setup
from edgezo.devicebench import BUSY_LOOP as SPINNER, busy_loops  # the loads of `edgezo bench --busy` too

NAME = "busy"
TITLE = "Under load: a MeZO step, a validation pass and generation with other processes running"
# libgomp's own default when neither OpenMP variable is set: 300,000 spins (~3 ms) before a waiting thread sleeps.
# Setting either variable also keeps edgezo from setting its own (edgezo.threads.configure_openmp). The other variants
# measured that choice (OMP_WAIT_POLICY=active spins ~5 min, passive not at all).
LIBGOMP_DEFAULT = {"GOMP_SPINCOUNT": "300000"}
SETTINGS = {  # name -> (--threads, -1 for all cores; environment)
    "default": (0, {}),
    "threads-all": (-1, LIBGOMP_DEFAULT),
    "threads-1": (1, LIBGOMP_DEFAULT),
    "default-libgomp": (0, LIBGOMP_DEFAULT),
    "threads-all-active": (-1, {"OMP_WAIT_POLICY": "active"}),
    "threads-all-passive": (-1, {"OMP_WAIT_POLICY": "passive"}),
    "threads-all-spin1e7": (-1, {"GOMP_SPINCOUNT": "10000000"}),
    "threads-all-spin1e8": (-1, {"GOMP_SPINCOUNT": "100000000"}),
    "default-pinned": (0, {"OMP_PROC_BIND": "true", "OMP_PLACES": "cores"}),  # each thread kept on one core
}
LOADS = {"idle": (0, 0), "normal-1": (1, 0), "normal-2": (2, 0), "nice19-1": (1, 19), "nice19-2": (2, 19)}
WORKLOADS = ("mezo_step", "validation", "generation")
N_VALID = 32
GEN_TOKENS = 32
BACKGROUND_SAMPLE_S = 1.0
BACKGROUND_NOISY = 0.2  # cores kept busy by something else before a cell: its figures are marked


# ---- child ----------------------------------------------------------------------------------------------------
def child(args) -> dict:
    from edgezo import mezo
    from edgezo.adapter import LoraAdapter, LoraConfig
    from edgezo.data import build_examples, read_jsonl
    from edgezo.objective import evaluate, loss_function
    from edgezo import store

    model_path, base, engine, task, batch = setup(args)
    adapter = LoraAdapter.init(base, LoraConfig(), seed=args.seed)
    engine.set_adapter(adapter)
    loss_fn, config, steps = loss_function(engine, batch, task), mezo.MezoConfig(), iter(range(10**6))
    files, _ = store.resolve_data("movie-reviews")
    valid = build_examples(read_jsonl(files.valid)[:N_VALID], files.valid, task, engine, 256)
    prompt = batch[0].tokens[:-1]
    times = {
        "mezo_step": common.timed(lambda: mezo.mezo_step(adapter.tensors, loss_fn, config, args.seed, next(steps), 10**6),
                                  1, args.steps),
        "validation": common.timed(lambda: evaluate(engine, valid, task, args.batch_size), 1, args.repeats),
        "generation": common.timed(lambda: list(engine.generate(prompt, GEN_TOKENS)), 1, args.repeats),
    }
    return {"seconds": times, "threads_end": engine.n_threads,
            "openmp": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}


# ---- parent ---------------------------------------------------------------------------------------------------
def measure(args, setting: str, load: str) -> dict:
    threads, env = SETTINGS[setting]
    threads = os.cpu_count() if threads < 0 else threads
    cmd = common.python_cmd(__spec__.name, "--child", "--model", args.model, "--quant", args.quant, "--batch-size",
                            args.batch_size, "--threads", threads, "--steps", args.steps, "--repeats", args.repeats,
                            "--seed", args.seed)
    from edgezo.threads import sample_load

    background, _ = sample_load(BACKGROUND_SAMPLE_S)  # what else ran before this cell's own load
    with busy_loops(*LOADS[load]):
        time.sleep(1)  # let the spinners settle on their cores
        raw = common.run_json(cmd, f"{setting} under {load}", env=env, timeout=args.timeout)
    return {"setting": setting, "load": load, "threads": threads, "background_busy_cores": background,
            **{w: common.summary(raw["seconds"][w]) for w in WORKLOADS},
            "threads_end": raw["threads_end"], "openmp": raw["openmp"]}


def run(args) -> dict:
    from edgezo import store

    machine = common.machine_info()
    model_path = store.resolve_model(args.model, args.quant)
    store.resolve_data("movie-reviews")
    cells = []
    for load in args.loads:
        for setting in args.settings:
            print(f"busy: {setting} under {load} ...", file=sys.stderr, flush=True)
            cells.append(measure(args, setting, load))
    return {"benchmark": NAME, "cells": cells, "ratios": ratios(cells), "model": args.model, "quant": args.quant,
            "model_sha256": common.sha256(model_path), "batch_size": args.batch_size, "steps": args.steps,
            "repeats": args.repeats, "seed": args.seed, "note": args.note, "machine": machine,
            "load_average_end": common.load_average(), "time": common.utc_now()}


def ratios(cells: list[dict]) -> dict:
    """{setting: {load: {workload: median under the load / the same setting's idle median}}}."""
    idle = {c["setting"]: c for c in cells if c["load"] == "idle"}
    return {s: {c["load"]: {w: common.ratio(c[w]["median"], idle[s][w]["median"]) for w in WORKLOADS}
                for c in cells if c["setting"] == s} for s in idle}


def render(result: dict) -> str:
    cells = result["cells"]
    settings = list(dict.fromkeys(c["setting"] for c in cells))
    by = {(c["setting"], c["load"]): c for c in cells}
    parts = []
    for workload in WORKLOADS:
        rows = []
        for load in dict.fromkeys(c["load"] for c in cells):
            row = [load]
            for s in settings:
                c = by.get((s, load))
                r = result["ratios"].get(s, {}).get(load, {}).get(workload)
                noisy = c is not None and (c.get("background_busy_cores") or 0) > BACKGROUND_NOISY
                row.append("" if c is None else f"{c[workload]['median']:.3f}" + (f" ({r:.2f}x)" if r else "")
                           + (" (busy before)" if noisy else ""))
            rows.append(row)
        parts.append(f"**{workload}** (median seconds; x: over the same setting's idle)\n\n"
                     + common.table(["load", *settings], rows))
    return ("\n".join(parts)
            + f"\n{result['model']} {result['quant']}, batch {result['batch_size']} movie-review prompts, default LoRA, "
              f"seed {result['seed']}; MeZO step: {result['steps']} timed steps, validation ({N_VALID} examples) and "
              f"generation ({GEN_TOKENS} tokens): {result['repeats']} each, after one untimed call. Loads: "
              f"`{SPINNER}` processes at normal priority or nice 19. Settings: see the script's docstring. 'busy before': "
              f"something else kept more than {BACKGROUND_NOISY} cores busy in the {BACKGROUND_SAMPLE_S:.0f} s before "
              f"the cell.\n\n"
              f"{common.provenance(result)}\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default="q4_0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed MeZO steps per cell [%(default)s]")
    p.add_argument("--repeats", type=int, default=2, help="timed validation passes and generations [%(default)s]")
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", type=lambda s: s.split(","), default=["default", "threads-all", "threads-1"])
    p.add_argument("--loads", type=lambda s: s.split(","), default=list(LOADS))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per cell [%(default)s]")
    p.add_argument("--note", default="")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [s for s in args.settings if s not in SETTINGS] + [x for x in args.loads if x not in LOADS]
    if unknown:
        p.error(f"unknown setting or load: {', '.join(unknown)}")
    if "idle" not in args.loads:
        args.loads.insert(0, "idle")  # every ratio is over idle
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.child_or_publish(args, NAME, TITLE, child, run, render)


if __name__ == "__main__":
    sys.exit(common.run_main(main))
