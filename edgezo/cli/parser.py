"""The argument parser of every command, and the flags a parsed Namespace (or a config file) stands for."""

from __future__ import annotations

import argparse


from .. import store
from ..adapter import DEFAULT_TARGETS, LoraConfig
from ..files import EdgezoError
from ..mezo import AUTO, Estimator, MezoConfig, Schedule
from ..trainer import TrainConfig
from .output import say
from ..resolve import DEFAULT_DATA, DEFAULT_MAX_SEQ_LEN, DEFAULT_MODEL, DEFAULT_QUANT, FZOO_DEFAULT_DIRECTIONS


# ---- shared setup ------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    """-c/--config, --json and the base model group, shared by every command that runs a model."""
    p.add_argument("-c", "--config", metavar="FILE",
                   help="YAML or JSON file of flag values (keys = long flag names, e.g. learning_rate); flags given "
                   "here override it; a run's config.json is valid input")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    g = p.add_argument_group("base model")
    # Both default to None so a command can tell "not given" from a value: then the run directory's own base
    # (--adapter RUN, --resume) applies, else DEFAULT_MODEL; see resolve_base.
    g.add_argument("--model", help=f"built-in name ({', '.join(store.MODELS)}) or GGUF path "
                   f"[the run's own base with --adapter RUN / --resume, else {DEFAULT_MODEL}]")
    g.add_argument("--quant", help=f"requantize the base with llama.cpp to this type (q4_0, q8_0, f16, ...; cached), "
                   f"'none': the file as it is [the run's own; a built-in name: {DEFAULT_QUANT}; a GGUF path: as it is]")
    g.add_argument("--threads", type=int, default=0,
                   help="llama.cpp threads [the cores other processes leave free, measured again before each decode]")


def add_data_args(p: argparse.ArgumentParser, with_defaults: bool = True) -> None:
    p = p.add_argument_group("data")
    p.add_argument("--data", default=DEFAULT_DATA if with_defaults else None,
                   help=f"built-in dataset ({', '.join(store.DATASETS)}), a JSONL file or a directory of "
                        "train/valid/test.jsonl [%(default)s]")
    p.add_argument("--valid", help="validation JSONL (with a --data file)")
    p.add_argument("--test", help="test JSONL (with a --data file)")
    p.add_argument("--template", help="classification prompt with {text}; default: the dataset's, else '{text}\\nLabel:'")
    p.add_argument("--label-words", help="label=word pairs, comma-separated (default word of label L: ' L')")
    p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt/completion and chat data: loss on the completion / every assistant turn only; "
                   "--no-mask-prompt: on every token (mlx-lm's default) [the run's own, else on]")
    p.add_argument("--max-seq-len", "--max-seq-length", type=int, default=DEFAULT_MAX_SEQ_LEN,
                   help="longest example in tokens [%(default)s]")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                   help="sequences per step / per evaluation [%(default)s]")


# ---- parser ------------------------------------------------------------------------------------------------------
def add_run_args(p: argparse.ArgumentParser) -> dict:
    """Arguments every training command shares (finetune and the torch references): model, data, LoRA, steps,
    schedule, seed, validation, run directory and memory budget. Returns the --help groups by name, for the
    command's own flags. Aliases are mlx-lm's names where the meaning is the same (--iters, --adapter-path,
    --steps-per-eval, --max-seq-length)."""
    add_model_args(p)
    add_data_args(p)
    m, t, lo = MezoConfig(), TrainConfig(), LoraConfig()
    groups = {name: p.add_argument_group(name) for name in ("LoRA", "optimizer", "training loop", "run directory",
                                                            "memory budget")}
    g = groups["LoRA"]
    g.add_argument("--rank", type=int, default=lo.rank, help="[%(default)s]")
    g.add_argument("--alpha", type=float, default=lo.alpha, help="[%(default)s]")
    g.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="LoRA target tensors [%(default)s]")
    g.add_argument("--num-layers", type=int, help="LoRA on the last N blocks only (as mlx-lm) [all]")
    g.add_argument("--layers", help="LoRA on blocks START:STOP only (Python slice, e.g. 24:30 or -6:) [all]")
    g = groups["optimizer"]
    g.add_argument("--weight-decay", type=float, default=m.weight_decay, help="[%(default)s]")
    g.add_argument("--schedule", choices=[s.value for s in Schedule], default=m.schedule.value, help="[%(default)s]")
    g.add_argument("--warmup-steps", type=int, default=m.warmup_steps, help="[%(default)s]")
    g = groups["training loop"]
    g.add_argument("--steps", "--iters", type=int, default=t.steps, help="[%(default)s]")
    g.add_argument("--seed", type=int, default=t.seed, help="[%(default)s]")
    g.add_argument("--eval-every", "--steps-per-eval", type=int, default=t.eval_every,
                   help="validate every N steps, 0: only at the end [%(default)s]")
    g.add_argument("--n-valid", type=int, default=t.n_valid, help="validation examples per evaluation, 0: all [%(default)s]")
    g.add_argument("--max-train-seconds", type=float, default=t.max_train_seconds,
                   help="end the run, validated and saved, once training (evaluations excluded) took this long; "
                        "--steps stays the upper bound, 0: no limit [%(default)s]")
    g = groups["run directory"]
    g.add_argument("--out", "--adapter-path", default="runs/latest", help="run directory [%(default)s]")
    g = groups["memory budget"]
    g.add_argument("--max-memory", help="memory budget (e.g. 600M, 2G): refuse to start if the predicted peak RSS "
                   "exceeds it, stop with a checkpoint if the measured RSS does")
    g.add_argument("--device", help="device profile (a NAME in edgezo/device_profiles, or a .toml file): its usable RAM "
                                    "is the memory budget")
    return groups


def add_generation_args(p: argparse.ArgumentParser, max_tokens: int = 64) -> None:
    """generate / chat: the base and adapter, and llama.cpp's sampler chain (mlx-lm's names as aliases)."""
    add_model_args(p)
    p.add_argument("--adapter", "--adapter-path", help="adapter GGUF, run directory, RUN:best or RUN:last")
    p.add_argument("--system-prompt", "--system", help="a system message first (chat template)")
    p.add_argument("--max-tokens", "-m", type=int, default=max_tokens, help="tokens per reply [%(default)s]")
    p.add_argument("--ctx", type=int, default=2048, help="context in tokens: prompt (or conversation) plus reply "
                   "[%(default)s]")
    g = p.add_argument_group("sampling (llama.cpp's sampler chain, in this order)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty on the last 64 tokens, 1: off [%(default)s]")
    g.add_argument("--top-k", type=int, default=0, help="0: off [%(default)s]")
    g.add_argument("--top-p", type=float, default=1.0, help="1: off [%(default)s]")
    g.add_argument("--min-p", type=float, default=0.0, help="0: off [%(default)s]")
    g.add_argument("--temperature", "--temp", type=float, default=0.0, help="0: greedy [%(default)s]")
    g.add_argument("--seed", type=int, default=0, help="of the final draw [%(default)s]")


def int_list(text: str) -> list[int]:
    """argparse type of llama-bench's list flags: '1,16' -> [1, 16], every number >= 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 1, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    """argparse type of a comma-separated list of names: 'a, b' -> ['a', 'b']."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """edgezo bench: every --model x --quant x --batch-size x --prompt-tokens x --gen-tokens is one row."""
    from ..devicebench import BenchConfig

    c = BenchConfig()
    p.add_argument("-c", "--config", metavar="FILE", help="YAML or JSON file of flag values (keys = long flag names)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    out.add_argument("--csv", action="store_true", help="print the table as CSV (bytes, seconds) instead of markdown")
    g = p.add_argument_group("what to measure (comma-separated lists, as llama-bench's -m -p -n -b)")
    g.add_argument("--model", "-m", type=name_list, default=[DEFAULT_MODEL],
                   help=f"built-in names ({', '.join(store.MODELS)}) or GGUF paths [{DEFAULT_MODEL}]")
    g.add_argument("--quant", type=name_list,
                   help=f"requantize each model to these types (q4_0, q8_0, ...; cached), 'none': the file as it is "
                   f"[a built-in name: {DEFAULT_QUANT}; a GGUF path: as it is]")
    g.add_argument("--batch-size", "-b", type=int_list, default=[1, 16],
                   help="sequences per decode: the prompt batch, the generation streams and the MeZO / BP batch "
                   "[1,16]")
    g.add_argument("--prompt-tokens", "-p", type=int_list, default=[64],
                   help="tokens per sequence of the prompt batch, of MeZO and of BP [64]")
    g.add_argument("--gen-tokens", "-n", type=int_list, default=[32], help="tokens generated per sequence [32]")
    g = p.add_argument_group("how")
    g.add_argument("--repeats", "-r", type=int, default=c.repeats,
                   help="timed repetitions of each figure (mean ± sd) [%(default)s]")
    g.add_argument("--warmup", type=int, default=c.warmup, help="untimed calls before them [%(default)s]")
    g.add_argument("--threads", "-t", type=int, default=c.threads,
                   help="llama.cpp and torch threads [the cores other processes leave free; torch's default]")
    g.add_argument("--seed", type=int, default=c.seed, help="initial adapter and MeZO directions [%(default)s]")
    g.add_argument("--bp", action=argparse.BooleanOptionalAction, default=c.bp,
                   help="also time one BP step of reference-bp where the torch extra is installed [%(default)s]")
    g.add_argument("--busy", type=int, default=c.busy_processes, metavar="N",
                   help="keep N busy loops running while measuring: this device doing other things "
                   "(docs/threads.md) [%(default)s]")
    g.add_argument("--busy-nice", type=int, default=c.busy_nice, metavar="NICE",
                   help="their nice value, 0 (normal priority) to 19 (lowest) [%(default)s]")
    g.add_argument("--timeout", type=float, default=c.timeout_s,
                   help="seconds per child process before its row is reported as failed [%(default)s]")
    p.description = (
        "Measures on this device, for each combination of the lists: prompt processing and generation tokens/s "
        "(edgezo's llama.cpp engine), one MeZO step and its ratio over two forwards of the same batch, the peak RSS "
        "of that short MeZO run beside `edgezo memory`'s prediction, and, with the torch extra, one BP step of "
        "`edgezo reference-bp` and its peak RSS. Each row runs in fresh child processes, so its peak RSS is its "
        "own and a crash is a failed row. The batch is synthetic: windows of a fixed text in the model's own "
        "tokens, exactly --prompt-tokens long, with two label tokens as the classification loss reads them, "
        "so nothing but the model is fetched and every row runs offline once the model is cached.")


RELEASE_HELP = ("return freed tensors to the kernel at once (glibc: allocations >= 64 KiB mapped): a lower peak RSS, "
                "predicted without heap retention, for 1.3-1.6x slower steps (Q4_0 blocks + checkpointing, batch 16, "
                "Intel Xeon: Qwen2.5-Coder-0.5B 1426 against 2032-2084 MiB; SmolLM2-135M 773 against 1248 MiB)")
FINETUNE_LR_HELP = (
    "MeZO learning rate, or auto: each step moves a fixed share of the probe radius (--eps) along its direction "
    "whatever the gradients' scale, and a validation worse than the best by more than 2 standard errors restores "
    "the best adapter at half the rate (docs/finetune.md) [auto]")
LR_HELP = ("MeZO learning rate [the built-in model's tuned rate: "
           + ", ".join(f"{m.name} {m.mezo_learning_rate:g}" for m in store.MODELS.values())
           + f"; a GGUF path: {MezoConfig().learning_rate:g}]")


def learning_rate(text: str) -> float | str:
    """--learning-rate: a number, or auto."""
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or {AUTO!r}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgezo",
                                     description="Fine-tune LLM adapters with forward passes only (MeZO on llama.cpp).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="put built-in models / datasets in the cache ($EDGEZO_HOME)")
    p.add_argument("names", nargs="+", help=f"{', '.join(list(store.MODELS) + list(store.DATASETS))}")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cache", help="what the cache ($EDGEZO_HOME) holds, area by area; --clear removes areas")
    p.add_argument("--clear", metavar="AREAS", help="derived (quantized, split, hidden-states, hf: made again when "
                   "needed), all, or comma-separated areas (models, datasets, hf, quantized, split, hidden-states)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("finetune", help="train a LoRA adapter with MeZO")
    groups = add_run_args(p)
    m, t, lo = MezoConfig(), TrainConfig(), LoraConfig()
    groups["optimizer"].add_argument("--learning-rate", type=learning_rate, help=FINETUNE_LR_HELP)
    groups["optimizer"].add_argument("--eps", type=float, default=m.eps, help="perturbation scale [%(default)s]")
    groups["optimizer"].add_argument("--auto-step", type=float, default=m.auto_step,
                                     help="--learning-rate auto: a typical step's move along its direction, in probe "
                                     "radii (--eps) [%(default)s]")
    groups["optimizer"].add_argument("--auto-clip", type=float, default=m.auto_clip,
                                     help="--learning-rate auto: one step's |projected gradient| counts at most this "
                                     "many times its running RMS (a trust region; 0: off) [%(default)s]")
    groups["optimizer"].add_argument(
        "--estimator", choices=[e.value for e in Estimator], default=m.estimator.value,
        help="mezo: two-sided Gaussian SPSA; fzoo: one-sided Rademacher around the unperturbed loss, step "
        "normalised by the losses' std (arXiv 2506.09034); conmezo: mezo with directions in a cone around the "
        "momentum of its past estimates (arXiv 2511.02757) [%(default)s]")
    groups["optimizer"].add_argument("--n-directions", type=int,
                                     help=f"random directions per step [mezo {m.n_directions}, fzoo {FZOO_DEFAULT_DIRECTIONS}]")
    groups["optimizer"].add_argument("--cone-angle", type=float, default=m.cone_angle,
                                     help="conmezo: the cone's half-angle around the momentum, radians [%(default)s]")
    groups["optimizer"].add_argument("--cone-momentum", type=float, default=m.cone_momentum,
                                     help="conmezo: the momentum's decay per step [%(default)s]")
    groups["optimizer"].add_argument(
        "--objective", default="loss",
        help="what MeZO minimises: loss (the data's NLL), or minus a reward of the greedy generations of "
        "prompt/completion or chat data: exact-match, tool-call (graded JSON call), or MODULE:FUNCTION, a Python "
        "function (prompt, completion) -> float [%(default)s]")
    groups["training loop"].add_argument(
        "--rollback", action=argparse.BooleanOptionalAction,
        help="on a validation worse than the best by more than 2 standard errors, or a non-finite loss, restore the "
        "best adapter and halve the rate (logged, so --resume and replay are exact) [on with --learning-rate auto]")
    groups["training loop"].add_argument(
        "--patience", type=int, default=t.patience,
        help="end the run after N validations in a row without a new best (0: never) [%(default)s]")
    groups["training loop"].add_argument(
        "--eval-generation", action="store_true",
        help="validate also by greedy generation: exact_match (and the reward) [on with a reward --objective]")
    groups["LoRA"].add_argument("--lora-fa", action="store_true", help="LoRA-FA: train B only, A stays at its random init")
    groups["LoRA"].add_argument("--prefix-reuse", choices=["auto", "cache", "off"], default="auto",
                                help="auto: when LoRA sits on the top blocks only (--num-layers), run the blocks "
                                "below once per batch and only the trained ones per evaluation (same logits); cache: "
                                "run them once per example for the whole run, kept in a memory-mapped table (long "
                                "prompts) [%(default)s]")
    groups["run directory"].add_argument("--save-every", type=int, default=t.save_every,
                                         help="checkpoint every N steps [%(default)s]")
    groups["run directory"].add_argument("--resume", action="store_true",
                                         help="continue the run in --out from its last checkpoint")
    groups["run directory"].add_argument("--report-to", choices=["tensorboard", "wandb"],
                                         help="also log losses and accuracy to TensorBoard (RUN/tensorboard; "
                                         "tensorboard extra) or Weights & Biases (wandb installed) [off]")
    groups["run directory"].add_argument("--project-name", help="wandb project [edgezo]")
    g = p.add_argument_group("distributed")
    g.add_argument("--workers", type=int, default=1,
                   help="local processes training one adapter together (torch.distributed, gloo); under torchrun "
                   "leave it out [%(default)s]")
    g.add_argument("--parallel", choices=["data", "direction"], default="data",
                   help="data: shard each step's batch; direction: each worker its own direction(s) [%(default)s]")
    g.add_argument("--peer-timeout", type=float, default=30.0,
                   help="seconds a worker waits for the others at an exchange before it stops with a checkpoint "
                   "(a dead worker is noticed at once) [%(default)s]")
    p.set_defaults(data=None)  # no --data: the run's own with --resume, else DEFAULT_DATA

    for method, help_text in (("bp", "the PyTorch BP reference: AdamW on the same LoRA, data and loss (torch extra)"),
                              ("mezo", "the torch MeZO baseline: MeZO on the same LoRA's torch tensors (torch extra)")):
        p = sub.add_parser(f"reference-{method}", help=help_text)
        groups = add_run_args(p)
        g = groups["optimizer"]
        if method == "bp":
            groups["run directory"].add_argument("--save-every", type=int, default=t.save_every,
                                                 help="checkpoint every N steps [%(default)s]")
            groups["run directory"].add_argument(
                "--resume", action="store_true",
                help="continue the run in --out from its last checkpoint (the same flags; --steps, "
                "--max-train-seconds, --eval-every and --save-every may change)")
            g.add_argument("--learning-rate", type=float, default=1e-3, help="[%(default)s]")
            g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                           help="sgd: plain SGD without momentum, the update MeZO's estimate feeds (for comparison; "
                           "the memory accountant counts AdamW's state) [%(default)s]")
            g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                           help="base weights; the LoRA stays float32 [%(default)s]")
            g.add_argument("--gradient-checkpointing", "--grad-checkpoint", action="store_true",
                           help="recompute activations in backward instead of storing them")
            g.add_argument("--base-dtype", choices=["float", "q8_0", "q4_0"], default="float",
                           help="linear weights: float (the GGUF dequantized once) or kept in the GGUF's q8_0 / q4_0 "
                           "blocks and dequantized on use, QLoRA-style; needs that file: --quant q8_0 / q4_0 "
                           "[%(default)s]")
            g.add_argument("--release-freed-memory", action="store_true", help=RELEASE_HELP)
        else:
            g.add_argument("--learning-rate", type=float, help=LR_HELP)
            g.add_argument("--eps", type=float, default=m.eps, help="perturbation scale [%(default)s]")
        p.set_defaults(method=method, optimizer="adamw", dtype="float32", gradient_checkpointing=False, eps=m.eps,
                       base_dtype="float", release_freed_memory=False, resume=False, save_every=t.save_every)

    p = sub.add_parser("eval", help="accuracy and loss of the base model or an adapter on a split")
    add_model_args(p)
    add_data_args(p, with_defaults=False)
    p.add_argument("--adapter", "--adapter-path", help="adapter GGUF, run directory, RUN:best or RUN:last (none: zero-shot)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="[%(default)s]")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N examples")
    p.add_argument("--reward", help="prompt/completion or chat data: also the mean of this reward of the greedy "
                   "generations (exact-match, tool-call or MODULE:FUNCTION)")

    p = sub.add_parser("generate", help="generate text with the base model and an optional adapter")
    add_generation_args(p)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--no-escape", dest="escape", action="store_false", help="take \\n in the prompt literally")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user turn through the model's own "
                   "chat template (with --system-prompt)")

    p = sub.add_parser("chat", help="interactive multi-turn chat with the model's own chat template, streamed")
    add_generation_args(p, max_tokens=256)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with the adapter applied (serve extra)")
    add_model_args(p)
    p.add_argument("--adapter", "--adapter-path", help="adapter GGUF, run directory, RUN:best or RUN:last")
    p.add_argument("--host", default="127.0.0.1", help="listen address; 0.0.0.0 exposes it to the network [%(default)s]")
    p.add_argument("--port", type=int, default=8000, help="[%(default)s]")
    p.add_argument("--ctx", type=int, default=2048, help="context in tokens per request [%(default)s]")
    p.add_argument("--name", help="model name in /v1/models and requests [the run directory's name, else the model's]")

    p = sub.add_parser("memory", help="predict the peak RSS of a run (edgezo.memory), optionally against a device")
    add_run_args(p)  # the finetune / reference-bp arguments: the prediction is for exactly that run
    p.set_defaults(data=None)  # no --data: the worst case, every sequence --max-seq-len tokens
    p.add_argument("--method", choices=["inference", "mezo", "bp", "bp-ckpt", "bp-quant", "bp-quant-ckpt"], default="mezo",
                   help="bp-quant: reference-bp --base-dtype q8_0 / q4_0 (the base in the --quant file's blocks) [%(default)s]")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="bp: base weights [%(default)s]")
    p.add_argument("--base-dtype", choices=["float", "q8_0", "q4_0"], default="float",
                   help="with --method bp: q8_0 / q4_0 is bp-quant, as in reference-bp [%(default)s]")
    p.add_argument("--gradient-checkpointing", action="store_true", help="with --method bp / bp-quant: its -ckpt form")
    p.add_argument("--release-freed-memory", action="store_true", help="with --method bp*: as in reference-bp")
    p.add_argument("--tokens-per-seq", type=int, help="tokens per sequence without --data [worst case: --max-seq-len]")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="inference: eval's split [%(default)s]")
    p.add_argument("--limit", type=int, default=0, help="inference: eval's --limit [%(default)s]")
    p.add_argument("--prefix-reuse", choices=["auto", "cache", "off"], default="auto",
                   help="mezo with --num-layers: count the split engine's suffix model (and with cache the table of "
                   "every example's hidden states), as finetune runs it [%(default)s]")
    # accepted so a finetune / reference command line can be reused; none of them changes the peak RSS
    for flag, kind in (("--learning-rate", learning_rate), ("--eps", float), ("--n-directions", int), ("--save-every", int),
                       ("--estimator", str)):
        p.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    p.add_argument("--lora-fa", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("capacity", help="the largest model of known families each method fine-tunes on a device")
    p.add_argument("--device", required=True, help="device profile (a NAME in edgezo/device_profiles, or a .toml file)")
    p.add_argument("--family", help="comma-separated families (smollm2, qwen2.5, llama3.2, gemma3; qwen2.5-coder: "
                   "the built-in Qwen2.5-Coder GGUFs) [smollm2,qwen2.5,llama3.2,gemma3]")
    p.add_argument("--batch-size", type=int, default=16, help="[%(default)s]")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence [%(default)s]")
    p.add_argument("--rank", type=int, default=lo.rank, help="[%(default)s]")
    p.add_argument("--alpha", type=float, default=lo.alpha, help="[%(default)s]")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="LoRA targets [%(default)s]")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="zero-shot eval, MeZO fine-tune and tuned eval on the defaults (the README's main job)")
    add_model_args(p)
    p.add_argument("--steps", type=int, default=t.steps, help="[%(default)s]")
    p.add_argument("--out", default="runs/demo", help="run directory [%(default)s]")

    p = sub.add_parser("doctor", help="versions, llama.cpp build, CPU, kernels in use and a decode probe "
                                      "(paste it into bug reports)")
    add_model_args(p)
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="skip the decode of --model in a child process (which fetches it if needed)")

    p = sub.add_parser("bench", help="llama-bench for fine-tuning: prompt and generation tokens/s, a MeZO step, its "
                                     "peak RSS beside the prediction, and a BP step (torch extra), on this device")
    add_bench_args(p)

    p = sub.add_parser("export", help="write the adapter in another format")
    add_model_args(p)
    p.add_argument("--adapter", "--adapter-path", required=True, help="adapter GGUF, run directory, RUN:best or RUN:last")
    p.add_argument("--to", choices=["gguf-lora", "peft", "merged-gguf"], default="gguf-lora",
                   help="GGUF LoRA (llama.cpp --lora), PEFT directory, or the base with the adapter folded in [%(default)s]")
    p.add_argument("--outtype", default="q8_0", help="merged-gguf tensor type (f32, f16, q8_0, q4_0, ...) [%(default)s]")
    p.add_argument("-o", "--output", required=True)

    p = sub.add_parser("plot", help="training and validation curves of runs, overlaid (plot extra: matplotlib)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (finetune, reference-bp, reference-mezo)")
    p.add_argument("-o", "--output", default="curves.png", help="image file; .png, .svg or .pdf [%(default)s]")
    p.add_argument("--title", help="figure title")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("convert", help="format bridges: Hugging Face <-> GGUF, PEFT <-> GGUF LoRA (torch extra)")
    p.add_argument("direction", choices=["hf-to-gguf", "gguf-to-hf", "peft-to-gguf", "gguf-to-peft"])
    p.add_argument("input", help="HF model directory, GGUF file, PEFT adapter directory or GGUF LoRA")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--outtype", default="f32", help="hf-to-gguf tensor type: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 [%(default)s]")
    p.add_argument("--base", help="base model (built-in name or GGUF) for the adapter conversions")
    p.add_argument("--json", action="store_true")
    return parser


def subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[command]


def command_line(command: str, args: argparse.Namespace) -> list[str]:
    """`args`, a parsed (maybe since adjusted) Namespace of `command`, as the flags that parse back to it: the
    command line of a rank process. Options at their default are left out; -c and --json too."""
    argv = [command]
    for action in subcommand_parser(build_parser(), command)._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest in ("help", "config", "json") or value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def config_flags(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The flags a config file stands for, for this command's parser (placed before the user's own flags, which
    therefore win). Keys are long flag names or their aliases, with _ or -; an unknown key is an error naming it,
    except in a run's own config.json (it has model_path), whose fields other commands lack are skipped: `eval -c
    runs/a/config.json` takes the run's model, data and prompt and leaves out its steps."""
    from ..config_file import flag_name, flatten_config, read_config_file

    actions = parser._option_string_actions  # argparse's own option table: aliases included
    data = read_config_file(path)
    flags, unknown = [], []
    for key, value in flatten_config(data).items():
        flag = f"--{flag_name(key)}"
        action = actions.get(flag)
        if action is None or action.dest in ("config", "help"):
            unknown.append(key)
        elif value is None:
            continue
        elif action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # switches
            if not isinstance(value, bool):
                raise EdgezoError(f"{path}: {key} is a switch, expected true or false, got {value!r}")
            if isinstance(action, argparse.BooleanOptionalAction):
                flags.append(flag if value else f"--no-{flag[2:]}")
            elif value:
                flags.append(flag)
        else:
            flags.append(f"{flag}={value}")  # one token: a value starting with '-' stays a value
    if unknown and "model_path" in data:
        say(f"{path}: not flags of `edgezo {parser.prog.split()[-1]}`, skipped: {', '.join(unknown)}")
    elif unknown:
        raise EdgezoError(f"{path}: unknown key(s) {', '.join(unknown)} for `edgezo {parser.prog.split()[-1]}`; "
                          f"keys are its long flag names (see --help), e.g. learning_rate")
    return flags


def expand_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with `-c FILE` / `--config FILE` replaced by the file's flags, right after the command name."""
    if not argv or argv[0].startswith("-"):
        return argv
    command, rest = argv[0], argv[1:]
    for i, token in enumerate(rest):
        if token in ("-c", "--config") and i + 1 < len(rest):
            path, rest = rest[i + 1], rest[:i] + rest[i + 2:]
        elif token.startswith("--config="):
            path, rest = token.split("=", 1)[1], rest[:i] + rest[i + 1:]
        else:
            continue
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.get(command)
        if sub is None or "--config" not in sub._option_string_actions:
            return argv  # argparse reports the unknown command or flag
        return [command, *config_flags(sub, path), *rest]
    return argv
