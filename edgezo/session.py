"""A MeZO fine-tune from its options to its result: what `edgezo finetune` does, as a library call.

    spec = FinetuneSpec(data="movie-reviews", steps=200, out="runs/a")
    summary = finetune(spec, events=my_progress, log=print)

finetune() resolves the base model and data, plans memory against the budget, builds the engine, the adapter (fresh,
resumed, or a rank's replica) and the stepper, writes the run's config.json and runs edgezo.trainer.train. It
never prints: notices go to `log`, progress to `events`. A rank of a distributed run (torchrun, or the local ranks
the CLI launches for --workers) runs it too; only rank 0 writes the run directory and logs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import distributed, rewards, store
from .adapter import LoraAdapter, config_dict
from .files import EdgezoError, write_json_atomic
from .mezo import AUTO, Estimator, MezoConfig
from .objective import evaluate
from .resolve import (DEFAULT_DATA, DEFAULT_MAX_SEQ_LEN, FZOO_DEFAULT_DIRECTIONS, dataset_max_seq_len,
                      load_task_and_splits, lora_from_args, memory_budget, open_engine, predict_run, read_run_config,
                      refuse_over_budget, resolve_base, task_dict)
from .rundir import RunDir, identity_changes
from .steppers import EngineStepper, engine_validation
from .trainer import TrainConfig, TrainingEvents, TrainResult, train

_TRAIN, _MEZO = TrainConfig(), MezoConfig()


def _quiet(msg: str) -> None:
    pass


@dataclass
class FinetuneSpec:
    """The options of `edgezo finetune`, by their long flag names (tests check these defaults against the CLI's)."""

    # base model
    model: str | None = None  # built-in name or GGUF path; None: the run's own on --resume, else the default model
    quant: str | None = None
    threads: int = 0  # 0: all cores
    # data
    data: str | None = None  # None: the run's own on --resume, else movie-reviews
    valid: str | None = None
    test: str | None = None
    template: str | None = None
    label_words: str | None = None  # "label=word,..."
    mask_prompt: bool | None = None
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    batch_size: int = _TRAIN.batch_size
    # LoRA
    rank: int = 16
    alpha: float = 32.0
    targets: str = "attn_k,attn_v"
    num_layers: int | None = None
    layers: str | None = None  # "START:STOP"
    lora_fa: bool = False
    prefix_reuse: str = "auto"  # auto, cache (every example's hidden states kept for the run) or off
    # optimizer
    learning_rate: float | str | None = None  # a number, or None / "auto": AutoRate with rollbacks (edgezo.mezo)
    eps: float = _MEZO.eps
    auto_step: float = _MEZO.auto_step  # --learning-rate auto
    auto_clip: float = _MEZO.auto_clip  # --learning-rate auto; 0: no trust region
    estimator: str = Estimator.MEZO.value
    n_directions: int | None = None  # None: 1 for mezo, FZOO_DEFAULT_DIRECTIONS for fzoo
    cone_angle: float = _MEZO.cone_angle  # conmezo
    cone_momentum: float = _MEZO.cone_momentum  # conmezo
    weight_decay: float = _MEZO.weight_decay
    schedule: str = _MEZO.schedule.value
    warmup_steps: int = _MEZO.warmup_steps
    objective: str = "loss"  # loss, exact-match, tool-call or MODULE:FUNCTION
    # training loop
    steps: int = _TRAIN.steps
    seed: int = _TRAIN.seed
    eval_every: int = _TRAIN.eval_every
    n_valid: int = _TRAIN.n_valid
    max_train_seconds: float = _TRAIN.max_train_seconds
    patience: int = _TRAIN.patience
    rollback: bool | None = None  # None: with the auto rate (one process)
    eval_generation: bool = False
    # run directory
    out: str = "runs/latest"
    save_every: int = _TRAIN.save_every
    resume: bool = False
    report_to: str | None = None
    project_name: str | None = None
    # memory budget
    max_memory: str | None = None  # "2G"
    device: str | None = None  # a device profile's usable RAM
    # distributed
    workers: int = 1
    parallel: str = "data"
    peer_timeout: float = 30.0

    @classmethod
    def from_options(cls, options) -> FinetuneSpec:
        """From any object with the flags as attributes (an argparse Namespace of `edgezo finetune`)."""
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})


def check(spec: FinetuneSpec) -> None:
    """Refuse combinations that cannot run, before anything is fetched or launched."""
    if spec.workers < 1:
        raise EdgezoError(f"--workers must be >= 1, got {spec.workers}")
    if spec.workers > 1 or distributed.launched():
        if spec.estimator == Estimator.FZOO.value or spec.lora_fa or spec.objective != "loss" or spec.eval_generation:
            raise EdgezoError("distributed MeZO runs a two-sided estimator (mezo, conmezo) on every LoRA tensor with "
                              "the loss only: drop --estimator fzoo / --lora-fa / --objective / --eval-generation, or "
                              "train with one worker")
        if spec.rollback:
            raise EdgezoError("--rollback: a distributed run does not roll back (each replica would have to); "
                              "train with one worker")
        if spec.max_train_seconds:
            raise EdgezoError("--max-train-seconds: each worker's clock differs, so workers would stop at different "
                              "steps; bound a distributed run with --steps")


def resolve_inputs(spec: FinetuneSpec, log=_quiet) -> tuple[Path, dict | None]:
    """(base file, the run's saved config on --resume): fetches and requantizes once, fills spec.model / quant /
    data with what is used (--resume without them continues on the run's own) and raises a default max_seq_len to
    what a built-in dataset needs."""
    saved = read_run_config(RunDir(spec.out)) if spec.resume else None
    model_path = resolve_base(spec, saved, log=log)
    spec.data = spec.data or (saved or {}).get("data") or DEFAULT_DATA
    dataset_max_seq_len(spec, spec.data, log)
    return model_path, saved


def mezo_learning_rate(spec) -> float:
    """The torch reference's MeZO rate: --learning-rate if given, else the built-in model's tuned MeZO rate, else
    MezoConfig's default (`edgezo finetune` defaults to AUTO instead)."""
    if spec.learning_rate is not None:
        return spec.learning_rate
    model = store.MODELS.get(spec.model)
    return model.mezo_learning_rate if model else MezoConfig().learning_rate


def mezo_config(spec: FinetuneSpec) -> MezoConfig:
    estimator = Estimator(spec.estimator)
    n_directions = spec.n_directions or (FZOO_DEFAULT_DIRECTIONS if estimator is Estimator.FZOO else 1)
    learning_rate = AUTO if spec.learning_rate is None else spec.learning_rate
    return MezoConfig(learning_rate=learning_rate, eps=spec.eps, n_directions=n_directions,
                      weight_decay=spec.weight_decay, schedule=spec.schedule, warmup_steps=spec.warmup_steps,
                      estimator=estimator, cone_angle=spec.cone_angle, cone_momentum=spec.cone_momentum,
                      auto_step=spec.auto_step, auto_clip=spec.auto_clip)


def plan_memory(spec: FinetuneSpec, model_path: Path, budget_bytes: int, log=_quiet) -> None:
    """Refuse a run predicted over the budget; prefix reuse (a second model) is turned off where only it is over."""
    prediction, _ = predict_run(model_path, "mezo", spec, log)
    if prediction.total_bytes > budget_bytes and "split_suffix_model_bytes" in prediction.breakdown:
        spec.prefix_reuse = "off"
        log(f"prefix reuse off: with it the predicted peak RSS ({prediction.total_bytes / 2**20:.0f} MiB) "
            f"exceeds the memory budget of {budget_bytes / 2**20:.0f} MiB")
        prediction, _ = predict_run(model_path, "mezo", spec, log)
    refuse_over_budget(model_path, "mezo", spec, budget_bytes, prediction, log)


def store_hidden_states(engine, examples: dict, n_valid: int, events: TrainingEvents | None, log=_quiet) -> None:
    """--prefix-reuse cache: the blocks below the adapter (engine: a SplitEngine) run once per training and
    validation example, now."""
    valid = examples.get("valid", [])
    sequences = [ex.tokens for ex in examples["train"] + (valid[:n_valid] if n_valid else valid)]
    nbytes = engine.store_hidden_states(sequences, log, events.preparing if events else lambda done, total: None)
    log(f"hidden states of {len(sequences)} examples entering block {engine.first_block}: {nbytes / 2**20:.0f} MiB, "
        f"memory-mapped from {engine.table.path}")


def check_resume(run: RunDir, saved: dict | None, config: dict) -> None:
    """Refuse to continue `run` (its config.json: `saved`) with a configuration of another identity."""
    if saved is None:
        raise EdgezoError(f"--resume: {run.config} is missing, so the run's configuration cannot be checked")
    changes = identity_changes(saved, config)
    if changes:
        raise EdgezoError(f"--resume: the configuration differs from {run.config}: {', '.join(changes)}")


def finetune(spec: FinetuneSpec, events: TrainingEvents | None = None, log=_quiet) -> dict:
    """Run the fine-tune `spec` describes (resumed with spec.resume); the result as `edgezo finetune --json` prints
    it. `spec` is not modified."""
    spec = dataclasses.replace(spec)
    check(spec)
    reward = None if spec.objective == "loss" else rewards.load_reward(spec.objective)
    spec.eval_generation = spec.eval_generation or reward is not None
    if spec.eval_generation:
        spec.prefix_reuse = "off"  # generation runs every block for each new token: nothing to reuse
    from .engine import SplitEngine

    t0 = time.perf_counter()
    # A rank of a distributed run: only rank 0 writes the run directory and talks.
    group = (distributed.Group.from_env(distributed.DistConfig(spec.parallel, spec.peer_timeout), spec.workers)
             if distributed.launched() else None)
    root = group is None or group.is_root
    log = log if root else _quiet
    run = RunDir(spec.out)
    model_path, saved = resolve_inputs(spec, log)
    lora = lora_from_args(spec)
    mezo = mezo_config(spec)
    budget_bytes = memory_budget(spec)
    if budget_bytes:
        plan_memory(spec, model_path, budget_bytes, log)
    engine_batch = group.engine_batch_size(spec.batch_size) if group else spec.batch_size
    engine, base = open_engine(model_path, engine_batch, spec.max_seq_len, spec.threads,
                               split_for=lora if spec.prefix_reuse != "off" else None,
                               stored_prefix=spec.prefix_reuse == "cache", log=log)
    if spec.prefix_reuse == "cache" and not isinstance(engine, SplitEngine):  # LoRA in block 0: nothing below it
        raise EdgezoError("--prefix-reuse cache needs LoRA on the top blocks only (--num-layers N or --layers A:), "
                          "so that the blocks below it never change")
    task, examples, label_words = load_task_and_splits(engine, spec.data, spec, ["train", "valid"],
                                                       optional={"valid"}, log=log)
    if "valid" not in examples:
        log("no validation split: training without periodic evaluation; adapter.gguf is the last step's")
    # a distributed run does not roll back (each replica would have to): there, the rate alone is automatic
    rollback = (mezo.auto if spec.rollback is None else spec.rollback) and group is None
    train_cfg = TrainConfig(steps=spec.steps, batch_size=spec.batch_size, seed=spec.seed, eval_every=spec.eval_every,
                            save_every=spec.save_every, n_valid=spec.n_valid, max_memory_bytes=budget_bytes,
                            max_train_seconds=spec.max_train_seconds, freeze_lora_a=spec.lora_fa,
                            best_by=best_by(task, reward), rollback=rollback,
                            patience=spec.patience)
    objective, evaluate_fn = None, evaluate
    if spec.eval_generation:
        metrics = rewards.generation_metrics(task, spec.data, None)
        if metrics is None:
            raise EdgezoError("--objective with a reward and --eval-generation need prompt/completion or chat data "
                              "with the prompt masked")
        if reward:
            metrics["reward"] = reward
            objective = functools.partial(rewards.reward_loss_function, reward=reward)
        evaluate_fn = functools.partial(rewards.evaluate_with_generation, metrics=metrics)
    config = {
        "model": spec.model, "model_path": str(model_path), "quant": spec.quant, "data": spec.data,
        "valid": spec.valid, "test": spec.test, "template": task.template, "mask_prompt": spec.mask_prompt,
        "label_words": label_words, "max_seq_len": spec.max_seq_len, "task": task_dict(task),
        "lora": config_dict(lora),
        "mezo": {**asdict(mezo), "schedule": mezo.schedule.value, "estimator": mezo.estimator.value},
        "train": asdict(train_cfg), "threads": spec.threads, "objective": spec.objective,
        "eval_generation": spec.eval_generation,
        # the table's logits differ from the full model's by llama.cpp's batch-composition jitter: part of the run
        "hidden_state_table": spec.prefix_reuse == "cache",
    }
    if group:  # only then: single-process runs resume as before, and a change of world size or mode is refused
        config["distributed"] = group.config_dict()

    def fresh() -> LoraAdapter:  # every rank builds the same initial adapter from the seed: nothing to send
        return LoraAdapter.init(base, lora, seed=spec.seed)

    start_step = 0
    if not root:  # a replica: the checkpoint in its --out if that holds this run, else the seed init
        adapter, start_step = distributed.local_state(run, config, base, fresh)
    elif spec.resume:
        if not run.state.exists():
            raise EdgezoError(f"--resume: {run.path} holds no checkpoint (state.json)")
        check_resume(run, saved, config)
        adapter, start_step = run.load_checkpoint(base)
        run.truncate_metrics(start_step)
        log(f"resuming {run.path} at step {start_step}")
    else:
        if run.state.exists():
            raise EdgezoError(f"{run.path} already holds a run; pass --resume to continue it or choose another --out")
        adapter = fresh()
        run.create()
        run.metrics.unlink(missing_ok=True)
    if group:
        stepper = distributed.group_stepper(group, engine, task, adapter, mezo, spec.seed, train_cfg.steps)
    else:
        stepper = EngineStepper(engine, task, adapter, mezo, spec.seed, train_cfg.steps, spec.lora_fa, objective)
    if start_step:
        stepper.resume(run)  # the optimizer state saved with the checkpoint (ConMeZO's momentum)
    if group:  # same config, data and state on every rank (a rank behind replays rank 0's step log); no weights sent
        start_step = group.synchronize(stepper, start_step, distributed.run_digest(config, examples["train"]), run,
                                       mezo, fresh)
        if root:
            def on_lost(step: int) -> str:  # the update of the step in flight was not applied: theta is `step`'s
                stepper.checkpoint(run, step)
                return f"checkpoint of step {step} saved in {run.path}"

            group.on_lost = on_lost
        evaluate_fn = group.evaluate_fn
    if root:
        write_json_atomic(run.config, config)
    else:
        run = distributed.ReplicaRun()  # rank 0 owns the run directory
    if spec.prefix_reuse == "cache":  # after the checks above: minutes of work a refused --resume should not cost
        store_hidden_states(engine, examples, spec.n_valid, events, log)
    engine.set_adapter(adapter)
    log(f"MeZO on {model_path.name}: {adapter.n_params:,} LoRA parameters, {len(examples['train'])} training examples, "
        f"{train_cfg.steps} steps of batch {train_cfg.batch_size}"
        + (f", {group.world} workers ({spec.parallel}-parallel)" if group else ""))
    events = (events or TrainingEvents()) if root else TrainingEvents()
    if root and spec.report_to:
        from .report import Fanout, make_reporter

        events = Fanout(events, make_reporter(spec.report_to, run.path, spec.project_name, config))
    validate = engine_validation(engine, adapter, task, train_cfg.batch_size, evaluate_fn)
    try:
        result = train(stepper, validate, examples["train"], examples.get("valid", []), train_cfg, run,
                       start_step=start_step, events=events)
        report = group.finish(adapter) if group else {}
    finally:
        events.close()
        if not root:
            run.remove()
    if report and not report["replicas_identical"]:
        log(f"warning: the replicas' adapters differ: {report['replica_sha256']}")
    summary = {"adapter": str(result.adapter_path) if root else None, "steps": result.steps,
               "final_loss": result.final_loss, "seconds": time.perf_counter() - t0,
               "train_seconds": result.train_seconds, "peak_rss_bytes": result.peak_rss_bytes,
               "run_dir": str(run.path) if root else None, **report, **valid_fields(result)}
    if root:
        summary.update(best_fields(result))
    return summary


def best_by(task, reward) -> str:
    """What a validation is judged on: the reward where one is set, accuracy for classification, else the loss."""
    if reward:
        return "valid_reward"
    return "valid_accuracy" if task.is_classification else "valid_loss"


def valid_fields(result: TrainResult) -> dict:
    """The last validation's fields of a run's --json result (none without a validation split)."""
    if result.valid is None:
        return {}
    return {"valid_accuracy": result.valid.accuracy, "valid_loss": result.valid.loss,
            **{f"valid_{name}": value for name, value in getattr(result.valid, "metrics", {}).items()}}


def best_fields(result: TrainResult) -> dict:
    """The --json fields for adapter.best.gguf (None without a validation split)."""
    best = result.best or {}
    return {"best_adapter": str(result.best_adapter_path) if result.best_adapter_path else None,
            "best_step": best.get("step"), "best_valid_loss": best.get("valid_loss"),
            "best_valid_accuracy": best.get("valid_accuracy"), "best_valid_reward": best.get("valid_reward"),
            "rollbacks": result.rollbacks, "stop_reason": result.stop_reason}
