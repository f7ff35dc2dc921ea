"""Run configuration files: `edgezo finetune -c run.yaml`.

A file is a mapping whose keys are long flag names (`learning_rate` or `learning-rate` for --learning-rate,
mlx-lm's `iters` for --iters = --steps). JSON is always read; YAML (.yaml / .yml) needs PyYAML (the `yaml` extra).
A run's resolved config.json is valid input too: its sections (`lora`, `mezo`, `train`, the references'
`schedule` and `reference`) are lifted to the top level and the fields it only records are skipped, so
`edgezo finetune -c runs/a/config.json --out runs/b` repeats run a.

This module only turns a file into {flag name: value}; the CLI turns those into flags placed before the user's own,
so flags on the command line override the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .files import EdgezoError

# config.json sections whose fields are flags of their own (lora.rank -> --rank, mezo.eps -> --eps, ...)
SECTIONS = ("lora", "mezo", "train", "schedule", "reference")
# config.json fields that describe the run but are not flags (derived, or written for the record)
RECORDED_ONLY = {"model_path", "task", "distributed", "method"}


def read_config_file(path: str | os.PathLike) -> dict:
    """The file's mapping, as written. An error names the file and what is wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise EdgezoError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise EdgezoError(f"{path}: reading YAML needs PyYAML: pip install 'edgezo[yaml]' "
                              f"(or write the file as JSON)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise EdgezoError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise EdgezoError(f"{path}: not valid JSON ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EdgezoError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def flag_name(key: str) -> str:
    """learning_rate / learning-rate -> learning-rate."""
    return key.replace("_", "-")


def flatten_config(data: dict) -> dict:
    """Key as written -> value: config.json's sections lifted, recorded-only fields dropped, values that the flags
    spell differently translated (targets list, label_words mapping, max_memory_bytes). Keys stay as the user wrote
    them, for error messages; flag_name(key) is the flag."""
    flat: dict = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(flatten_config(value))
        elif key not in RECORDED_ONLY:
            flat[key] = value
    for key in [k for k in flat if flag_name(k) == "max-memory-bytes"]:  # train.max_memory_bytes: 0 = no budget
        budget = flat.pop(key)
        if budget:
            flat.setdefault("max_memory", str(budget))
    for key, value in flat.items():
        if flag_name(key) == "label-words" and isinstance(value, dict):  # {"positive": " positive"}
            flat[key] = ",".join(f"{label}={word}" for label, word in value.items())
        elif flag_name(key) == "targets" and isinstance(value, (list, tuple)):
            flat[key] = ",".join(map(str, value))
    return flat
