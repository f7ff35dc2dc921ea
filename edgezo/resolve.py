"""From a command's options (an argparse Namespace or edgezo.session.FinetuneSpec: the long flag names as
attributes) to what it runs on: the model file, engine, task and splits, adapter, LoRA config, memory budget and
prediction, and a run directory's recorded config. `log` receives one-line notices (the CLI prints them)."""

from __future__ import annotations

import json
from pathlib import Path


from . import store
from .adapter import LoraConfig, read_base_model_info
from .data import Task, build_examples, build_task, read_jsonl
from .files import EdgezoError
from .memory import TORCH_METHODS
from .rundir import RunDir


def _quiet(msg: str) -> None:
    pass


DEFAULT_MODEL = "smollm2-135m"
DEFAULT_QUANT = store.BUILTIN_QUANT  # for built-in names only; a GGUF path is used as it is unless --quant is given


DEFAULT_DATA = "movie-reviews"
DEFAULT_MAX_SEQ_LEN = 256  # llama.cpp gives every sequence at least 256 KV cells anyway


FZOO_DEFAULT_DIRECTIONS = 8  # FZOO's paper: n = 8 one-sided directions per step


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


def resolve_base(args, saved: dict | None = None, log=_quiet) -> Path:
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
                split_for: LoraConfig | None = None, stored_prefix: bool = False, log=_quiet):
    """(engine, base model info). The info is read first: gguf's reader holds ~160 MB of Python objects for
    SmolLM2's 49k-token vocabulary while it lives, which would add to the engine's peak RSS if read later.
    With `split_for` (an adapter config whose blocks end at the top), evaluations run only those blocks; the ones
    below run once per batch, or with `stored_prefix` (--prefix-reuse cache) once per example before training."""
    from .engine import Engine, EngineConfig, SplitEngine  # imported late: `edgezo fetch --help` should not load llama.cpp
    from .split import split_files, split_point

    base = read_base_model_info(model_path)
    config = EngineConfig(n_seq_max=batch_size, n_ctx_per_seq=max_seq_len, n_threads=threads)
    first = split_point(base.architecture, base.n_layers, split_for) if split_for else 0
    if first:
        below = "once per example, stored before the first step" if stored_prefix else "once per batch"
        log(f"prefix reuse: blocks 0-{first - 1} run {below}, blocks {first}-{base.n_layers - 1} per evaluation")
        return SplitEngine(*split_files(model_path, first, base.n_layers, log), first, config), base
    return Engine(model_path, config), base


def dataset_max_seq_len(args, data_spec: str | None, log=_quiet) -> None:
    """Raise a default --max-seq-len to what a built-in dataset's longest example needs (BuiltinDataset.max_seq_len);
    a value the user chose is left alone."""
    builtin = store.DATASETS.get(data_spec)
    if builtin and args.max_seq_len == DEFAULT_MAX_SEQ_LEN and builtin.max_seq_len > args.max_seq_len:
        args.max_seq_len = builtin.max_seq_len
        log(f"--max-seq-len {args.max_seq_len}: {data_spec}'s longest example needs it")


def load_task_and_splits(engine, data_spec: str, args, splits: list[str], saved: dict | None = None,
                         optional: set[str] = frozenset(), log=_quiet):
    """The task (format, labels, template) is fixed by the training split; then tokenize the requested splits
    (those in `optional` only if the dataset has them)."""
    files, builtin_template = store.resolve_data(data_spec, args.valid, args.test, log=log)
    template = args.template or (saved or {}).get("template") or builtin_template
    label_words = parse_label_words(args.label_words) or (saved or {}).get("label_words")
    if args.mask_prompt is None:
        args.mask_prompt = (saved or {}).get("mask_prompt", True)
    train_path = files.train or files.split(splits[0])
    builtin = store.DATASETS.get(data_spec)  # a built-in dataset may cut over-long passages rather than refuse them
    task = build_task(read_jsonl(train_path), train_path, engine, template, label_words, args.mask_prompt,
                      shorten_text=bool(builtin and builtin.shorten_text))
    examples = {}
    for split in splits:
        if split in optional and getattr(files, split) is None:
            continue
        path = files.split(split)
        examples[split] = build_examples(read_jsonl(path), path, task, engine, args.max_seq_len, log=log)
    return task, examples, label_words


def task_dict(task: Task) -> dict:
    return {"format": task.format.value, "labels": list(task.labels), "label_token_ids": list(task.label_token_ids),
            "template": task.template}


def memory_budget(args) -> int:
    """--max-memory if given, else the --device profile's usable RAM, else 0 (no budget)."""
    if args.max_memory:
        return parse_bytes(args.max_memory)
    if args.device:
        from .memory import load_device_profile

        return load_device_profile(args.device).usable_ram_bytes
    return 0


def refuse_over_budget(model_path: Path, method: str, args, budget_bytes: int, prediction=None, log=_quiet) -> None:
    """Refuse to start a run whose predicted peak RSS (edgezo.memory, on the run's own batches; `prediction` if
    already made) exceeds the budget."""
    prediction = prediction or predict_run(model_path, method, args, log)[0]
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


def read_run_config(run: RunDir) -> dict | None:
    """A run directory's config.json, None if it has none; an unreadable one is an error naming the file."""
    if not run.config.exists():
        return None
    try:
        return json.loads(run.config.read_text())
    except (OSError, ValueError) as exc:
        raise EdgezoError(f"{run.config}: cannot read the saved configuration ({exc})") from None


# ---- eval --------------------------------------------------------------------------------------------------------
def resolve_adapter(spec: str | None) -> tuple[Path | None, dict | None]:
    """An adapter GGUF, or a run directory (its adapter.gguf, else its last checkpoint; and its config.json for the
    base model and prompt defaults), or RUN:best / RUN:last (the run's adapter.best.gguf / adapter.last.gguf)."""
    if not spec:
        return None, None
    path, which = Path(spec), None
    if not path.exists() and spec.rpartition(":")[2] in ("best", "last"):
        path, _, which = spec.rpartition(":")
        path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        saved = read_run_config(run)
        if which:
            chosen = run.best if which == "best" else run.last
            if not chosen.exists():
                raise EdgezoError(f"{spec}: {path} holds no {chosen.name} (a run without a validation split, or from "
                                  f"before it was kept); use {path} for the adapter the run left")
            return chosen, saved
        adapter = run.adapter if run.adapter.exists() else run.checkpoint
        if not adapter.exists():
            raise EdgezoError(f"{path}: run directory holds no adapter.gguf or checkpoint")
        return adapter, saved
    if which:
        raise EdgezoError(f"{spec}: RUN:{which} needs a run directory, {path} is not one")
    if not path.is_file():
        raise EdgezoError(f"{spec}: no such adapter file or run directory")
    return path, None


# ---- memory ------------------------------------------------------------------------------------------------------
def run_sequences(model_path: Path, method: str, args, log=_quiet) -> tuple[dict, object, dict]:
    """The run's data tokenized by llama.cpp's vocabulary (no weights loaded): (token sequences by split, task,
    the positions each sequence is scored at by split)."""
    from .engine import Vocabulary
    from .objective import output_positions

    splits = [args.split] if method == "inference" else ["train", "valid"]
    with Vocabulary(model_path) as vocab:
        task, examples, _ = load_task_and_splits(vocab, args.data, args, splits, optional={"valid"}, log=log)
    outputs = {split: [output_positions(ex, task) for ex in exs] for split, exs in examples.items()}
    return {split: [ex.tokens for ex in exs] for split, exs in examples.items()}, task, outputs


def predict_run(model_path: Path, method: str, args, log=_quiet, system_info: str | None = None) -> tuple:
    """(Prediction, sequence length used) for the run `args` describes (finetune, reference-*, memory or eval flags):
    with --data its own batches, else the worst case of --max-seq-len tokens per sequence. system_info: the
    llama.cpp build it is for (which weights it repacks); None: the one installed here."""
    from .memory import predict_llama_cpp, predict_torch, read_model_shape, run_batches
    from .split import split_point

    lora = lora_from_args(args)
    seq_len = getattr(args, "tokens_per_seq", None) or args.max_seq_len
    logit_rows, logit_cols, token_ids, outputs, n_held = None, 2, None, {}, 0
    if args.data:
        seqs, task, scored = run_sequences(model_path, method, args, log)
        n_held = sum(len(s) for split in seqs.values() for s in split)  # every example read stays in memory
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
        split_at, n_cached, n_stored = 0, 0, 0
        shape = read_model_shape(model_path)
        prefix_reuse = getattr(args, "prefix_reuse", "off")
        if method == "mezo" and prefix_reuse != "off":
            split_at = split_point(shape.architecture, shape.n_layers, lora)
            n_valid_tokens = sum(len(s) for s in valid) if args.data else 0
            if prefix_reuse == "cache":  # every example in the table, none in the repeated-batch cache
                n_stored = n_valid_tokens + (sum(len(s) for s in seqs["train"]) if args.data else 0)
            else:
                n_cached = n_valid_tokens
        if system_info is None:
            from .engine import system_info as installed_build

            system_info = installed_build()
        prediction = predict_llama_cpp(shape, method, args.batch_size, args.max_seq_len, lora=lora,
                                       n_tokens_per_seq=min(seq_len, args.max_seq_len), split_at=split_at,
                                       n_cached_tokens=n_cached, n_stored_tokens=n_stored,
                                       momentum=getattr(args, "estimator", "mezo") == "conmezo",
                                       system_info=system_info, n_held_tokens=n_held, **outputs)
    return prediction, seq_len
