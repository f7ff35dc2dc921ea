"""MeZO step cost against bare inference through llama.cpp, each measured in a fresh process.

    python -m bench.mezo_step [--model smollm2-135m] [--quant q4_0] [--batch-size 16] [--repeats 20] [--quick] [--json]

Two child processes run the same fixed batch of movie-review prompts (logits at the answer position only):
  inference: the base model, no adapter: median time of one forward pass (Engine.logits: fill the batch,
             llama_decode, copy the label-word logits), peak RSS
  mezo:      the default LoRA adapter (rank 16, alpha 32, attn_k/attn_v) set on the same engine; rounds of a block
             of bare forwards (as above, the adapter detached with Engine.adapter_detached) and a block of full MeZO
             steps (edgezo.mezo.mezo_step: two forwards, z generation, adapter uploads, host loss, update), each
             block after one untimed call. Both figures of the ratio come from this one process, in adjacent
             blocks: two fresh processes doing identical work differed by up to 20 % here, and the machine's speed
             drifts within minutes. Then as many steps again with each part timed (wrappers around the real
             functions), which gives the split of what a step costs beyond two bare forwards:
               lora_in_graph   the two decodes with the adapter minus two decodes without it
               z_generation    building theta +- eps*z, tensor by tensor (PerturbedParams)
               adapter_upload  ggml_backend_tensor_set of those tensors (Engine.update_adapter minus z generation)
               host_loss       log-softmax and cross-entropy on the host (objective.score minus Engine.logits)
               update          theta -= lr * g * z, regenerating z (mezo.apply_update)
               other           the rest (Python glue; the instrumented steps' sum may differ from the plain median)
Reported: step_over_two_forwards = median over rounds of median step / (2 x median bare forward)   (<= 1.10)
          rss_mezo_over_inference = peak RSS of the MeZO process / of the inference process
Writes bench/results/mezo_step.jsonl (appended) and bench/results/mezo_step.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

from bench import common

NAME = "mezo_step"
TITLE = "MeZO step cost vs two bare forward passes"
TARGET = 1.10
TARGET_RSS = 1.15  # peak RSS of MeZO over inference
BLOCK = 5  # timed calls per block of bare forwards or of MeZO steps in the mezo process
PARTS = ("lora_in_graph", "z_generation", "adapter_upload", "host_loss", "update", "other")


class Stopwatch:
    """Seconds spent inside wrapped functions, accumulated per name (nested wrappers each count their own)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


def setup(args):
    """Engine, task and the fixed batch; the base model info is read before the engine, as the CLI does."""
    from edgezo import store
    from edgezo.adapter import read_base_model_info
    from edgezo.data import build_examples, build_task, read_jsonl
    from edgezo.engine import Engine, EngineConfig

    model_path = store.resolve_model(args.model, args.quant)
    files, template = store.resolve_data("movie-reviews")
    base = read_base_model_info(model_path)
    engine = Engine(model_path, EngineConfig(n_seq_max=args.batch_size, n_ctx_per_seq=256, n_threads=args.threads))
    records = read_jsonl(files.train)
    task = build_task(records, files.train, engine, template, None)
    batch = build_examples(records[: args.batch_size], files.train, task, engine, 256)
    return model_path, base, engine, task, batch


def child_inference(args, engine, task, batch) -> dict:
    from edgezo.objective import score

    forward = bare_forwards(engine, task, batch, args.warmup, args.repeats)
    score_times = common.timed(lambda: score(engine, batch, task), 0, args.repeats)
    return {"forward_seconds": forward, "score_seconds": score_times}


def bare_forwards(engine, task, batch, warmup: int, repeats: int) -> list[float]:
    """Seconds of Engine.logits on the batch (no adapter active: the denominator of the ratio)."""
    return common.timed(lambda: engine.logits([ex.tokens for ex in batch], [[len(ex.tokens) - 1] for ex in batch],
                                              columns=task.label_token_ids), warmup, repeats)


def child_mezo(args, base, engine, task, batch) -> dict:
    from edgezo import mezo
    from edgezo.adapter import LoraAdapter, LoraConfig
    from edgezo.objective import loss_function

    adapter = LoraAdapter.init(base, LoraConfig(), seed=args.seed)
    engine.set_adapter(adapter)
    config = mezo.MezoConfig()
    loss_fn = loss_function(engine, batch, task)
    n_rounds = max(1, args.repeats // BLOCK)
    total = n_rounds * (BLOCK + 1) + args.repeats
    step = iter(range(total))
    # Blocks of bare forwards (adapter detached) and of MeZO steps, alternating in this one process: two fresh
    # processes doing identical work differed by up to 20 % here, and the machine's speed drifts within minutes.
    # Each block starts with one untimed call (the switch rebuilds llama.cpp's graph).
    rounds = []
    for _ in range(n_rounds):
        with engine.adapter_detached():
            forwards = bare_forwards(engine, task, batch, 1, BLOCK)
        steps = common.timed(lambda: mezo.mezo_step(adapter.tensors, loss_fn, config, args.seed, next(step), total),
                             1, BLOCK)
        rounds.append({"forward_seconds": forwards, "step_seconds": steps})
    # The same steps again with every part wrapped. Wrappers cost ~1 us per call (~300 calls per step).
    clock = Stopwatch()
    engine.logits = clock.wrap("decode", engine.logits)
    engine.update_adapter = clock.wrap("upload_and_z", engine.update_adapter)
    original_getitem, original_update = mezo.PerturbedParams.__getitem__, mezo.apply_update
    mezo.PerturbedParams.__getitem__ = clock.wrap("z_generation", original_getitem)
    mezo.apply_update = clock.wrap("update", original_update)
    loss_fn = clock.wrap("loss", loss_function(engine, batch, task))
    parts = []
    try:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            mezo.mezo_step(adapter.tensors, loss_fn, config, args.seed, next(step), total)
            s = clock.take()
            parts.append({"step": time.perf_counter() - t0, "decode": s["decode"], "z_generation": s["z_generation"],
                          "adapter_upload": s["upload_and_z"] - s["z_generation"],
                          "host_loss": s["loss"] - s["upload_and_z"] - s["decode"], "update": s["update"]})
    finally:
        mezo.PerturbedParams.__getitem__, mezo.apply_update = original_getitem, original_update
    return {"rounds": rounds, "instrumented": parts, "n_adapter_params": adapter.n_params}


def child(args) -> dict:
    from edgezo.files import peak_rss_bytes

    model_path, base, engine, task, batch = setup(args)
    out = (child_inference(args, engine, task, batch) if args.child == "inference"
           else child_mezo(args, base, engine, task, batch))
    out.update(role=args.child, n_tokens=sum(len(ex.tokens) for ex in batch), peak_rss_bytes=peak_rss_bytes(),
               model_path=str(model_path))
    return out


# ---- parent ---------------------------------------------------------------------------------------------------
def split(mezo: dict) -> dict:
    """Seconds per step of each part beyond two bare forwards of the same process (medians over the instrumented
    steps)."""
    def med(key):
        return common.summary([p[key] for p in mezo["instrumented"]])["median"]

    forward = mezo["forward"]["median"]
    parts = {"lora_in_graph": med("decode") - 2 * forward,
             **{k: med(k) for k in ("z_generation", "adapter_upload", "host_loss", "update")}}
    remainder = mezo["step"]["median"] - 2 * forward
    parts["other"] = remainder - sum(parts.values())
    return {"remainder_seconds": remainder, "parts_seconds": parts}


def round_ratios(rounds: list[dict]) -> list[float]:
    """median step / (2 x median bare forward) of each round, whose two blocks ran one after the other."""
    return [common.summary(r["step_seconds"])["median"] / (2 * common.summary(r["forward_seconds"])["median"])
            for r in rounds]


def measure(args, role: str) -> dict:
    cmd = common.python_cmd(__spec__.name, "--child", role, "--model", args.model, "--quant", args.quant, "--batch-size",
                            args.batch_size, "--repeats", args.repeats, "--warmup", args.warmup, "--threads",
                            args.threads, "--seed", args.seed)
    raw = common.run_json(cmd, f"{role} process")
    raw["peak_rss_bytes_wait4"] = raw.pop("_process")["peak_rss_bytes"]
    return raw


def run(args) -> dict:
    from edgezo import store
    from edgezo.adapter import LoraConfig, config_dict

    machine = common.machine_info()
    model_path = store.resolve_model(args.model, args.quant)  # requantize (cached) before any timing
    inference, mezo = measure(args, "inference"), measure(args, "mezo")
    inference["forward"] = common.summary(inference.pop("forward_seconds"))
    inference["score"] = common.summary(inference.pop("score_seconds"))
    rounds = mezo.pop("rounds")
    ratios = round_ratios(rounds)
    mezo["forward"] = common.summary([x for r in rounds for x in r["forward_seconds"]])
    mezo["step"] = common.summary([x for r in rounds for x in r["step_seconds"]])
    return {
        "benchmark": NAME,
        "step_over_two_forwards": common.summary(ratios)["median"],  # the median over rounds
        "step_over_two_forwards_rounds": ratios,
        "target_step_over_two_forwards": TARGET,
        "rss_mezo_over_inference": mezo["peak_rss_bytes"] / inference["peak_rss_bytes"],
        "target_rss_mezo_over_inference": TARGET_RSS,
        **split(mezo),
        "inference": inference, "mezo": mezo,
        "model": args.model, "quant": args.quant, "model_sha256": common.sha256(model_path),
        "batch_size": args.batch_size, "n_tokens": inference["n_tokens"], "warmup": args.warmup,
        "repeats": args.repeats, "threads": args.threads, "seed": args.seed, "lora": config_dict(LoraConfig()),
        "quick": args.quick, "note": args.note, "machine": machine, "load_average_end": common.load_average(),
        "time": common.utc_now(),
    }


def render(result: dict) -> str:
    inf, mz = result["inference"], result["mezo"]
    per_round = result["step_over_two_forwards_rounds"]
    rows = [["bare forward (Engine.logits, adapter detached), s", common.spread(mz["forward"]), ""],
            ["MeZO step (2 forwards with the adapter + the parts below), s", common.spread(mz["step"]), ""],
            ["**step / two forwards** (median over rounds, min-max)",
             f"{common.fmt(result['step_over_two_forwards'])} ({min(per_round):.3f}-{max(per_round):.3f})",
             f"<= {result['target_step_over_two_forwards']:.2f}"],
            ["bare forward in the separate inference process, s", common.spread(inf["forward"]), ""],
            ["peak RSS inference / MeZO", f"{common.mib(inf['peak_rss_bytes'])} / {common.mib(mz['peak_rss_bytes'])}", ""],
            ["**peak RSS MeZO / inference**", common.fmt(result["rss_mezo_over_inference"]),
             f"<= {result['target_rss_mezo_over_inference']:.2f}"]]
    step_ms = 1e3 * result["remainder_seconds"]
    parts = [[name, f"{1e3 * result['parts_seconds'][name]:.1f} ms"] for name in PARTS]
    lora = result["lora"]
    return (common.table(["", "median (min-max)", "target"], rows)
            + f"\nWhere the remainder (step - 2 x forward = {step_ms:.1f} ms per step) goes, medians of "
              f"{result['repeats']} instrumented steps:\n\n"
            + common.table(["part", "per step"], parts)
            + f"\n{result['model']} {result['quant']}, batch {result['batch_size']} movie-review prompts "
              f"({result['n_tokens']} tokens, logits at the answer position only), LoRA rank {lora['rank']} alpha "
              f"{lora['alpha']:g} on {','.join(lora['targets'])}, seed {result['seed']}, threads "
              f"{result['threads'] or 'all'}. Each role in a fresh process. The MeZO process alternates {len(per_round)} "
              f"rounds of {BLOCK} bare forwards (adapter detached) and {BLOCK} MeZO steps, each block after one "
              f"untimed call; the ratio is the median over rounds of median step / (2 x median forward). The "
              f"inference process (RSS, and its forward time for reference): {result['warmup']} warm-up and "
              f"{result['repeats']} repetitions.\n\n{common.provenance(result)}\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default="q4_0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="1 warm-up, 5 repetitions")
    p.add_argument("--note", default="", help="free text stored with the result (e.g. 'measured under load')")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", choices=["inference", "mezo"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 1, 5
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.child_or_publish(args, NAME, TITLE, child, run, render)


if __name__ == "__main__":
    sys.exit(common.run_main(main))
