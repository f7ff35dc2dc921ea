"""`edgezo finetune` (MeZO, edgezo.session) and `edgezo reference-bp` / `reference-mezo` (torch, edgezo.reference)."""

from __future__ import annotations


import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from ..adapter import LoraAdapter, config_dict, read_base_model_info
from ..files import EdgezoError, write_json_atomic
from ..formats import check_base_file
from ..memory import torch_method
from ..mezo import MezoConfig
from ..resolve import (dataset_max_seq_len, load_task_and_splits, lora_from_args, memory_budget, read_run_config,
                       refuse_over_budget, resolve_base, task_dict)
from ..rundir import RunDir, identity_changes
from ..session import best_by, best_fields, mezo_learning_rate, valid_fields
from ..trainer import TrainConfig
from .output import ConsoleProgress, say
from .parser import command_line


# ---- finetune ----------------------------------------------------------------------------------------------------
def cmd_finetune(args) -> tuple[dict, str]:
    from .. import distributed, session

    spec = session.FinetuneSpec.from_options(args)
    if spec.workers > 1 and not distributed.launched():
        # N local ranks of this same command (as `edgezo finetune` flags, so a rank is an ordinary CLI process)
        session.check(spec)
        session.resolve_inputs(args, log=say)  # once here, so the ranks' flags name what to use
        return distributed.launch_local(args, command_line("finetune", args), say)
    summary = session.finetune(spec, ConsoleProgress(), log=say)
    if summary["run_dir"]:
        say(plot_hint(Path(summary["run_dir"])))
    return summary, (f"adapter: {summary['adapter']}  final loss {summary['final_loss']:.4f}"
                     + (f"  valid accuracy {summary['valid_accuracy']:.4f}" if "valid_accuracy" in summary else "")
                     + f"  ({summary['seconds']:.0f} s)")


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
    model_path = resolve_base(args, log=say)
    dataset_max_seq_len(args, args.data, log=say)
    if args.threads:
        reference.torch.set_num_threads(args.threads)
    config = reference.ReferenceConfig(method=args.method, optimizer=args.optimizer, dtype=args.dtype,
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
                            max_train_seconds=args.max_train_seconds, save_every=args.save_every,
                            final_adapter="last")  # peft/ beside adapter.gguf is the last too
    run = RunDir(args.out)
    if args.resume and not run.state.exists():
        raise EdgezoError(f"--resume: {run.path} holds no checkpoint (state.json)")
    if not args.resume and (run.state.exists() or run.adapter.exists()):
        raise EdgezoError(f"{run.path} already holds a run; "
                          + ("pass --resume to continue it or " if args.method == "bp" else "") + "choose another --out")
    method = torch_method(config.gradient_checkpointing, config.quantized_base) if args.method == "bp" else args.method
    if budget_bytes:
        refuse_over_budget(model_path, method, args, budget_bytes, log=say)
    base = read_base_model_info(model_path)
    with Vocabulary(model_path) as vocab:  # llama.cpp's tokenizer: the token ids finetune sees
        task, examples, label_words = load_task_and_splits(vocab, args.data, args, ["train", "valid"], optional={"valid"},
                                                           log=say)
    train_cfg = replace(train_cfg, best_by=best_by(task, None))  # adapter.best.gguf as finetune's
    config_json = {
        "method": args.method, "model": args.model, "model_path": str(model_path), "quant": args.quant,
        "data": args.data, "valid": args.valid, "test": args.test, "template": task.template,
        "mask_prompt": args.mask_prompt, "label_words": label_words, "max_seq_len": args.max_seq_len,
        "task": task_dict(task), "lora": config_dict(lora), "reference": asdict(config),
        "schedule": {**asdict(schedule), "schedule": schedule.schedule.value}, "train": asdict(train_cfg),
        "threads": args.threads,
    }
    start_step = 0
    if args.resume:  # the same run: its identity (rundir.identity) unchanged, its length and watch may change
        changes = identity_changes(read_run_config(run) or {}, json.loads(json.dumps(config_json)))
        if changes:
            raise EdgezoError(f"--resume: the configuration differs from {run.config}: {', '.join(changes)}")
        start_step = run.load_checkpoint(base)[1]
        run.truncate_metrics(start_step)
        say(f"resuming {run.path} at step {start_step}")
    else:
        run.create()
        run.metrics.unlink(missing_ok=True)
    write_json_atomic(run.config, config_json)
    spec = reference.ReferenceRun(model_path, base, LoraAdapter.init(base, lora, seed=args.seed), task,
                                  examples["train"], examples.get("valid", []), schedule)
    weights = f"{config.base_dtype} blocks" if config.quantized_base else args.dtype
    method_name = f"{args.method} (SGD)" if config.optimizer == "sgd" else args.method
    say(f"torch {method_name} ({weights}{', gradient checkpointing' if args.gradient_checkpointing else ''}) on "
        f"{model_path.name}: {spec.adapter.n_params:,} LoRA parameters, {len(spec.train_set)} training examples, "
        f"{args.steps} steps of batch {args.batch_size}")
    progress = ConsoleProgress(desc=f"reference-{args.method}")
    try:
        result = reference.train_reference(spec, config, train_cfg, run, events=progress, log=say,
                                           start_step=start_step)
    finally:
        progress.close()
    step_seconds = [event["seconds"] for event in run.events() if "seconds" in event]
    summary = {"adapter": str(result.adapter_path), "steps": result.steps, "final_loss": result.final_loss,
               "seconds": time.perf_counter() - t0, "train_seconds": result.train_seconds,
               "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None,
               "peak_rss_bytes": result.peak_rss_bytes, "run_dir": str(run.path),
               **valid_fields(result), **best_fields(result)}
    return summary, (f"adapter: {result.adapter_path}  final loss {result.final_loss:.4f}"
                     + (f"  valid accuracy {result.valid.accuracy:.4f}" if result.valid else "")
                     + f"  ({summary['seconds']:.0f} s, peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB)")


def plot_hint(run_dir: Path) -> str:
    return f"curves: edgezo plot {run_dir} -o {run_dir / 'curves.png'}"
