"""What distributed MeZO puts on a real network link: bytes and packets per step on the wire between two hosts.

    python -m bench.wire_bytes [--steps 5,25] [--parallel data,direction] [--json]      (as root)

The two hosts are network namespaces joined by a veth pair (bench/netns.py): each rank has its own network stack,
so everything the ranks exchange crosses the link through the kernel's TCP/IP, and the link's counters count it,
TCP/IP headers, gloo's framing and acknowledgements included. Each host runs one rank of `edgezo finetune` with
torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR = host 0, MASTER_PORT; GLOO_SOCKET_IFNAME = the link),
1 thread, SmolLM2-135M q4_0, movie-reviews, batch 16, seed 0, LoRA defaults, validation only at the end.
Two runs that differ only in --steps give the cost of a step by difference, free of the fixed costs (rendezvous,
handshake, the final validation and adapter hashes): (bytes(S2) - bytes(S1)) / (S2 - S1), each direction
separately (host 0 -> host 1 is rank 0's sending, the reverse rank 1's). Compared with the payload the trainer
counts (`bytes_per_step_per_worker`: the tensors handed to gloo) and with the adapter's size.
Writes bench/results/wire_bytes.jsonl (appended) and bench/results/wire_bytes.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import common
from bench import netns

NAME = "wire_bytes"
TITLE = "Distributed MeZO: bytes on the wire per step, two hosts"


def run_pair(args, hosts, parallel: str, steps: int, out: Path, port: int) -> dict:
    """One run on both hosts; host 0's link counters before and after, and rank 0's JSON."""
    before = hosts[0].counters()
    procs = []
    for rank, host in enumerate(hosts):
        argv = [sys.executable, "-m", "edgezo.cli", "finetune", "--model", args.model, "--quant", args.quant,
                "--data", "movie-reviews", "--batch-size", "16", "--steps", str(steps), "--eval-every", "0",
                "--n-valid", "16", "--save-every", str(steps), "--threads", "1", "--seed", "0",
                "--parallel", parallel, "--out", str(out / f"{parallel}-{steps}-rank{rank}"), "--json"]
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": hosts[0].address,
               "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": host.device,
               "PYTHONPATH": os.pathsep.join(p for p in (str(common.ROOT), os.environ.get("PYTHONPATH")) if p)}
        log = open(out / f"{parallel}-{steps}-rank{rank}.log", "w+")
        procs.append((subprocess.Popen(host.command(argv), env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        if proc.wait(timeout=3600) != 0:
            log.seek(0)
            raise common.ChildFailed(f"{parallel} {steps} steps: a rank failed:\n{log.read()[-3000:]}")
    after = hosts[0].counters()
    procs[0][1].seek(0)
    result = common.last_json(procs[0][1].read())
    for _, log in procs:
        log.close()
    return {"steps": steps, "link": {k: after[k] - before[k] for k in after}, "rank0": result}


def per_step(short: dict, long: dict) -> dict:
    """Link counters per step: the difference of two runs over the difference of their step counts."""
    n = long["steps"] - short["steps"]
    return {k: (long["link"][k] - short["link"][k]) / n for k in long["link"]}


def run(args) -> dict:
    from edgezo import store

    machine = common.machine_info()
    model_path = store.resolve_model(args.model, args.quant)  # fetch / requantize before the hosts exist
    store.resolve_data("movie-reviews")
    modes = []
    with netns.two_hosts() as hosts, tempfile.TemporaryDirectory(prefix="edgezo-wire-") as tmp:
        for k, parallel in enumerate(args.parallel):
            pair = [run_pair(args, hosts, parallel, s, Path(tmp), 29611 + 2 * k + j) for j, s in enumerate(args.steps)]
            rank0 = pair[-1]["rank0"]
            modes.append({"parallel": parallel, "runs": pair, "per_step": per_step(*pair),
                          "payload_bytes_per_step_per_worker": rank0["bytes_per_step_per_worker"],
                          "adapter_bytes": rank0["adapter_bytes"], "replicas_identical": rank0["replicas_identical"]})
            ps = modes[-1]["per_step"]
            print(f"{parallel}: {ps['tx_bytes']:.0f} B/step host0->host1, {ps['rx_bytes']:.0f} B/step back "
                  f"(payload {modes[-1]['payload_bytes_per_step_per_worker']} B per worker)", file=sys.stderr)
    return {"benchmark": NAME, "modes": modes, "steps": args.steps, "model": args.model, "quant": args.quant,
            "model_sha256": common.sha256(model_path), "seed": 0, "note": args.note, "machine": machine,
            "load_average_end": common.load_average(), "time": common.utc_now()}


def render(result: dict) -> str:
    rows = []
    for m in result["modes"]:
        ps, short = m["per_step"], m["runs"][0]
        fixed = short["link"]["tx_bytes"] + short["link"]["rx_bytes"] - short["steps"] * (ps["tx_bytes"] + ps["rx_bytes"])
        rows.append([m["parallel"], m["payload_bytes_per_step_per_worker"], f"{ps['tx_bytes']:.0f}",
                     f"{ps['rx_bytes']:.0f}", f"{ps['tx_packets']:.1f} / {ps['rx_packets']:.1f}", f"{fixed / 1e3:.1f} kB",
                     f"{m['adapter_bytes'] / 1e6:.2f} MB", "yes" if m["replicas_identical"] else "NO"])
    s1, s2 = result["steps"]
    return (common.table(["parallel", "payload B/step/worker (trainer's count)", "wire B/step host 0 -> 1",
                          "wire B/step host 1 -> 0", "packets/step (each way)", "fixed cost per run (both ways)",
                          "adapter (never sent)", "replicas identical"], rows)
            + f"\nTwo hosts = two network namespaces joined by a veth pair; one rank each, 1 thread; "
              f"{result['model']} {result['quant']}, movie-reviews, batch 16, seed 0, LoRA defaults, validation only "
              f"at the end on 16 examples. Per step = (counter after {s2} steps - after {s1} steps) / {s2 - s1}, "
              f"from the link's own counters: TCP/IP headers, gloo framing and ACKs included. Fixed cost: "
              f"rendezvous (torch's TCPStore), handshake, final validation and adapter hashes.\n\n"
              f"{common.provenance(result)}\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default="q4_0")
    p.add_argument("--steps", default="5,25", help="the two step counts whose difference is measured [%(default)s]")
    p.add_argument("--parallel", default="data,direction", help="modes to measure [%(default)s]")
    p.add_argument("--note", default="", help="free text stored with the result")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.steps = sorted(int(s) for s in args.steps.split(","))
    args.parallel = [m.strip() for m in args.parallel.split(",") if m.strip()]
    if len(args.steps) != 2 or args.steps[0] == args.steps[1]:
        p.error("--steps takes two different step counts, e.g. 5,25")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except netns.HostsUnavailable as exc:
        print(f"wire_bytes: cannot build the two hosts: {exc}", file=sys.stderr)
        return 1
    common.publish(NAME, TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
