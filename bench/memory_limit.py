"""What a MeZO run needs, beside what it peaks at: the same run under memory-cgroup limits stepping down from its
unlimited usage, to the lowest at which its steps keep their speed.

Peak RSS (VmHWM, what the accountant predicts and `--max-memory` checks) counts every resident page, including the
memory-mapped pages of the weights llama.cpp repacked at load: it reads them once to build the interleaved copy and
never again, so under memory pressure the kernel can drop them (they are clean file pages) without slowing anything.
A device with less free memory than the peak may therefore still run the job; below some limit the pages it does
use (token_embd, the weights not repacked, the libraries) start to be re-read and steps slow down.

    sudo python -m bench.memory_limit                 # SmolLM2-135M Q4_0, batch 16, 5 steps, 1 thread: ~5 min
    sudo python -m bench.memory_limit --limits 0,300,280,270

Each run: a copy of the model file, evicted from the page cache first (posix_fadvise DONTNEED) so that the run's
own cgroup is charged for the pages it reads; the limit on the cgroup (v2 memory.max, or v1 memory.limit_in_bytes);
the run's peak RSS, the cgroup's peak usage, its median step time, and its final loss (a limit must not change the
arithmetic). Default limits: unlimited, then around its usage less the accountant's repacked bytes. Needs root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

from bench import common
from edgezo.rundir import RunDir

NAME, TITLE = "memory_limit", "What a MeZO run needs: its speed under memory-cgroup limits below its peak RSS"
CGROUP = Path("/sys/fs/cgroup")
MIB = 2**20


class Cgroup:
    """A memory cgroup of its own (v2 if the unified hierarchy has the memory controller, else v1)."""

    def __init__(self, name: str):
        v2 = (CGROUP / "cgroup.controllers").exists() and "memory" in (CGROUP / "cgroup.controllers").read_text()
        self.path = (CGROUP if v2 else CGROUP / "memory") / name
        self.v2 = v2
        self.path.mkdir(exist_ok=True)

    def limit(self, n_bytes: int) -> None:
        if n_bytes:
            (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(n_bytes))

    def peak_bytes(self) -> int | None:
        peak = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(peak.read_text()) if peak.exists() else None

    def remove(self) -> None:
        self.path.rmdir()


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_under(limit_mib: int, model: Path, args, work: Path) -> dict:
    """One fine-tune in a fresh cgroup limited to `limit_mib` (0: no limit)."""
    cgroup = Cgroup(f"edgezo-memory-limit-{os.getpid()}-{limit_mib}")
    out = work / f"run-{limit_mib}"
    shutil.rmtree(out, ignore_errors=True)
    try:
        cgroup.limit(limit_mib * MIB)
        evict(model)
        enter = f"echo $$ > {cgroup.path / 'cgroup.procs'} && exec \"$@\""
        cmd = ["sh", "-c", enter, "sh", sys.executable, "-m", "edgezo.cli", "finetune", "--model", str(model),
               "--quant", "none", "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads",
               str(args.threads), "--data", "movie-reviews", "--eval-every", "0", "--n-valid", "4", "--seed", "0",
               "--json", "--out", str(out)]
        done = common.run_fresh(cmd)
        peak_usage = cgroup.peak_bytes()
    finally:
        cgroup.remove()
    row = {"limit_mib": limit_mib, "returncode": done["returncode"], "cgroup_peak_bytes": peak_usage}
    if done["returncode"] == 0:
        result = common.last_json(done["stdout"])
        steps = [e["seconds"] for e in RunDir(out).events() if "seconds" in e]
        row.update(peak_rss_bytes=result["peak_rss_bytes"], final_loss=result["final_loss"],
                   median_step_s=statistics.median(steps[1:] or steps))  # the first step also loads
    else:
        row["error"] = done["stderr"].strip().splitlines()[-1:] if done["stderr"].strip() else []
    return row


def predicted(model: Path, args) -> dict:
    cmd = [sys.executable, "-m", "edgezo.cli", "memory", "--model", str(model), "--quant", "none", "--method", "mezo",
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--n-valid", "4", "--seed", "0",
           "--data", "movie-reviews", "--json"]
    return common.run_json(cmd, "edgezo memory")


def render(result: dict) -> str:
    free = result["runs"][0]
    rows = [[r["limit_mib"] or "none", r["returncode"], common.mib(r.get("cgroup_peak_bytes")),
             common.mib(r.get("peak_rss_bytes")), common.fmt(r.get("median_step_s"), 2),
             common.fmt(common.ratio(r["median_step_s"], free["median_step_s"]) if r.get("median_step_s") else None, 2),
             "yes" if r.get("final_loss") == free.get("final_loss") else "NO"] for r in result["runs"]]
    p = result["prediction"]
    text = (f"{result['model']} ({result['quant']}), MeZO, batch {result['batch_size']}, {result['steps']} steps, "
            f"{result['threads']} thread(s), seed 0, movie-reviews. The accountant predicts a peak RSS of "
            f"{common.mib(p['predicted_bytes'])}, of which {common.mib(p['breakdown']['weights_repacked_bytes'])} "
            f"repacked weights (whose mapped sources are read once, at load).\n\n")
    text += common.table(["cgroup limit (MiB)", "exit", "cgroup peak usage", "peak RSS (VmHWM)", "median step s",
                          "over unlimited", "same final loss"], rows)
    text += ("\nThe cgroup charges the pages the run itself brings in (the model file is evicted first); libraries "
             "already cached by other processes count in its RSS but not in its cgroup. A limit is met at no cost while "
             "the step time stays at the unlimited run's.\n\n")
    return text + common.provenance(result) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default="q4_0")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limits", help="comma-separated MiB, 0 = none [none, then the unlimited usage less the repacked "
                                    "bytes, +10, -10, -20]")
    p.add_argument("--work", type=common.work_dir, default=str(common.ROOT / "runs" / "memory-limit"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from edgezo import store

    model = args.work / f"{args.model}.{args.quant}.gguf"
    shutil.copyfile(store.resolve_model(args.model, args.quant), model)  # pages of its own to evict and charge
    prediction = predicted(model, args)
    runs = [run_under(0, model, args, args.work)]
    if args.limits:
        limits = [int(x) for x in args.limits.split(",") if int(x)]
    else:
        need = (runs[0]["cgroup_peak_bytes"] - prediction["breakdown"]["weights_repacked_bytes"]) // MIB
        limits = [need + 10, need, need - 10, need - 20]
    runs += [run_under(limit, model, args, args.work) for limit in limits]
    result = {"benchmark": NAME, "time": common.utc_now(), "machine": common.machine_info(), "model": args.model,
              "quant": args.quant, "model_sha256": common.sha256(model), "steps": args.steps,
              "batch_size": args.batch_size, "threads": args.threads, "prediction": prediction, "runs": runs}
    common.publish(NAME, TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
