"""`edgezo finetune` (MeZO) and `edgezo reference-bp` / `reference-mezo` (torch), and the resume policy: which
recorded settings a continued run may change."""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import rewards, store
from ..adapter import LoraAdapter, config_dict, read_base_model_info
from ..files import EdgezoError, write_json_atomic
from ..formats import check_base_file
from ..memory import torch_method
from ..mezo import Estimator, MezoConfig
from ..rundir import RunDir, identity_changes
from ..objective import evaluate
from ..trainer import TrainConfig, TrainingEvents, train
from .generate import generation_metrics
from .output import ConsoleProgress, say
from .parser import command_line
from .resolve import (DEFAULT_DATA, FZOO_DEFAULT_DIRECTIONS, load_task_and_splits, lora_from_args, memory_budget,
                      open_engine, predict_run, read_run_config, refuse_over_budget, resolve_base, task_dict)


# ---- finetune ----------------------------------------------------------------------------------------------------
def mezo_learning_rate(args) -> float:
    """--learning-rate if given, else the built-in model's tuned MeZO rate, else MezoConfig's default."""
    if args.learning_rate is not None:
        return args.learning_rate
    model = store.MODELS.get(args.model)
    return model.mezo_learning_rate if model else MezoConfig().learning_rate


def cmd_finetune(args) -> tuple[dict, str]:
    from .. import distributed
    from ..steppers import EngineStepper, engine_validation

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
    objective, evaluate_fn = None, evaluate
    if args.eval_generation:
        metrics = generation_metrics(task, args.data, None)
        if metrics is None:
            raise EdgezoError("--objective with a reward and --eval-generation need prompt/completion or chat data "
                              "with the prompt masked")
        if reward:
            metrics["reward"] = reward
            objective = functools.partial(rewards.reward_loss_function, reward=reward)
        evaluate_fn = functools.partial(rewards.evaluate_with_generation, metrics=metrics)
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
        stepper = distributed.group_stepper(group, engine, task, adapter, mezo, args.seed, train_cfg.steps)
        evaluate_fn = group.evaluate_fn
    else:
        stepper = EngineStepper(engine, task, adapter, mezo, args.seed, train_cfg.steps, args.lora_fa, objective)
    if not root:
        run = distributed.ReplicaRun()  # rank 0 owns the run directory
    else:
        write_json_atomic(run.config, config)
    engine.set_adapter(adapter)
    log(f"MeZO on {model_path.name}: {adapter.n_params:,} LoRA parameters, {len(examples['train'])} training examples, "
        f"{train_cfg.steps} steps of batch {train_cfg.batch_size}"
        + (f", {group.world} workers ({args.parallel}-parallel)" if group else ""))
    progress = ConsoleProgress(train_cfg.steps, start_step) if root else TrainingEvents()
    if root and args.report_to:
        from ..report import Fanout, make_reporter

        progress = Fanout(progress, make_reporter(args.report_to, run.path, args.project_name, config))
    validate = engine_validation(engine, adapter, task, train_cfg.batch_size, evaluate_fn)
    try:
        result = train(stepper, validate, examples["train"], examples.get("valid", []), train_cfg, run,
                       start_step=start_step, events=progress)
        report = group.finish(adapter) if group else {}
    finally:
        progress.close()
        if not root:
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


def _check_resume_config(run: RunDir, config: dict) -> None:
    try:
        saved = json.loads(run.config.read_text())
    except (OSError, ValueError) as exc:
        raise EdgezoError(f"{run.config}: cannot read the saved configuration ({exc})") from None
    changes = identity_changes(saved, config)
    if changes:
        raise EdgezoError(f"--resume: the configuration differs from {run.config}: {', '.join(changes)}")


# ---- reference-bp / reference-mezo -------------------------------------------------------------------------------
def cmd_reference(args) -> tuple[dict, str]:
    """The torch reference (edgezo.reference): the finetune run's LoRA, data and loss, trained by BP or torch MeZO."""
    try:
        from .. import reference
    except ImportError as exc:
        raise EdgezoError(f"the torch reference needs the torch extra ({exc}): "
                          f"pip install torch==2.13.0 && pip install -e '.[torch]'") from None
    from ..engine import Vocabulary

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
        result = reference.train_reference(spec, config, train_cfg, run, events=progress, log=say)
    finally:
        progress.close()
    step_seconds = [event["seconds"] for event in run.events() if "seconds" in event]
    summary = {"adapter": str(result.adapter_path), "steps": result.steps, "final_loss": result.final_loss,
               "seconds": time.perf_counter() - t0, "train_seconds": result.train_seconds,
               "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None,
               "peak_rss_bytes": result.peak_rss_bytes, "run_dir": str(run.path)}
    if result.valid is not None:
        summary.update(valid_accuracy=result.valid.accuracy, valid_loss=result.valid.loss)
    summary.update(best_adapter(result))
    return summary, (f"adapter: {result.adapter_path}  final loss {result.final_loss:.4f}"
                     + (f"  valid accuracy {result.valid.accuracy:.4f}" if result.valid else "")
                     + f"  ({summary['seconds']:.0f} s, peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB)")


def plot_hint(run_dir: Path) -> str:
    return f"curves: edgezo plot {run_dir} -o {run_dir / 'curves.png'}"
