"""MeZO on a generative task: zero-shot, MeZO on the NLL, MeZO on a reward of its own generations, torch BP on the NLL.

    python -m bench.generative --work runs/generative            # every configuration, one after another
    python -m bench.generative --work runs/generative --only mezo-reward

Data: the built-in synthetic tool-calls task (edgezo.toolcalls: a request -> one JSON function call, chat format,
a quarter of the examples two-turn). Each configuration trains in a fresh process on SmolLM2-135M Q4_0, batch 16,
seed 0, for about the same training wall-clock (the steps below were sized from measured step times on the machine
that made the figures; the table states each run's actual seconds). MeZO runs validate by greedy generation on the
first N_VALID validation examples; every final adapter (and the base model, zero-shot) is then tested by greedy
generation on N_TEST test examples whose request templates occur in training ("seen") and N_TEST whose templates
never do ("unseen"). A finished run in --work is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import common

from edgezo.rundir import RunDir  # noqa: E402

NAME, TITLE = "generative", "MeZO on a generative task (tool calls): NLL against a reward of its own generations, BP alongside"
N_VALID, N_TEST = 64, 80  # validation examples per evaluation; test examples per template kind
COMMON = ["--model", "smollm2-135m", "--quant", "q4_0", "--data", "tool-calls", "--batch-size", "16", "--json"]
# name -> (command, steps, eval every, extra flags). About 600 s of training each: a MeZO step on the NLL took
# 9.6 s here (two forward passes over 16 x ~110 tokens), a reward step about 10.6 s (two batched greedy
# generations), a torch BP step about 12 s.
CONFIGS = {
    "zero-shot": None,
    "mezo-nll": ("finetune", 62, 20, ["--eval-generation"]),
    "mezo-reward": ("finetune", 56, 20, ["--objective", "tool-call"]),
    "bp-nll": ("reference-bp", 50, 10, []),
}
TEST_METRICS = ("exact_match", "json_valid", "name_accuracy", "argument_accuracy", "loss")


def test_files(work: Path) -> dict[str, Path]:
    """The first N_TEST test records of each template kind, as files for `edgezo eval --test`."""
    from edgezo import store, toolcalls

    records = [json.loads(line) for line in (store.fetch(toolcalls.NAME) / "test.jsonl").read_text().splitlines()]
    files = {}
    for kind, unseen in (("seen", False), ("unseen", True)):
        path = work / f"test-{kind}.jsonl"
        chosen = [r for r in records if r["unseen_template"] == unseen][:N_TEST]
        path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
        files[kind] = path
    return files


def train(name: str, work: Path, threads: int) -> dict:
    command, steps, every, extra = CONFIGS[name]
    out = work / name
    if not (out / "adapter.gguf").exists():
        argv = ["-m", "edgezo.cli", command, *COMMON, "--seed", "0", "--steps", str(steps), "--eval-every", str(every),
                "--n-valid", str(N_VALID), "--threads", str(threads), "--out", str(out), *extra]
        if command == "finetune":
            argv += ["--save-every", "10"] + (["--resume"] if (out / "state.json").exists() else [])
        common.run_json([sys.executable, *argv], name, timeout=4 * 3600)
    log = RunDir(out).events()
    steps_logged = [e for e in log if "loss" in e]
    step_seconds = [e["seconds"] for e in steps_logged][1:]  # the first step warms caches and thread pools
    run = {"name": name, "command": f"edgezo {command} " + " ".join(extra), "steps": steps,
           "train_seconds": max(e["train_seconds"] for e in log), "step_seconds": common.summary(step_seconds),
           "curve": [e for e in log if "valid_loss" in e], "adapter": str(out / "adapter.gguf")}
    if command == "finetune":  # a step whose two evaluations scored the same learns nothing
        run["flat_step_fraction"] = sum(all(g == 0 for g in e["projected_grads"]) for e in steps_logged) / len(steps_logged)
    return run


def summarize(runs: list[dict]) -> dict:
    """A reward step's cost over an NLL step's (median seconds), and each run's test exact match over zero-shot's."""
    by_name = {r["name"]: r for r in runs}
    out = {}
    if "mezo-reward" in by_name and "mezo-nll" in by_name:
        out["reward_step_over_nll_step"] = common.ratio(by_name["mezo-reward"]["step_seconds"]["median"],
                                                        by_name["mezo-nll"]["step_seconds"]["median"])
    zero = by_name.get("zero-shot")
    if zero:
        out["exact_match_gain"] = {r["name"]: {kind: r["test"][kind]["exact_match"] - zero["test"][kind]["exact_match"]
                                               for kind in r["test"]} for r in runs if r is not zero}
    return out


def test(name: str, adapter: str | None, files: dict[str, Path], work: Path, threads: int) -> dict:
    """Test metrics of `adapter` (None: the base model) per template kind; kept in work/test-NAME.json for reuse."""
    done = work / f"test-{name}.json"
    if done.exists():
        return json.loads(done.read_text())
    out = {}
    for kind, path in files.items():
        argv = ["-m", "edgezo.cli", "eval", *COMMON, "--split", "test", "--test", str(path), "--threads", str(threads)]
        result = common.run_json([sys.executable, *argv, *(["--adapter", adapter] if adapter else [])], f"test {kind}")
        out[kind] = {k: result[k] for k in (*TEST_METRICS, "n_examples", "seconds")}
    done.write_text(json.dumps(out))
    return out


def render(result: dict) -> str:
    rows = []
    for r in result["runs"]:
        first, last = (r["curve"][0], r["curve"][-1]) if r.get("curve") else ({}, {})
        valid = (f"{common.fmt(first.get('valid_exact_match'))} -> {common.fmt(last.get('valid_exact_match'))}"
                 if "valid_exact_match" in last else "-")
        nll = f"{first['valid_loss']:.3f} -> {last['valid_loss']:.3f}" if last else "-"
        tests = [f"{r['test'][kind]['exact_match']:.3f} / {r['test'][kind]['json_valid']:.2f} / "
                 f"{r['test'][kind]['argument_accuracy']:.2f} / {r['test'][kind]['loss']:.3f}" for kind in ("seen", "unseen")]
        step = common.spread(r["step_seconds"], 1) if "step_seconds" in r else "-"
        flat = common.fmt(r.get("flat_step_fraction"), 2)
        rows.append([r["name"], r.get("command", "edgezo eval"), r.get("steps", 0), step,
                     common.fmt(r.get("train_seconds"), 0), flat, nll, valid, *tests])
    header = ["run", "command (extra flags)", "steps", "s per step", "train s", "flat steps", "valid NLL start -> end",
              "valid exact match start -> end", "test seen: exact / JSON valid / args / NLL",
              "test unseen: exact / JSON valid / args / NLL"]
    text = common.table(header, rows)
    ratio = result["summary"].get("reward_step_over_nll_step")
    if ratio:
        text += f"\nA MeZO step on the reward (two batched greedy generations) costs {ratio:.2f}x a step on the NLL.\n"
    text += (f"\nsmollm2-135m q4_0, tool-calls (synthetic, chat format, 2000 train examples), batch 16, seed 0, LoRA "
             f"rank 16 alpha 32 on attn_k,attn_v, MeZO lr 1e-3 eps 1e-2, BP AdamW lr 1e-3. Validation on the first "
             f"{N_VALID} validation examples (MeZO by greedy generation too); test on {N_TEST} examples with seen and "
             f"{N_TEST} with unseen request templates, greedy generation of the last assistant turn; args = argument "
             f"accuracy; NLL = completion NLL per token; flat steps = fraction of MeZO steps whose perturbed "
             f"evaluations scored the same (no update). Each run a fresh process, one after another; train s excludes "
             f"evaluations.\n\n")
    return text + common.provenance(result) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=common.work_dir, required=True, help="directory of the runs (created; reused to continue)")
    p.add_argument("--only", help="comma-separated configuration names [all]: " + ", ".join(CONFIGS))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    machine = common.machine_info()
    files = test_files(args.work)
    runs = []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        run = {"name": name} if CONFIGS[name] is None else train(name, args.work, args.threads)
        run["test"] = test(name, run.get("adapter"), files, args.work, args.threads)
        runs.append(run)
    result = {"benchmark": NAME, "time": common.utc_now(), "machine": machine, "runs": runs, "summary": summarize(runs),
              "load_average_end": common.load_average()}
    common.publish(NAME, TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
