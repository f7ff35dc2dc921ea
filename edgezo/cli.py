"""edgezo's command line: a thin layer that builds configs, calls the library and shows progress.

Every subcommand is `cmd_<name>(args) -> (result dict, human-readable text)`; `main` prints one or the other. With
--json, human-readable output goes to stderr and the last line of stdout is one JSON object (scripts and benchmarks
read it).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import rewards, store, toolcalls
from .adapter import DEFAULT_TARGETS, LoraAdapter, LoraConfig, config_dict, read_base_model_info
from .data import Task, build_examples, build_task, read_jsonl
from .files import EdgezoError, peak_rss_bytes, write_json_atomic
from .formats import check_base_file
from .memory import TORCH_METHODS, torch_method
from .mezo import Estimator, MezoConfig, Schedule
from .trainer import RunDir, TrainConfig, TrainingInterrupted

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_QUANT = store.BUILTIN_QUANT  # for built-in names only; a GGUF path is used as it is unless --quant is given
DEFAULT_DATA = "movie-reviews"
DEFAULT_MAX_SEQ_LEN = 256  # llama.cpp gives every sequence at least 256 KV cells anyway
FZOO_DEFAULT_DIRECTIONS = 8  # FZOO's paper: n = 8 one-sided directions per step


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit_json(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


class SayHandler(logging.Handler):
    """Library log records to stderr through `say` (which finds sys.stderr at each call)."""

    def emit(self, record: logging.LogRecord) -> None:
        say(f"edgezo: {record.getMessage()}")


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
    g.add_argument("--threads", type=int, default=0, help="llama.cpp threads [all cores]")


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


def parse_layers(args) -> tuple[int | None, int | None] | None:
    """--num-layers K (the last K blocks, as mlx-lm) or --layers A:B (blocks A..B-1, Python slice syntax)."""
    num_layers, layers = getattr(args, "num_layers", None), getattr(args, "layers", None)
    if num_layers is not None and layers is not None:
        raise EdgezoError("--num-layers and --layers both choose the LoRA blocks; give one")
    if num_layers is not None:
        if num_layers < 1:
            raise EdgezoError(f"--num-layers must be >= 1, got {num_layers}")
        return (-num_layers, None)
    if layers is None:
        return None
    start, sep, stop = layers.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    except ValueError:
        raise EdgezoError(f"--layers: expected START:STOP block indices (e.g. 24:30 or -6:), got {layers!r}") from None


def lora_from_args(args) -> LoraConfig:
    return LoraConfig(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets.split(",")), layers=parse_layers(args))


def parse_label_words(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs = {}
    for item in text.split(","):
        label, sep, word = item.partition("=")
        if not sep or not label:
            raise EdgezoError(f"--label-words: expected label=word pairs, got {item!r}")
        pairs[label] = word if word.startswith(" ") else " " + word
    return pairs


def resolve_base(args, saved: dict | None = None, log=say) -> Path:
    """The base GGUF a command runs on, filling args.model / args.quant with what was used.

    --model if given, else the run's own base (`saved` = its config.json), else DEFAULT_MODEL. --quant if given;
    else the run's own quant when the model is the run's; else store.effective_quant (a built-in name gets
    DEFAULT_QUANT, a GGUF path is used as it is)."""
    saved = saved or {}
    if args.model is None and saved.get("model"):
        args.model = saved["model"]
        if not store.is_builtin(args.model) and not Path(args.model).is_file() and saved.get("model_path") \
                and Path(saved["model_path"]).is_file():
            # a run trained from another working directory: its resolved (maybe requantized) file is still there
            args.model, args.quant = saved["model_path"], args.quant or "none"
    args.model = args.model or DEFAULT_MODEL
    if args.quant is None and args.model == saved.get("model"):
        args.quant = saved.get("quant")
    args.quant = store.effective_quant(args.model, args.quant)
    return store.resolve_model(args.model, args.quant, log=log)


def open_engine(model_path: Path, batch_size: int, max_seq_len: int, threads: int,
                split_for: LoraConfig | None = None, log=say):
    """(engine, base model info). The info is read first: gguf's reader holds ~160 MB of Python objects for
    SmolLM2's 49k-token vocabulary while it lives, which would add to the engine's peak RSS if read later.
    With `split_for` (an adapter config whose blocks end at the top), evaluations run only those blocks."""
    from .engine import Engine, EngineConfig, SplitEngine  # imported late: `edgezo fetch --help` should not load llama.cpp
    from .split import split_files, split_point

    base = read_base_model_info(model_path)
    config = EngineConfig(n_seq_max=batch_size, n_ctx_per_seq=max_seq_len, n_threads=threads)
    first = split_point(base.architecture, base.n_layers, split_for) if split_for else 0
    if first:
        log(f"prefix reuse: blocks 0-{first - 1} run once per batch, blocks {first}-{base.n_layers - 1} per evaluation")
        return SplitEngine(*split_files(model_path, first, base.n_layers, log), first, config), base
    return Engine(model_path, config), base


def load_task_and_splits(engine, data_spec: str, args, splits: list[str], saved: dict | None = None,
                         optional: set[str] = frozenset()):
    """The task (format, labels, template) is fixed by the training split; then tokenize the requested splits
    (those in `optional` only if the dataset has them)."""
    files, builtin_template = store.resolve_data(data_spec, args.valid, args.test, log=say)
    template = args.template or (saved or {}).get("template") or builtin_template
    label_words = parse_label_words(args.label_words) or (saved or {}).get("label_words")
    if args.mask_prompt is None:
        args.mask_prompt = (saved or {}).get("mask_prompt", True)
    train_path = files.train or files.split(splits[0])
    task = build_task(read_jsonl(train_path), train_path, engine, template, label_words, args.mask_prompt)
    examples = {}
    for split in splits:
        if split in optional and getattr(files, split) is None:
            continue
        path = files.split(split)
        examples[split] = build_examples(read_jsonl(path), path, task, engine, args.max_seq_len)
    return task, examples, label_words


def task_dict(task: Task) -> dict:
    return {"format": task.format.value, "labels": list(task.labels), "label_token_ids": list(task.label_token_ids),
            "template": task.template}


# ---- fetch -------------------------------------------------------------------------------------------------------
def cmd_fetch(args) -> tuple[dict, str]:
    paths = {name: str(store.fetch(name, log=say)) for name in args.names}
    return {"paths": paths}, "\n".join(f"{name}: {path}" for name, path in paths.items())


# ---- finetune ----------------------------------------------------------------------------------------------------
RESUME_IGNORED = {"model_path", "train.steps", "train.eval_every", "train.save_every", "train.max_memory_bytes", "threads",
                  "eval_generation", "train.max_train_seconds"}
# Fields config.json gained later, so that older runs still resume: those whose value an older run implies (it had
# no choice), and those it did not record (compared only when the saved configuration has them).
ADDED_WITH_IMPLIED_VALUE = {"lora.layers": None, "mezo.estimator": "mezo", "train.freeze_lora_a": False,
                            "objective": "loss", "train.best_by": "valid_loss"}
ADDED_UNRECORDED = {"valid", "test", "mask_prompt"}


def memory_budget(args) -> int:
    """--max-memory if given, else the --device profile's usable RAM, else 0 (no budget)."""
    if args.max_memory:
        return parse_bytes(args.max_memory)
    if args.device:
        from .memory import load_device_profile

        return load_device_profile(args.device).usable_ram_bytes
    return 0


def refuse_over_budget(model_path: Path, method: str, args, budget_bytes: int, prediction=None) -> None:
    """Refuse to start a run whose predicted peak RSS (edgezo.memory, on the run's own batches; `prediction` if
    already made) exceeds the budget."""
    prediction = prediction or predict_run(model_path, method, args)[0]
    if prediction.total_bytes > budget_bytes:
        top = sorted(prediction.breakdown.items(), key=lambda kv: -kv[1])[:3]
        raise EdgezoError(
            f"predicted peak RSS {prediction.total_bytes / 2**20:.0f} MiB exceeds the memory budget of "
            f"{budget_bytes / 2**20:.0f} MiB (largest terms: {', '.join(f'{k} {v / 2**20:.0f} MiB' for k, v in top)}); "
            f"lower --batch-size or --max-seq-len, or use a smaller model or --quant"
            + (", --gradient-checkpointing or --release-freed-memory" if method in TORCH_METHODS else ""))


def parse_bytes(text: str | None) -> int:
    """'512M', '2G', '1.5GiB', '1000000' -> bytes (binary units); None or '' -> 0 (no limit)."""
    if not text:
        return 0
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = number[-1] if number and number[-1] in units else ""
    try:
        value = float(number[: len(number) - len(unit)])
    except ValueError:
        raise EdgezoError(f"--max-memory: expected a size like 512M or 2G, got {text!r}") from None
    if value <= 0:
        raise EdgezoError(f"--max-memory must be positive, got {text!r}")
    return int(value * units[unit])


def mezo_learning_rate(args) -> float:
    """--learning-rate if given, else the built-in model's tuned MeZO rate, else MezoConfig's default."""
    if args.learning_rate is not None:
        return args.learning_rate
    model = store.MODELS.get(args.model)
    return model.mezo_learning_rate if model else MezoConfig().learning_rate


def cmd_finetune(args) -> tuple[dict, str]:
    from . import distributed
    from .trainer import train

    if args.workers < 1:
        raise EdgezoError(f"--workers must be >= 1, got {args.workers}")
    if (args.workers > 1 or distributed.launched()) and (args.estimator != Estimator.MEZO.value or args.lora_fa
                                                         or args.objective != "loss" or args.eval_generation):
        raise EdgezoError("distributed MeZO runs the two-sided estimator on every LoRA tensor with the loss only: "
                          "drop --estimator fzoo / --lora-fa / --objective / --eval-generation, or train with one worker")
    if (args.workers > 1 or distributed.launched()) and args.max_train_seconds:
        raise EdgezoError("--max-train-seconds: each worker's clock differs, so workers would stop at different steps; "
                          "bound a distributed run with --steps")
    reward = None if args.objective == "loss" else rewards.load_reward(args.objective)
    args.eval_generation = args.eval_generation or reward is not None
    if args.eval_generation and args.prefix_reuse != "off":
        args.prefix_reuse = "off"  # generation runs every block for each new token: nothing to reuse
    run = RunDir(args.out)
    # --resume without --model / --quant / --data continues on the run's own; the resolved names go into config.json
    saved = read_run_config(run) if args.resume else None
    model_path = resolve_base(args, saved, log=say if os.environ.get("RANK", "0") == "0" else lambda msg: None)
    args.data = args.data or (saved or {}).get("data") or DEFAULT_DATA
    if args.workers > 1 and not distributed.launched():
        # N local ranks of this same command (as `edgezo finetune` flags, so a rank is an ordinary CLI process)
        return distributed.launch_local(args, command_line("finetune", args), say)
    t0 = time.perf_counter()
    # A rank of a distributed run (torchrun, or launched above): only rank 0 writes the run directory and talks.
    group = (distributed.Group.from_env(distributed.DistConfig(args.parallel, args.peer_timeout), args.workers)
             if distributed.launched() else None)
    root = group is None or group.is_root
    log = say if root else (lambda msg: None)
    lora = lora_from_args(args)
    estimator = Estimator(args.estimator)
    n_directions = args.n_directions or (FZOO_DEFAULT_DIRECTIONS if estimator is Estimator.FZOO else 1)
    mezo = MezoConfig(learning_rate=mezo_learning_rate(args), eps=args.eps, n_directions=n_directions,
                      weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup_steps,
                      estimator=estimator)
    budget_bytes = memory_budget(args)
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every,
                            save_every=args.save_every, n_valid=args.n_valid, max_memory_bytes=budget_bytes,
                            max_train_seconds=args.max_train_seconds,
                            freeze_lora_a=args.lora_fa, best_by="valid_reward" if reward else "valid_loss")
    if budget_bytes:
        prediction, _ = predict_run(model_path, "mezo", args)
        # prefix reuse is on by default only where it fits: it costs a second model
        if prediction.total_bytes > budget_bytes and "split_suffix_model_bytes" in prediction.breakdown:
            args.prefix_reuse = "off"
            log(f"prefix reuse off: with it the predicted peak RSS ({prediction.total_bytes / 2**20:.0f} MiB) "
                f"exceeds the memory budget of {budget_bytes / 2**20:.0f} MiB")
            prediction, _ = predict_run(model_path, "mezo", args)
        refuse_over_budget(model_path, "mezo", args, budget_bytes, prediction)
    engine_batch = group.engine_batch_size(args.batch_size) if group else args.batch_size
    engine, base = open_engine(model_path, engine_batch, args.max_seq_len, args.threads,
                               split_for=lora if args.prefix_reuse == "auto" else None, log=log)
    task, examples, label_words = load_task_and_splits(engine, args.data, args, ["train", "valid"], optional={"valid"})
    if "valid" not in examples:
        log("no validation split: training without periodic evaluation")
    hooks = {}
    if args.eval_generation:
        metrics = generation_metrics(task, args.data, None)
        if metrics is None:
            raise EdgezoError("--objective with a reward and --eval-generation need prompt/completion or chat data "
                              "with the prompt masked")
        if reward:
            metrics["reward"] = reward
            hooks["objective"] = functools.partial(rewards.reward_loss_function, reward=reward)
        hooks["evaluate_fn"] = functools.partial(rewards.evaluate_with_generation, metrics=metrics)
    config = {
        "model": args.model, "model_path": str(model_path), "quant": args.quant, "data": args.data,
        "valid": args.valid, "test": args.test, "template": task.template, "mask_prompt": args.mask_prompt,
        "label_words": label_words, "max_seq_len": args.max_seq_len, "task": task_dict(task),
        "lora": config_dict(lora), "mezo": {**asdict(mezo), "schedule": mezo.schedule.value, "estimator": estimator.value},
        "train": asdict(train_cfg), "threads": args.threads, "objective": args.objective,
        "eval_generation": args.eval_generation,
    }
    if group:  # only then: single-process runs resume as before, and a change of world size or mode is refused
        config["distributed"] = group.config_dict()
    start_step = 0

    def fresh() -> LoraAdapter:  # every rank builds the same initial adapter from the seed: nothing to send
        return LoraAdapter.init(base, lora, seed=args.seed)

    if not root:  # a replica: the checkpoint in its --out if that holds this run, else the seed init
        adapter, start_step = distributed.local_state(run, config, base, fresh)
    elif args.resume:
        if not run.state.exists():
            raise EdgezoError(f"--resume: {run.path} holds no checkpoint (state.json)")
        _check_resume_config(run, config)
        adapter, start_step = run.load_checkpoint(base)
        run.truncate_metrics(start_step)
        say(f"resuming {run.path} at step {start_step}")
    else:
        if run.state.exists():
            raise EdgezoError(f"{run.path} already holds a run; pass --resume to continue it or choose another --out")
        adapter = fresh()
        run.create()
        run.metrics.unlink(missing_ok=True)
    if group:  # same config, data and adapter on every rank (a rank behind replays rank 0's step log); no weights sent
        adapter, start_step = group.synchronize(adapter, start_step, distributed.run_digest(config, examples["train"]),
                                                run, mezo, fresh)
        if root:
            def on_lost(step: int) -> str:  # the update of the step in flight was not applied: theta is `step`'s
                run.save_checkpoint(adapter, step)
                return f"checkpoint of step {step} saved in {run.path}"

            group.on_lost = on_lost
        hooks = {"step_fn": group.step_fn(engine, task, mezo, args.seed, train_cfg.steps), "evaluate_fn": group.evaluate_fn}
    if not root:
        run = distributed.ReplicaRun()  # rank 0 owns the run directory
    else:
        write_json_atomic(run.config, config)
    engine.set_adapter(adapter)
    log(f"MeZO on {model_path.name}: {adapter.n_params:,} LoRA parameters, {len(examples['train'])} training examples, "
        f"{train_cfg.steps} steps of batch {train_cfg.batch_size}"
        + (f", {group.world} workers ({args.parallel}-parallel)" if group else ""))
    progress = ConsoleProgress(train_cfg.steps, start_step) if root else (lambda event: None)
    if root and args.report_to:
        from .report import Callbacks, make_reporter

        progress = Callbacks(progress, make_reporter(args.report_to, run.path, args.project_name, config))
    try:
        result = train(engine, adapter, task, examples["train"], examples.get("valid", []), mezo,
                       train_cfg, run, start_step=start_step, callback=progress, **hooks)
        report = group.finish(adapter) if group else {}
    finally:
        if root:
            progress.close()
        else:
            run.remove()
    summary = {"adapter": str(result.adapter_path) if root else None, "steps": result.steps,
               "final_loss": result.final_loss, "seconds": time.perf_counter() - t0, "train_seconds": result.train_seconds,
               "peak_rss_bytes": result.peak_rss_bytes, "run_dir": str(run.path) if root else None, **report}
    if result.valid is not None:
        summary.update(valid_accuracy=result.valid.accuracy, valid_loss=result.valid.loss,
                       **{f"valid_{name}": value for name, value in getattr(result.valid, "metrics", {}).items()})
    if root:
        summary.update(best_adapter(result))
    if report and not report["replicas_identical"]:
        log(f"warning: the replicas' adapters differ: {report['replica_sha256']}")
    if root:
        log(plot_hint(run.path))
    return summary, (f"adapter: {result.adapter_path}  final loss {result.final_loss:.4f}"
                     + (f"  valid accuracy {result.valid.accuracy:.4f}" if result.valid else "")
                     + f"  ({summary['seconds']:.0f} s)")


def best_adapter(result) -> dict:
    """finetune --json's fields for adapter.best.gguf (None without a validation split)."""
    best = result.best or {}
    return {"best_adapter": str(result.best_adapter_path) if result.best_adapter_path else None,
            "best_step": best.get("step"), "best_valid_loss": best.get("valid_loss"),
            "best_valid_accuracy": best.get("valid_accuracy"), "best_valid_reward": best.get("valid_reward")}


def read_run_config(run: RunDir) -> dict | None:
    """A run directory's config.json, None if it has none; an unreadable one is an error naming the file."""
    if not run.config.exists():
        return None
    try:
        return json.loads(run.config.read_text())
    except (OSError, ValueError) as exc:
        raise EdgezoError(f"{run.config}: cannot read the saved configuration ({exc})") from None


def _check_resume_config(run: RunDir, config: dict) -> None:
    try:
        saved = json.loads(run.config.read_text())
    except (OSError, ValueError) as exc:
        raise EdgezoError(f"{run.config}: cannot read the saved configuration ({exc})") from None
    flat_new, flat_old = _flatten(config), {**ADDED_WITH_IMPLIED_VALUE, **_flatten(saved)}
    differ = sorted(k for k in set(flat_new) | set(flat_old)
                    if k not in RESUME_IGNORED and not (k in ADDED_UNRECORDED and k not in flat_old)
                    and flat_new.get(k) != flat_old.get(k))
    steps_changed = "train.steps" in flat_new and flat_new["train.steps"] != flat_old.get("train.steps")
    if steps_changed and config["mezo"]["schedule"] != "constant":
        differ.append("train.steps (the learning-rate schedule depends on it)")
    if differ:
        details = ", ".join(f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}" if "(" not in k else k for k in differ)
        raise EdgezoError(f"--resume: the configuration differs from {run.config}: {details}")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("label_words",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---- reference-bp / reference-mezo -------------------------------------------------------------------------------
def cmd_reference(args) -> tuple[dict, str]:
    """The torch reference (edgezo.reference): the finetune run's LoRA, data and loss, trained by BP or torch MeZO."""
    try:
        from . import reference
    except ImportError as exc:
        raise EdgezoError(f"the torch reference needs the torch extra ({exc}): "
                          f"pip install torch==2.13.0 && pip install -e '.[torch]'") from None
    from .engine import Vocabulary

    t0 = time.perf_counter()
    model_path = resolve_base(args)
    if args.threads:
        reference.torch.set_num_threads(args.threads)
    config = reference.ReferenceConfig(method=args.method, dtype=args.dtype,
                                       gradient_checkpointing=args.gradient_checkpointing, base_dtype=args.base_dtype,
                                       release_freed_memory=args.release_freed_memory)
    if config.quantized_base:  # before anything is written: a wrong file type leaves no run directory behind
        check_base_file(model_path, config.base_dtype)
    lora = lora_from_args(args)
    lr = mezo_learning_rate(args) if args.method == "mezo" else args.learning_rate
    schedule = MezoConfig(learning_rate=lr, eps=args.eps, weight_decay=args.weight_decay,
                          schedule=args.schedule, warmup_steps=args.warmup_steps)
    budget_bytes = memory_budget(args)
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every,
                            n_valid=args.n_valid, max_memory_bytes=budget_bytes,
                            max_train_seconds=args.max_train_seconds)
    run = RunDir(args.out)
    if run.state.exists() or run.adapter.exists():
        raise EdgezoError(f"{run.path} already holds a run; choose another --out")
    method = torch_method(config.gradient_checkpointing, config.quantized_base) if args.method == "bp" else args.method
    if budget_bytes:
        refuse_over_budget(model_path, method, args, budget_bytes)
    base = read_base_model_info(model_path)
    with Vocabulary(model_path) as vocab:  # llama.cpp's tokenizer: the token ids finetune sees
        task, examples, label_words = load_task_and_splits(vocab, args.data, args, ["train", "valid"], optional={"valid"})
    run.create()
    write_json_atomic(run.config, {
        "method": args.method, "model": args.model, "model_path": str(model_path), "quant": args.quant,
        "data": args.data, "valid": args.valid, "test": args.test, "template": task.template,
        "mask_prompt": args.mask_prompt, "label_words": label_words, "max_seq_len": args.max_seq_len,
        "task": task_dict(task), "lora": config_dict(lora), "reference": asdict(config),
        "schedule": {**asdict(schedule), "schedule": schedule.schedule.value}, "train": asdict(train_cfg),
        "threads": args.threads,
    })
    spec = reference.ReferenceRun(model_path, base, LoraAdapter.init(base, lora, seed=args.seed), task,
                                  examples["train"], examples.get("valid", []), schedule)
    weights = f"{config.base_dtype} blocks" if config.quantized_base else args.dtype
    say(f"torch {args.method} ({weights}{', gradient checkpointing' if args.gradient_checkpointing else ''}) on "
        f"{model_path.name}: {spec.adapter.n_params:,} LoRA parameters, {len(spec.train_set)} training examples, "
        f"{args.steps} steps of batch {args.batch_size}")
    progress = ConsoleProgress(args.steps, 0, desc=f"reference-{args.method}")
    try:
        result = reference.train_reference(spec, config, train_cfg, run, callback=progress, log=say)
    finally:
        progress.close()
    step_seconds = [json.loads(line)["seconds"] for line in run.metrics.read_text().splitlines()
                    if "seconds" in json.loads(line)]
    summary = {"adapter": str(result.adapter_path), "steps": result.steps, "final_loss": result.final_loss,
               "seconds": time.perf_counter() - t0, "train_seconds": result.train_seconds,
               "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None,
               "peak_rss_bytes": result.peak_rss_bytes, "run_dir": str(run.path)}
    if result.valid is not None:
        summary.update(valid_accuracy=result.valid.accuracy, valid_loss=result.valid.loss)
    return summary, (f"adapter: {result.adapter_path}  final loss {result.final_loss:.4f}"
                     + (f"  valid accuracy {result.valid.accuracy:.4f}" if result.valid else "")
                     + f"  ({summary['seconds']:.0f} s, peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB)")


class ConsoleProgress:
    """tqdm bar over training steps (loss, valid accuracy, s/step, RSS); evaluation shown on its own bar."""

    def __init__(self, total_steps: int, start_step: int, desc: str = "finetune"):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", file=sys.stderr,
                        dynamic_ncols=True)
        self.eval_bar = None
        self.postfix = {}

    def __call__(self, event: dict) -> None:
        kind = event["kind"]
        if kind == "step":
            self.postfix.update(loss=f"{event['loss']:.4f}", s_step=f"{event['seconds']:.2f}",
                                rss=f"{event['rss_bytes'] / 2**20:.0f}MiB")
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(1)
        elif kind == "eval_start":
            self.eval_bar = self._tqdm(total=event["n"], desc=f"  validate @{event['step']}", unit="ex",
                                       file=sys.stderr, leave=False, dynamic_ncols=True)
        elif kind == "eval_batch" and self.eval_bar is not None:
            self.eval_bar.update(event["n"])
        elif kind == "eval":
            if self.eval_bar is not None:
                self.eval_bar.close()
            self.postfix["val_acc"] = f"{event['valid_accuracy']:.3f}"
            self.bar.set_postfix(self.postfix)
            generated = "".join(f", {key.removeprefix('valid_')} {event[key]:.4f}"
                                for key in ("valid_exact_match", "valid_reward") if key in event)
            self.bar.write(f"step {event['step']}: valid loss {event['valid_loss']:.4f}, "
                           f"accuracy {event['valid_accuracy']:.4f}{generated} ({event['n_valid']} examples)",
                           file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


# ---- eval --------------------------------------------------------------------------------------------------------
def resolve_adapter(spec: str | None) -> tuple[Path | None, dict | None]:
    """An adapter GGUF, or a run directory (its adapter.gguf, else its last checkpoint; and its config.json for the
    base model and prompt defaults), or RUN:best (the run's adapter.best.gguf, lowest validation loss)."""
    if not spec:
        return None, None
    path, best = Path(spec), False
    if not path.exists() and spec.endswith(":best"):
        path, best = Path(spec.removesuffix(":best")), True
    if path.is_dir():
        run = RunDir(path)
        saved = read_run_config(run)
        if best:
            if not run.best.exists():
                raise EdgezoError(f"{spec}: {path} holds no {run.best.name} (a run without a validation split, "
                                  f"or from before best adapters were kept); use {path} for the final adapter")
            return run.best, saved
        adapter = run.adapter if run.adapter.exists() else run.checkpoint
        if not adapter.exists():
            raise EdgezoError(f"{path}: run directory holds no adapter.gguf or checkpoint")
        return adapter, saved
    if best:
        raise EdgezoError(f"{spec}: RUN:best needs a run directory, {path} is not one")
    if not path.is_file():
        raise EdgezoError(f"{spec}: no such adapter file or run directory")
    return path, None


def cmd_eval(args) -> tuple[dict, str]:
    from .objective import evaluate

    t0 = time.perf_counter()
    adapter_path, saved = resolve_adapter(args.adapter)
    data_spec = args.data or (saved or {}).get("data") or DEFAULT_DATA
    model_path = resolve_base(args, saved)
    engine, base = open_engine(model_path, args.batch_size, args.max_seq_len, args.threads)
    if adapter_path:
        engine.set_adapter(LoraAdapter.load(adapter_path, base), in_place=False)
    task, examples, _ = load_task_and_splits(engine, data_spec, args, [args.split], saved)
    subset = examples[args.split][: args.limit] if args.limit else examples[args.split]
    from tqdm import tqdm

    metrics = generation_metrics(task, data_spec, args.reward)
    with tqdm(total=len(subset), desc=f"eval {args.split}", unit="ex", file=sys.stderr, dynamic_ncols=True) as bar:
        if metrics is None:
            totals = evaluate(engine, subset, task, args.batch_size, on_batch=bar.update)
        else:
            totals = rewards.evaluate_with_generation(engine, subset, task, args.batch_size, metrics, on_batch=bar.update)
    generated = getattr(totals, "metrics", {})
    result = {"accuracy": totals.accuracy, "loss": totals.loss, **generated, "n_examples": totals.n_examples,
              "split": args.split, "model": str(model_path), "adapter": str(adapter_path) if adapter_path else None,
              "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}
    what = "accuracy" if task.is_classification else "token accuracy"
    return result, (f"{args.split}: {what} {totals.accuracy:.4f}  loss {totals.loss:.4f}"
                    + "".join(f"  {name} {value:.4f}" for name, value in generated.items())
                    + f"  ({totals.n_examples} examples)")


def generation_metrics(task: Task, data_spec: str, reward: str | None) -> dict | None:
    """The metrics of greedy generations eval reports on `task` (exact_match comes always; `reward` as "reward";
    the built-in tool-calls data's call metrics), or None for data without completions to generate."""
    if not rewards.has_completions(task):
        if reward:
            raise EdgezoError("--reward needs prompt/completion or chat data with the prompt masked")
        return None
    metrics = rewards.tool_call_metrics() if data_spec == toolcalls.NAME else {}
    if reward:
        metrics["reward"] = rewards.load_reward(reward)
    return metrics


# ---- generate ----------------------------------------------------------------------------------------------------
def sampling(args):
    from .engine import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repeat_penalty=args.repeat_penalty, seed=args.seed)


def open_generator(args):
    """(engine, base path) for generate / chat: the run's own base, the adapter validated in Python before
    llama.cpp sees it, a one-sequence context of --ctx tokens."""
    adapter_path, saved = resolve_adapter(args.adapter)
    model_path = resolve_base(args, saved)
    engine, base = open_engine(model_path, 1, args.ctx, args.threads)
    if adapter_path:
        engine.set_adapter(LoraAdapter.load(adapter_path, base), in_place=False)
    return engine, adapter_path


def stream_tokens(engine, tokens, args, echo: bool) -> list[int]:
    """Generate, printing each piece as it comes when `echo` (UTF-8 decoded incrementally: a character may span
    tokens); returns the generated tokens."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for token in engine.generate(tokens, args.max_tokens, sampling=sampling(args)):
        out.append(token)
        if echo:
            print(decoder.decode(engine.token_bytes(token)), end="", flush=True)
    if echo:
        print(decoder.decode(b"", final=True), flush=True)
    return out


def cmd_generate(args) -> tuple[dict, str]:
    engine, adapter_path = open_generator(args)
    prompt = args.prompt.encode().decode("unicode_escape") if args.escape else args.prompt
    if args.chat:  # one user turn through the model's own template, tokenized as llama-cpp-python does
        messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else [])
        prompt = engine.apply_chat_template(messages + [{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_tokens = engine.tokenize(prompt, add_special=False)
    else:
        prompt_tokens = engine.tokenize(prompt, add_special=True)
    if len(prompt_tokens) >= args.ctx:
        raise EdgezoError(f"the prompt is {len(prompt_tokens)} tokens, the context holds {args.ctx}; raise --ctx")
    tokens = stream_tokens(engine, prompt_tokens, args, echo=not args.json)
    return {"prompt": prompt, "text": engine.detokenize(tokens), "n_tokens": len(tokens),
            "n_prompt_tokens": len(prompt_tokens), "adapter": str(adapter_path) if adapter_path else None}, ""


# ---- chat --------------------------------------------------------------------------------------------------------
CHAT_HELP = "/reset starts over, /exit (or Ctrl-D) ends"


def cmd_chat(args) -> tuple[dict, str]:
    """An interactive multi-turn session on stdin/stdout: the GGUF's own chat template, streamed replies."""
    from .chat import ChatSession

    engine, adapter_path = open_generator(args)
    session = ChatSession(engine, sampling(args), max_tokens=args.max_tokens, system_prompt=args.system_prompt)
    interactive = sys.stdin.isatty()
    say(f"chat with {engine.model_path.name}" + (f" + {adapter_path}" if adapter_path else "") + f"; {CHAT_HELP}")
    n_turns = 0
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session.reset()
            say("(conversation reset)")
            continue
        if not text.strip():
            continue
        try:
            for piece in session.send(text):
                print(piece, end="", flush=True)
        except EdgezoError as exc:  # the session goes on: say why this turn failed
            say(f"edgezo chat: error: {exc}")
            continue
        print(flush=True)
        n_turns += 1
    return {"messages": session.messages, "n_turns": n_turns}, ""


# ---- serve -------------------------------------------------------------------------------------------------------
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def server_command(args, model_path: Path, adapter_path: Path | None, alias: str) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server (its `server` extra) on this base and adapter, behind
    edgezo.serve's request guard (malformed requests get 400 / 422, not 500)."""
    settings = {"model": str(model_path), "model_alias": alias, "host": args.host, "port": args.port,
                "n_ctx": args.ctx, "verbose": False, "lora_path": str(adapter_path) if adapter_path else None}
    if args.threads:
        settings.update(n_threads=args.threads, n_threads_batch=args.threads)
    return [sys.executable, "-m", "edgezo.serve", json.dumps(settings)]


def _die_with_parent() -> None:
    """In the server child: get SIGTERM when edgezo dies, even by SIGKILL, so no orphan keeps the port (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cmd_serve(args) -> tuple[dict, str]:
    """Serve the base model with the adapter applied over HTTP (/v1/chat/completions, /v1/completions, /v1/models,
    streaming) until stopped. The server is llama-cpp-python's own, run as a child process: edgezo validates the
    adapter against the base in Python first, then hands llama.cpp the same file."""
    import importlib.util
    import signal
    import subprocess

    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise EdgezoError(f"serve needs llama-cpp-python's server extra (missing: {', '.join(missing)}): "
                          f"pip install 'edgezo[serve]'")
    adapter_path, saved = resolve_adapter(args.adapter)
    model_path = resolve_base(args, saved)
    if adapter_path:
        LoraAdapter.load(adapter_path, read_base_model_info(model_path))  # every tensor checked against the base
    alias = args.name or (Path(args.adapter.removesuffix(":best")).name if args.adapter else Path(args.model).stem)
    cmd = server_command(args, model_path, adapter_path, alias)
    say(f"serving {alias} ({model_path.name}{' + ' + str(adapter_path) if adapter_path else ''}) at "
        f"http://{args.host}:{args.port}/v1 (OpenAI API: /v1/chat/completions, /v1/completions, /v1/models); Ctrl-C stops")
    child = subprocess.Popen(cmd, preexec_fn=_die_with_parent)

    def forward(signum, frame):  # SIGTERM to edgezo stops the server too (Ctrl-C reaches both already)
        child.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code not in (0, -signal.SIGINT, -signal.SIGTERM, 130):
        raise EdgezoError(f"the server stopped with exit code {code} (its messages are above)")
    return {"model": str(model_path), "adapter": str(adapter_path) if adapter_path else None, "name": alias,
            "url": f"http://{args.host}:{args.port}/v1", "exit_code": code}, "server stopped"


# ---- export ------------------------------------------------------------------------------------------------------
def cmd_export(args) -> tuple[dict, str]:
    adapter_path, saved = resolve_adapter(args.adapter)
    if adapter_path is None:
        raise EdgezoError("export needs --adapter")
    # the base the adapter was trained on (merged-gguf folds it into exactly those weights), unless --model/--quant
    model_path = resolve_base(args, saved)
    base = read_base_model_info(model_path)
    adapter = LoraAdapter.load(adapter_path, base)  # validates every tensor against the base
    out = Path(args.output)
    if args.to == "gguf-lora":
        adapter.save(out)
    elif args.to == "peft":
        from edgezo.convert.peft import adapter_to_peft

        adapter_to_peft(adapter, out, base)
    else:  # merged-gguf
        from edgezo.convert.merge import merge_adapter

        with TensorProgress("merge") as progress:
            merge_adapter(model_path, adapter, out, outtype=args.outtype, progress=progress)
    result = {"output": str(out), "format": args.to, "n_params": adapter.n_params, "rank": adapter.config.rank,
              "alpha": adapter.config.alpha, "targets": list(adapter.config.targets)}
    if args.to == "merged-gguf":
        result["outtype"] = args.outtype
    return result, f"wrote {out} ({args.to}, {adapter.n_params:,} adapter parameters)"


class TensorProgress:
    """A tqdm bar for the converters' progress(done, total, ...) callbacks."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def __call__(self, done: int, total: int, *rest) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="tensor", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


# ---- convert -----------------------------------------------------------------------------------------------------
def cmd_convert(args) -> tuple[dict, str]:
    out = Path(args.output)
    if args.direction == "hf-to-gguf":
        from edgezo.convert.hf_to_gguf import convert_hf_to_gguf

        with TensorProgress("hf-to-gguf") as progress:
            convert_hf_to_gguf(args.input, out, outtype=args.outtype, progress=progress)
    elif args.direction == "gguf-to-hf":
        from edgezo.convert.gguf_to_hf import convert_gguf_to_hf

        with TensorProgress("gguf-to-hf") as progress:
            convert_gguf_to_hf(args.input, out, progress=progress)
    else:
        if not args.base:
            raise EdgezoError(f"convert {args.direction} needs --base BASE.gguf (the model the adapter belongs to)")
        base = store.resolve_model(args.base, None, log=say)
        from edgezo.convert.peft import gguf_to_peft, peft_to_gguf

        (peft_to_gguf if args.direction == "peft-to-gguf" else gguf_to_peft)(args.input, base, out)
    return {"input": args.input, "output": str(out), "direction": args.direction}, f"wrote {out}"


# ---- plot --------------------------------------------------------------------------------------------------------
def cmd_plot(args) -> tuple[dict, str]:
    """Training loss, validation loss and accuracy of the runs against steps and training wall-clock (edgezo.plot)."""
    from .plot import save_plot

    _, curves = save_plot(args.runs, args.output, args.title)
    runs = {c.label: {"n_steps": len(c.steps), "n_evals": len(c.evals)} for c in curves}
    return {"output": str(args.output), "runs": runs}, f"wrote {args.output} ({len(curves)} run(s))"


def plot_hint(run_dir: Path) -> str:
    return f"curves: edgezo plot {run_dir} -o {run_dir / 'curves.png'}"


# ---- memory ------------------------------------------------------------------------------------------------------
def run_sequences(model_path: Path, method: str, args) -> tuple[dict, object, dict]:
    """The run's data tokenized by llama.cpp's vocabulary (no weights loaded): (token sequences by split, task,
    the positions each sequence is scored at by split)."""
    from .engine import Vocabulary
    from .objective import output_positions

    splits = [args.split] if method == "inference" else ["train", "valid"]
    with Vocabulary(model_path) as vocab:
        task, examples, _ = load_task_and_splits(vocab, args.data, args, splits, optional={"valid"})
    outputs = {split: [output_positions(ex, task) for ex in exs] for split, exs in examples.items()}
    return {split: [ex.tokens for ex in exs] for split, exs in examples.items()}, task, outputs


def predict_run(model_path: Path, method: str, args) -> tuple:
    """(Prediction, sequence length used) for the run `args` describes (finetune, reference-*, memory or eval flags):
    with --data its own batches, else the worst case of --max-seq-len tokens per sequence."""
    from .memory import predict_llama_cpp, predict_torch, read_model_shape, run_batches
    from .split import split_point

    lora = lora_from_args(args)
    seq_len = getattr(args, "tokens_per_seq", None) or args.max_seq_len
    logit_rows, logit_cols, token_ids, outputs = None, 2, None, {}
    if args.data:
        seqs, task, scored = run_sequences(model_path, method, args)
        if method == "inference":
            n = args.limit or None
            split, split_scored = seqs.get(args.split, [])[:n], scored.get(args.split, [])[:n]
            batches = run_batches([], args.batch_size, args.seed, 0, split, evaluated_outputs=split_scored)
        else:
            n = args.n_valid or None
            valid, valid_scored = seqs.get("valid", [])[:n], scored.get("valid", [])[:n]
            batches = run_batches(seqs["train"], args.batch_size, args.seed, args.steps, valid,
                                  train_outputs=scored["train"], evaluated_outputs=valid_scored)
        if not task.is_classification:  # every target token's logits over the vocabulary
            outputs = dict(n_outputs=batches.max_batch_outputs, n_ubatch_outputs=batches.max_ubatch_outputs,
                           lm_loss=True)
        if method in TORCH_METHODS:
            seq_len = batches.padded_len
            token_ids = batches.token_ids | set(task.label_token_ids)
            if not task.is_classification:
                logit_rows, logit_cols = batches.max_batch_tokens, read_model_shape(model_path).n_vocab
            else:
                logit_cols = len(task.labels)
        else:
            seq_len = -(-batches.max_batch_tokens // args.batch_size)  # mean tokens per sequence of the fullest batch
    if method in TORCH_METHODS:
        prediction = predict_torch(read_model_shape(model_path), method, args.batch_size, seq_len, lora=lora,
                                   dtype=getattr(args, "dtype", "float32"), logit_rows=logit_rows,
                                   logit_cols=logit_cols, token_ids=token_ids,
                                   release_freed=getattr(args, "release_freed_memory", False))
    else:
        split_at, n_cached = 0, 0
        shape = read_model_shape(model_path)
        if method == "mezo" and getattr(args, "prefix_reuse", "off") == "auto":
            split_at = split_point(shape.architecture, shape.n_layers, lora)
            n_cached = sum(len(s) for s in valid) if args.data else 0
        prediction = predict_llama_cpp(shape, method, args.batch_size, args.max_seq_len, lora=lora,
                                       n_tokens_per_seq=min(seq_len, args.max_seq_len), split_at=split_at,
                                       n_cached_tokens=n_cached, **outputs)
    return prediction, seq_len


def cmd_memory(args) -> tuple[dict, str]:
    """Predicted peak RSS of exactly the run these arguments describe (the finetune / reference-bp / eval flags).

    Without --data the worst case: every sequence --max-seq-len tokens long. With --data the run's own batches: the
    training batches of --steps steps from --seed, the validation batches of --n-valid examples (for --method
    inference: the first --limit examples of --split), tokenized as the run would."""
    from .memory import load_device_profile

    method = args.method
    if method.startswith("bp"):
        quantized = method.startswith("bp-quant") or args.base_dtype != "float"
        method = torch_method(args.gradient_checkpointing or method.endswith("-ckpt"), quantized)
    model_path = resolve_base(args)
    if method.startswith("bp-quant"):
        check_base_file(model_path, None if args.base_dtype == "float" else args.base_dtype)
    prediction, seq_len = predict_run(model_path, method, args)
    result = {"predicted_bytes": prediction.total_bytes, "breakdown": prediction.breakdown, "method": method,
              "model": str(model_path), "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
              "seq_len": seq_len, "data": args.data}
    if method in TORCH_METHODS:
        result["dtype"] = args.dtype
    lines = [f"{k:28}{v / 2**20:10.1f} MiB" for k, v in prediction.breakdown.items()]
    what = f"{method}, batch {args.batch_size} x {seq_len} tokens" + ("" if args.data else " (worst case)")
    lines.append(f"{'predicted peak RSS':28}{prediction.total_bytes / 2**20:10.1f} MiB ({what})")
    if args.device:
        profile = load_device_profile(args.device)
        fits = prediction.total_bytes <= profile.usable_ram_bytes
        result.update(device=profile.key, usable_ram_bytes=profile.usable_ram_bytes, fits=fits)
        lines.append(f"{profile.name}: {profile.usable_ram_bytes / 2**20:.0f} MiB usable -> {'fits' if fits else 'does NOT fit'}")
    return result, "\n".join(lines)


# ---- capacity ----------------------------------------------------------------------------------------------------
def cmd_capacity(args) -> tuple[dict, str]:
    """The largest model of the known families each method fits on a device (edgezo.capacity)."""
    from .capacity import capacity, format_capacity, load_specs
    from .memory import load_device_profile

    profile = load_device_profile(args.device)
    families = [f for f in args.family.split(",") if f] if args.family else None
    lora = lora_from_args(args)
    result = capacity(profile.usable_ram_bytes, load_specs(families), args.batch_size, args.seq_len, lora)
    result.update(device=profile.key, device_name=profile.name, usable_ram_bytes=profile.usable_ram_bytes)
    header = (f"{profile.name}: {profile.usable_ram_bytes / 2**20:.0f} MiB usable; batch {args.batch_size} x "
              f"{args.seq_len} tokens, LoRA rank {lora.rank} on {','.join(lora.targets)}")
    return result, header + "\n" + format_capacity(result)


# ---- doctor ------------------------------------------------------------------------------------------------------
def cmd_doctor(args) -> tuple[dict, str]:
    """Versions, the llama.cpp build, the CPU, the kernels the engine will use, and a decode probe in a child process."""
    from .doctor import environment, probe_in_child

    result = environment(store.home(), args.threads)
    if args.probe:
        model_path = resolve_base(args)
        say(f"probing a decode of {model_path.name} in a child process ...")
        result["probe"] = {"model": str(model_path), **probe_in_child(model_path, args.threads)}
    return result, format_doctor(result)


def format_doctor(r: dict) -> str:
    k, cpu = r["kernels"], r["cpu"]
    lines = [
        f"edgezo {r['edgezo']}, Python {r['python']}, {r['platform']}",
        "versions: " + ", ".join(f"{name} {v or '-'}" for name, v in r["versions"].items()),
        f"cpu: {cpu['model']} ({cpu['machine']}), {cpu['usable_cores']} of {cpu['n_cores']} cores usable; "
        f"flags: {' '.join(cpu['flags']) if cpu['flags'] is not None else 'unknown'}",
        f"llama.cpp build: {r['llama_cpp_system_info'].strip()}",
        f"AMX: kernels built {'yes' if k['amx_kernels_built'] else 'no'}, CPU has AMX "
        f"{ {True: 'yes', False: 'no', None: 'unknown'}[k['cpu_has_amx']] }, avoided {'yes' if k['avoid_amx'] else 'no'} "
        f"({k['decision']}; EDGEZO_AMX={k['amx_mode']})",
        f"repacked kernels built: {'yes' if k['repack_built'] else 'no'}; "
        f"flash attention: {'on' if k['flash_attention'] else 'off'}; "
        f"threads: {r['threads']}",
        f"cache: {r['cache']['path']} ({r['cache']['free_bytes'] / 2**30:.1f} GiB free)" if r["cache"]["free_bytes"] is not None
        else f"cache: {r['cache']['path']}",
    ]
    probe = r.get("probe")
    if probe and probe["ok"]:
        buffers = ", ".join(f"{name} {mib:.1f} MiB" for name, mib in probe["weight_buffers_mib"].items())
        lines.append(f"decode probe: ok, {probe['n_sequences']} sequences in {probe['seconds']} s, logits "
                     f"{'finite' if probe['finite'] else 'NOT FINITE'}; weights: {buffers}")
    elif probe:
        lines.append(f"decode probe: FAILED (exit {probe['returncode']}): {' / '.join(probe['stderr_tail'])}")
    return "\n".join(lines)


# ---- demo --------------------------------------------------------------------------------------------------------
def cmd_demo(args) -> tuple[dict, str]:
    """The main job on the defaults: zero-shot test accuracy, a MeZO fine-tune, then the tuned test accuracy.

    Runs exactly the documented commands; an earlier demo run in --out is resumed (a finished one is reused).
    """
    parser = build_parser()
    resolve_base(args)  # fetch / requantize once, and name what the three steps run on
    common = ["--model", args.model, "--quant", args.quant or "none", "--threads", str(args.threads)]
    say("== 1/3 zero-shot accuracy on the test split")
    zero, text = cmd_eval(parser.parse_args(["eval", *common, "--data", DEFAULT_DATA, "--split", "test"]))
    say(text)
    say(f"== 2/3 MeZO fine-tune, {args.steps} steps (defaults otherwise)")
    finetune = ["finetune", *common, "--data", DEFAULT_DATA, "--steps", str(args.steps), "--out", args.out]
    run, text = cmd_finetune(parser.parse_args(finetune + (["--resume"] if RunDir(args.out).state.exists() else [])))
    say(text)
    say("== 3/3 fine-tuned accuracy on the test split")
    tuned, text = cmd_eval(parser.parse_args(["eval", *common, "--adapter", args.out, "--split", "test"]))
    say(text)
    result = {"zero_shot_accuracy": zero["accuracy"], "finetuned_accuracy": tuned["accuracy"],
              "gain_points": 100 * (tuned["accuracy"] - zero["accuracy"]), "zero_shot_loss": zero["loss"],
              "finetuned_loss": tuned["loss"], "n_test": tuned["n_examples"], "steps": run["steps"],
              "adapter": run["adapter"], "finetune_seconds": run["seconds"], "model": args.model, "quant": args.quant}
    table = (f"{'':24}{'accuracy':>10}{'loss':>9}\n"
             f"{'zero-shot':24}{zero['accuracy']:>10.4f}{zero['loss']:>9.4f}\n"
             f"{'MeZO, ' + str(run['steps']) + ' steps':24}{tuned['accuracy']:>10.4f}{tuned['loss']:>9.4f}\n"
             f"gain {result['gain_points']:+.1f} points on {tuned['n_examples']} test reviews; "
             f"fine-tune took {run['seconds']:.0f} s; adapter {run['adapter']}")
    return result, table


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
    p.add_argument("--adapter", "--adapter-path", help="adapter GGUF, run directory or RUN:best")
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


RELEASE_HELP = ("return freed tensors to the kernel at once (glibc: allocations >= 64 KiB mapped): a lower peak RSS, "
                "predicted without heap retention, for 1.3-1.6x slower steps (Q4_0 blocks + checkpointing, batch 16, "
                "Intel Xeon: Qwen2.5-Coder-0.5B 1426 against 2032-2084 MiB; SmolLM2-135M 773 against 1248 MiB)")
LR_HELP = ("MeZO learning rate [the built-in model's tuned rate: "
           + ", ".join(f"{m.name} {m.mezo_learning_rate:g}" for m in store.MODELS.values())
           + f"; a GGUF path: {MezoConfig().learning_rate:g}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgezo",
                                     description="Fine-tune LLM adapters with forward passes only (MeZO on llama.cpp).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="put built-in models / datasets in the cache ($EDGEZO_HOME)")
    p.add_argument("names", nargs="+", help=f"{', '.join(list(store.MODELS) + list(store.DATASETS))}")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("finetune", help="train a LoRA adapter with MeZO")
    groups = add_run_args(p)
    m, t, lo = MezoConfig(), TrainConfig(), LoraConfig()
    groups["optimizer"].add_argument("--learning-rate", type=float, help=LR_HELP)
    groups["optimizer"].add_argument("--eps", type=float, default=m.eps, help="perturbation scale [%(default)s]")
    groups["optimizer"].add_argument(
        "--estimator", choices=[e.value for e in Estimator], default=m.estimator.value,
        help="mezo: two-sided Gaussian SPSA; fzoo: one-sided Rademacher around the unperturbed loss, step "
        "normalised by the losses' std (arXiv 2506.09034) [%(default)s]")
    groups["optimizer"].add_argument("--n-directions", type=int,
                                     help=f"random directions per step [mezo {m.n_directions}, fzoo {FZOO_DEFAULT_DIRECTIONS}]")
    groups["optimizer"].add_argument(
        "--objective", default="loss",
        help="what MeZO minimises: loss (the data's NLL), or minus a reward of the greedy generations of "
        "prompt/completion or chat data: exact-match, tool-call (graded JSON call), or MODULE:FUNCTION, a Python "
        "function (prompt, completion) -> float [%(default)s]")
    groups["training loop"].add_argument(
        "--eval-generation", action="store_true",
        help="validate also by greedy generation: exact_match (and the reward) [on with a reward --objective]")
    groups["LoRA"].add_argument("--lora-fa", action="store_true", help="LoRA-FA: train B only, A stays at its random init")
    groups["LoRA"].add_argument("--prefix-reuse", choices=["auto", "off"], default="auto",
                                help="auto: when LoRA sits on the top blocks only (--num-layers), run the blocks "
                                "below once per batch and only the trained ones per evaluation (same logits) [%(default)s]")
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
    p.set_defaults(func=cmd_finetune, data=None)  # no --data: the run's own with --resume, else DEFAULT_DATA

    for method, help_text in (("bp", "the PyTorch BP reference: AdamW on the same LoRA, data and loss (torch extra)"),
                              ("mezo", "the torch MeZO baseline: MeZO on the same LoRA's torch tensors (torch extra)")):
        p = sub.add_parser(f"reference-{method}", help=help_text)
        g = add_run_args(p)["optimizer"]
        if method == "bp":
            g.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW [%(default)s]")
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
        p.set_defaults(func=cmd_reference, method=method, dtype="float32", gradient_checkpointing=False, eps=m.eps,
                       base_dtype="float", release_freed_memory=False)

    p = sub.add_parser("eval", help="accuracy and loss of the base model or an adapter on a split")
    add_model_args(p)
    add_data_args(p, with_defaults=False)
    p.add_argument("--adapter", "--adapter-path", help="adapter GGUF, run directory or RUN:best (none: zero-shot)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="[%(default)s]")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N examples")
    p.add_argument("--reward", help="prompt/completion or chat data: also the mean of this reward of the greedy "
                   "generations (exact-match, tool-call or MODULE:FUNCTION)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text with the base model and an optional adapter")
    add_generation_args(p)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--no-escape", dest="escape", action="store_false", help="take \\n in the prompt literally")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user turn through the model's own "
                   "chat template (with --system-prompt)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with the model's own chat template, streamed")
    add_generation_args(p, max_tokens=256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with the adapter applied (serve extra)")
    add_model_args(p)
    p.add_argument("--adapter", "--adapter-path", help="adapter GGUF, run directory or RUN:best")
    p.add_argument("--host", default="127.0.0.1", help="listen address; 0.0.0.0 exposes it to the network [%(default)s]")
    p.add_argument("--port", type=int, default=8000, help="[%(default)s]")
    p.add_argument("--ctx", type=int, default=2048, help="context in tokens per request [%(default)s]")
    p.add_argument("--name", help="model name in /v1/models and requests [the run directory's name, else the model's]")
    p.set_defaults(func=cmd_serve)

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
    p.add_argument("--prefix-reuse", choices=["auto", "off"], default="auto",
                   help="mezo with --num-layers: count the split engine's suffix model, as finetune runs it [%(default)s]")
    # accepted so a finetune / reference command line can be reused; none of them changes the peak RSS
    for flag, kind in (("--learning-rate", float), ("--eps", float), ("--n-directions", int), ("--save-every", int),
                       ("--estimator", str)):
        p.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    p.add_argument("--lora-fa", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_memory)

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
    p.set_defaults(func=cmd_capacity)

    p = sub.add_parser("demo", help="zero-shot eval, MeZO fine-tune and tuned eval on the defaults (the README's main job)")
    add_model_args(p)
    p.add_argument("--steps", type=int, default=t.steps, help="[%(default)s]")
    p.add_argument("--out", default="runs/demo", help="run directory [%(default)s]")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("doctor", help="versions, llama.cpp build, CPU, kernels in use and a decode probe "
                                      "(paste it into bug reports)")
    add_model_args(p)
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="skip the decode of --model in a child process (which fetches it if needed)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("export", help="write the adapter in another format")
    add_model_args(p)
    p.add_argument("--adapter", "--adapter-path", required=True, help="adapter GGUF, run directory or RUN:best")
    p.add_argument("--to", choices=["gguf-lora", "peft", "merged-gguf"], default="gguf-lora",
                   help="GGUF LoRA (llama.cpp --lora), PEFT directory, or the base with the adapter folded in [%(default)s]")
    p.add_argument("--outtype", default="q8_0", help="merged-gguf tensor type (f32, f16, q8_0, q4_0, ...) [%(default)s]")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="training and validation curves of runs, overlaid (plot extra: matplotlib)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (finetune, reference-bp, reference-mezo)")
    p.add_argument("-o", "--output", default="curves.png", help="image file; .png, .svg or .pdf [%(default)s]")
    p.add_argument("--title", help="figure title")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("convert", help="format bridges: Hugging Face <-> GGUF, PEFT <-> GGUF LoRA (torch extra)")
    p.add_argument("direction", choices=["hf-to-gguf", "gguf-to-hf", "peft-to-gguf", "gguf-to-peft"])
    p.add_argument("input", help="HF model directory, GGUF file, PEFT adapter directory or GGUF LoRA")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--outtype", default="f32", help="hf-to-gguf tensor type: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 [%(default)s]")
    p.add_argument("--base", help="base model (built-in name or GGUF) for the adapter conversions")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_convert)
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
    from .config_file import flag_name, flatten_config, read_config_file

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "edgezo"
    try:
        argv = expand_config(parser, argv)
    except EdgezoError as exc:
        say(f"edgezo {command}: error: {exc}")
        return 1
    args = parser.parse_args(argv)
    library_log = logging.getLogger("edgezo")  # the library's notices (edgezo.engine): one line each on stderr
    if not library_log.handlers:
        library_log.addHandler(SayHandler())
        library_log.propagate = False
    # a rank of a distributed run (edgezo.distributed.launch_local, torchrun) says which it is
    name = f"edgezo {args.command}" + (f": rank {os.environ['RANK']}" if "RANK" in os.environ else "")
    try:
        result, text = args.func(args)
    except TrainingInterrupted as exc:
        say(f"{name}: {exc}")
        return 130
    except EdgezoError as exc:
        say(f"{name}: error: {exc}")
        return 1
    except KeyboardInterrupt:
        say(f"{name}: interrupted")
        return 130
    if args.json:
        emit_json(result)
    elif text:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
