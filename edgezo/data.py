"""Datasets: JSONL files in the formats people already use, turned into token sequences with a loss target.

Formats, detected from the keys of the first record (as mlx-lm does):
    {"text": ...}                        language modelling on every token
    {"prompt": ..., "completion": ...}   language modelling on the completion tokens only
    {"messages": [{"role", "content"}]}  chat: the model's own chat template; loss on every assistant turn
    {"text": ..., "label": ...}          classification: prompt = the template filled with the record's fields
                                         ({text}, and any other field but the label), answer = label word
    {"messages", "functions", "ground_truth"}
                                         function calling as BFCL poses it (edgezo.bfcl): the schemas through
                                         the model's chat template, the loss on the reference call
Every example becomes (tokens, target_start): the loss covers tokens[target_start:], each predicted from the
position before it; a multi-turn chat has one target span per assistant turn instead. With mask_prompt False
(--no-mask-prompt, mlx-lm's default) the loss covers every token after the first. Classification examples also
carry the label's index.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from .files import EdgezoError

DEFAULT_TEMPLATE = "{text}\nLabel:"


class Format(str, Enum):
    TEXT = "text"
    COMPLETIONS = "completions"
    CHAT = "chat"
    CLASSIFICATION = "classification"
    FUNCTION_CALLS = "function-calls"


class Tokenizer(Protocol):
    def tokenize(self, text: str, add_special: bool) -> list[int]: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str: ...
    # function-calls data renders the template itself (edgezo.bfcl.ChatTemplate), with tools
    def chat_template(self) -> str | None: ...
    def bos_eos_text(self) -> tuple[str, str]: ...


@dataclass(frozen=True)
class DataFiles:
    train: Path | None = None
    valid: Path | None = None
    test: Path | None = None

    def split(self, name: str) -> Path:
        path = getattr(self, name)
        if path is None:
            raise EdgezoError(f"the dataset has no {name} split")
        return path


@dataclass(frozen=True)
class Example:
    tokens: tuple[int, ...]
    target_start: int  # loss on tokens[target_start:]; for classification = len(tokens) (answer follows)
    label: int = -1  # index into Task.labels for classification, -1 otherwise
    # [start, end) token ranges of the loss when there are several (the assistant turns of a chat);
    # () means the one span [target_start, len(tokens))
    target_spans: tuple[tuple[int, int], ...] = ()
    # what a generation is graded against when no single reference text says it (function calls: the accepted
    # calls, edgezo.bfcl.answer_json); "" otherwise
    answer: str = ""

    @property
    def target_indices(self) -> list[int]:
        """Indices of the tokens the loss covers (each is predicted from the position before it)."""
        if not self.target_spans:
            return list(range(self.target_start, len(self.tokens)))
        return [i for start, end in self.target_spans for i in range(start, end)]


@dataclass(frozen=True)
class Task:
    """What the loss needs besides the examples."""

    format: Format
    labels: tuple[str, ...] = ()  # classification label names, in index order
    label_token_ids: tuple[int, ...] = ()  # first token of each label word
    template: str = DEFAULT_TEMPLATE
    mask_prompt: bool = True  # completions / chat: loss on the completion / assistant turns only (else every token)
    # classification: a prompt over the context has its {text} field cut at a word boundary (and ' ...' appended)
    # until it fits, instead of being refused. Off unless a dataset asks for it (the built-in boolq does).
    shorten_text: bool = False

    @property
    def is_classification(self) -> bool:
        return self.format is Format.CLASSIFICATION


def resolve_files(data: str | os.PathLike, valid: str | None = None, test: str | None = None) -> DataFiles:
    """A directory with train/valid/test.jsonl, or a JSONL path (the train split) with optional --valid/--test."""
    path = Path(data)
    if path.is_dir():
        found = {s: path / f"{s}.jsonl" for s in ("train", "valid", "test") if (path / f"{s}.jsonl").exists()}
        if not found:
            raise EdgezoError(f"{path}: directory holds none of train.jsonl, valid.jsonl, test.jsonl")
        files = DataFiles(**found)
    elif path.is_file():
        files = DataFiles(train=path)
    else:
        raise EdgezoError(f"{path}: no such dataset file or directory (and not a built-in dataset name)")
    overrides = {k: Path(v) for k, v in (("valid", valid), ("test", test)) if v}
    for split, p in overrides.items():
        if not p.is_file():
            raise EdgezoError(f"{p}: no such {split} file")
    return DataFiles(**{**files.__dict__, **overrides})


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EdgezoError(f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise EdgezoError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                records.append(record)
    except UnicodeDecodeError as exc:
        raise EdgezoError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise EdgezoError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not records:
        raise EdgezoError(f"{path}: the dataset is empty")
    return records


def detect_format(record: dict, path: Path) -> Format:
    keys = set(record)
    if {"messages", "functions", "ground_truth"} <= keys:
        return Format.FUNCTION_CALLS
    if "messages" in keys:
        return Format.CHAT
    if {"prompt", "completion"} <= keys:
        return Format.COMPLETIONS
    if {"text", "label"} <= keys:
        return Format.CLASSIFICATION
    if "text" in keys:
        return Format.TEXT
    raise EdgezoError(
        f"{path}:1: unknown record format with keys {sorted(keys)}; expected text, prompt+completion, messages, or text+label"
    )


_REQUIRED = {
    Format.TEXT: ("text",),
    Format.COMPLETIONS: ("prompt", "completion"),
    Format.CHAT: ("messages",),
    Format.CLASSIFICATION: ("text", "label"),
    Format.FUNCTION_CALLS: ("messages", "functions", "ground_truth"),
}


def _check_record(record: dict, fmt: Format, where: str) -> None:
    for key in _REQUIRED[fmt]:
        if key not in record:
            raise EdgezoError(f"{where}: missing field {key!r} (the file's format is {fmt.value})")
        value = record[key]
        if key == "messages":
            ok = isinstance(value, list) and value and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
            )
            if not ok:
                raise EdgezoError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
        elif key == "label":
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise EdgezoError(f"{where}: 'label' must be a string or an integer, got {value!r}")
        elif key in ("functions", "ground_truth"):
            if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
                raise EdgezoError(f"{where}: {key!r} must be a non-empty list of objects")
        elif not isinstance(value, str):
            raise EdgezoError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")


def build_task(train_records: list[dict], path: Path, tokenizer: Tokenizer, template: str | None,
               label_words: dict[str, str] | None, mask_prompt: bool = True, shorten_text: bool = False) -> Task:
    """Fix the format (and for classification the label set and label tokens) from the training split."""
    fmt = detect_format(train_records[0], path)
    if fmt is not Format.CLASSIFICATION:
        return Task(format=fmt, mask_prompt=mask_prompt)
    template = template or DEFAULT_TEMPLATE
    if "{text}" not in template:
        raise EdgezoError(f"--template must contain {{text}}, got {template!r}")
    labels = tuple(sorted({str(r.get("label")) for r in train_records if "label" in r}))
    if len(labels) < 2:
        raise EdgezoError(f"{path}: classification needs at least two labels, found {list(labels)}")
    label_words = label_words or {}
    unknown = sorted(set(label_words) - set(labels))
    if unknown:
        raise EdgezoError(f"--label-words names label(s) {unknown} that do not occur in {path} (labels: {list(labels)})")
    token_ids = []
    for label in labels:
        word = label_words.get(label, " " + label)
        ids = tokenizer.tokenize(word, add_special=False)
        if len(ids) != 1:
            raise EdgezoError(
                f"label word {word!r} of label {label!r} is {len(ids)} tokens, not one; "
                f"map it to a single-token word with --label-words {label}=WORD"
            )
        token_ids.append(ids[0])
    if len(set(token_ids)) != len(token_ids):
        raise EdgezoError(f"label words of {list(labels)} share a token; choose distinct --label-words")
    return Task(format=fmt, labels=labels, label_token_ids=tuple(token_ids), template=template,
                shorten_text=shorten_text)


def build_examples(records: list[dict], path: Path, task: Task, tokenizer: Tokenizer, max_tokens: int,
                   log: Callable[[str], None] = lambda msg: None) -> list[Example]:
    examples, n_shortened = [], 0
    label_index = {label: i for i, label in enumerate(task.labels)}
    templates = _function_call_templates(tokenizer) if task.format is Format.FUNCTION_CALLS else None
    for i, record in enumerate(records):
        where = f"{path}:{i + 1}"
        _check_record(record, task.format, where)
        if task.format is Format.CLASSIFICATION:
            label = str(record["label"])
            if label not in label_index:
                raise EdgezoError(f"{where}: unknown label {label!r} (labels from the training split: {list(task.labels)})")
            tokens, shortened = _classification_prompt(record, task, tokenizer, max_tokens, where)
            n_shortened += shortened
            example = Example(tuple(tokens), target_start=len(tokens), label=label_index[label])
        elif task.format is Format.CHAT:
            example = _chat_example(record["messages"], tokenizer, task.mask_prompt, where)
        elif task.format is Format.FUNCTION_CALLS:
            example = _function_call_example(record, tokenizer, templates, task.mask_prompt)
        else:
            prompt, full = _prompt_and_full_text(record, task.format)
            prompt_tokens = tokenizer.tokenize(prompt, add_special=True) if prompt else []
            if task.format is Format.TEXT:
                tokens = tokenizer.tokenize(full, add_special=True)
                start = 1
            else:
                tokens = prompt_tokens + tokenizer.tokenize(full[len(prompt):], add_special=False)
                start = len(prompt_tokens) if task.mask_prompt else 1
            if start >= len(tokens):
                raise EdgezoError(f"{where}: nothing to learn (the completion is empty)")
            example = Example(tuple(tokens), target_start=max(start, 1))
        if len(example.tokens) > max_tokens:
            raise EdgezoError(
                f"{where}: {len(example.tokens)} tokens, longer than the context of {max_tokens} tokens per sequence "
                f"(raise --max-seq-len or shorten the example)"
            )
        if not example.tokens:
            raise EdgezoError(f"{where}: the example has no tokens")
        examples.append(example)
    if n_shortened:
        log(f"{path}: {n_shortened} of {len(records)} prompts had their text cut to fit {max_tokens} tokens (--max-seq-len)")
    return examples


def fill_template(template: str, record: dict, where: str, text: str | None = None) -> str:
    """The classification prompt: {text} is the record's text (or `text`, a shortened copy), any other {field} that
    field of the record. The label is never a field: it is the answer."""
    fields = {key: value for key, value in record.items() if key != "label"}
    try:
        return template.format_map({**fields, "text": record["text"] if text is None else text})
    except KeyError as exc:
        raise EdgezoError(f"{where}: the template names {{{exc.args[0]}}}, not a field of this record "
                          f"(fields: {', '.join(sorted(fields))})") from None
    except (IndexError, ValueError) as exc:
        raise EdgezoError(f"{where}: the template {template!r} is not a valid format string ({exc})") from None


def _classification_prompt(record: dict, task: Task, tokenizer: Tokenizer, max_tokens: int,
                           where: str) -> tuple[list[int], bool]:
    """(prompt tokens, whether the text was shortened). With task.shorten_text, an over-long prompt keeps the most
    whole words of its text that fit, found by bisection (the token count grows with the words kept); the rest of
    the template (a question, the answer cue) is kept whole. A prompt that cannot fit is returned as it is, for the
    caller to refuse."""
    def prompt(text: str | None = None) -> list[int]:
        return tokenizer.tokenize(fill_template(task.template, record, where, text), add_special=True)

    tokens = prompt()
    if len(tokens) <= max_tokens or not task.shorten_text:
        return tokens, False
    words = record["text"].split(" ")
    fits, too_long = -1, len(words)  # numbers of words kept: -1 stands for "none known to fit"
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if len(prompt(" ".join(words[:middle]) + " ...")) <= max_tokens:
            fits = middle
        else:
            too_long = middle
    if fits < 0:
        return tokens, False
    return prompt(" ".join(words[:fits]) + " ..."), True


def _prompt_and_full_text(record: dict, fmt: Format) -> tuple[str, str]:
    if fmt is Format.TEXT:
        return "", record["text"]
    return record["prompt"], record["prompt"] + record["completion"]


def chat_segments(messages: list[dict], tokenizer: Tokenizer, where: str) -> list[tuple[str, bool]]:
    """The conversation as the chat template renders it, cut into (text, is target) pieces: each assistant turn,
    as the template writes it (through its end-of-turn marker), is a target; everything else is context.

    Each cut comes from rendering a prefix of the conversation, so the pieces concatenate to the full rendering;
    a template that rewrites earlier turns when later ones follow is refused rather than trained on wrongly."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and through.startswith(prompt)):
            raise EdgezoError(f"{where}: the chat template does not render turn {i + 1} as a continuation of the "
                              f"turns before it; cannot mark the assistant turns")
        pieces += [(prompt[len(done):], False), (through[len(prompt):], True)]
        done = through
    if not pieces:
        raise EdgezoError(f"{where}: no assistant message: nothing to learn")
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if full.startswith(done) and len(full) > len(done):
        pieces.append((full[len(done):], False))
    return [(text, target) for text, target in pieces if text]


def _chat_example(messages: list[dict], tokenizer: Tokenizer, mask_prompt: bool, where: str) -> Example:
    # The rendered text carries the template's own BOS (llama-cpp-python tokenizes chat prompts the same way:
    # add_special off, special tokens parsed), so no piece gets another one.
    tokens, spans = [], []
    for text, target in chat_segments(messages, tokenizer, where):
        ids = tokenizer.tokenize(text, add_special=False)
        if target and ids:
            spans.append((max(len(tokens), 1), len(tokens) + len(ids)))
        tokens += ids
    if not mask_prompt:
        return Example(tuple(tokens), target_start=1)
    return Example(tuple(tokens), target_start=spans[0][0], target_spans=tuple(spans))

def _function_call_templates(tokenizer: Tokenizer) -> tuple:
    """(the model's chat template as edgezo.bfcl renders it, or None without one; its EOS text)."""
    from .bfcl import ChatTemplate

    source = tokenizer.chat_template()
    bos, eos = tokenizer.bos_eos_text()
    return (ChatTemplate(source, bos, eos) if source else None), eos


def _function_call_example(record: dict, tokenizer: Tokenizer, templates: tuple, mask_prompt: bool) -> Example:
    from .bfcl import answer_json, prompt_and_target

    template, eos = templates
    prompt, target, fmt = prompt_and_target(record, template, eos)
    # a chat template writes its own BOS; a plain prompt gets the vocabulary's
    prompt_ids = tokenizer.tokenize(prompt, add_special=template is None)
    tokens = prompt_ids + tokenizer.tokenize(target, add_special=False)
    return Example(tuple(tokens), target_start=max(len(prompt_ids), 1) if mask_prompt else 1,
                   answer=answer_json(record, fmt))


def batch_indices(n_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the examples in the batch of 0-based `step`.

    The training stream is the concatenation of per-epoch permutations (epoch e shuffled by its own generator
    seeded with (seed, e)), cut into consecutive batches; a pure function of step, so resume needs no state.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_examples)
        order = np.random.default_rng([seed, epoch]).permutation(n_examples)
        out.extend(order[offset : offset + batch_size - len(out)].tolist())
    return np.asarray(out)


def chunks(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
