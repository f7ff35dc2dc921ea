"""A run directory: its files, written atomically, and the readers of its metrics log.

It holds
    config.json        the resolved configuration (written once; --resume refuses if it would change)
    metrics.jsonl      one line per step {step, seeds, projected_grads, losses, lr, seconds, train_seconds, rss_bytes},
                       per evaluation {step, valid_loss, valid_accuracy, valid_loss_se, n_valid, train_seconds} and
                       per rollback {step, rollback_to, rate_scale, reason, train_seconds}: the step and rollback
                       lines replay the run (edgezo.replay); train_seconds is cumulative wall-clock of training
                       steps (evaluations excluded)
    checkpoint-NNNNNN.gguf  the adapter after step NNNNNN: written first, then state.json points at it, then
                       the previous checkpoint is removed, so a kill at any instant leaves a consistent pair
    state.json         {step, checkpoint, sha256, and best / optimizer with their sha256}: the last consistent
                       checkpoint
    adapter.gguf       the adapter the run leaves (GGUF LoRA, loadable by llama.cpp --lora): with a validation split,
                       the best validated one, the start included (is_better), else the last
    adapter.best.gguf  the adapter at the best evaluation so far (with a validation split)
    adapter.last.gguf  the adapter after the last step, when adapter.gguf is the best instead
    checkpoint-NNNNNN.best.gguf  adapter.best.gguf as it was at the checkpoint (what a rollback after --resume restores)
Direction seeds and batch order are pure functions of (seed, step), so the checkpoint needs no RNG state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .adapter import LoraAdapter
from .files import EdgezoError, copy_atomic, sha256_file, write_json_atomic, write_npz_atomic, write_text_atomic

# What "better" is judged on (the sign that makes lower better): what the user reads, accuracy for classification
# and the reward where one is set, the validation loss breaking ties; the loss alone for language-model data.
BEST_BY = {"valid_loss": 1.0, "valid_accuracy": -1.0, "valid_reward": -1.0}
REGRESSION_STANDARD_ERRORS = 2.0  # a validation this many standard errors worse than the best is a regression

# config.json fields outside a run's identity: how long it runs and how it is watched, and where this machine keeps
# its base file. --resume may change them.
FREE_ON_RESUME = {"model_path", "threads", "eval_generation", "train.steps", "train.eval_every", "train.save_every",
                  "train.max_memory_bytes", "train.max_train_seconds", "train.patience", "train.final_adapter",
                  "train.best_by"}  # best_by follows from the task and the objective, which are kept
# Names that are paths on one machine: across machines the digest of the training tokens stands for them.
PER_MACHINE = {"model", "data"}
# Fields config.json gained later, so that older runs still resume: those whose value an older run implies (it had
# no choice), and those it did not record (compared only when the saved configuration has them).
ADDED_WITH_IMPLIED_VALUE = {"lora.layers": None, "mezo.estimator": "mezo", "train.freeze_lora_a": False,
                            "objective": "loss", "train.best_by": "valid_loss", "mezo.cone_angle": 1.35,
                            "mezo.cone_momentum": 0.99, "train.rollback": False, "mezo.auto_step": 0.1,
                            "mezo.auto_window": 50, "mezo.auto_clip": 3.0, "hidden_state_table": False}
ADDED_UNRECORDED = {"valid", "test", "mask_prompt"}


def flatten(config: dict, prefix: str = "") -> dict:
    """{"train": {"seed": 0}} -> {"train.seed": 0} (label_words stays one value)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and k != "label_words":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity(config: dict, across_machines: bool = False) -> dict:
    """The fields of a run's configuration that decide its adapter at every step, flattened: --resume must keep
    them, and the ranks of a distributed run share them (across_machines: less the paths of PER_MACHINE)."""
    drop = FREE_ON_RESUME | (PER_MACHINE if across_machines else set())
    return {k: v for k, v in flatten(config).items() if k not in drop}


def identity_changes(saved: dict, config: dict) -> list[str]:
    """What `config` changes of the saved run's identity, as 'field: old -> new' (empty: --resume may continue)."""
    new, old = ({**ADDED_WITH_IMPLIED_VALUE, **identity(c)} for c in (config, saved))
    changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(new) | set(old))
               if not (k in ADDED_UNRECORDED and k not in old) and new.get(k) != old.get(k)]
    schedule = config.get("mezo", {}).get("schedule", "constant")
    if schedule != "constant" and config.get("train", {}).get("steps") != saved.get("train", {}).get("steps"):
        changes.append("train.steps (the learning-rate schedule depends on it)")
    return changes


def is_better(event: dict, best: dict | None, key: str) -> bool:
    """Whether evaluation `event` beats `best` on `key`, a tie broken by the loss (the earlier one wins a full tie).
    A loss that falls while accuracy falls is not progress."""
    if best is None:
        return True
    if event[key] != best[key]:
        return BEST_BY[key] * event[key] < BEST_BY[key] * best[key]
    return event["valid_loss"] < best["valid_loss"]


def standard_error(event: dict, key: str) -> float:
    """The standard error of evaluation `event`'s `key`: of a proportion for accuracy and rewards (taken as scores
    in [0, 1]), the logged one of the mean loss."""
    if key == "valid_loss":
        return event.get("valid_loss_se", 0.0)
    p = min(1.0, max(0.0, event[key]))
    return math.sqrt(p * (1.0 - p) / max(event.get("n_valid", 1), 1))


def regression(event: dict, best: dict, key: str) -> str | None:
    """Why `event` is a regression from `best` (a non-finite loss, or worse on `key` by more than
    REGRESSION_STANDARD_ERRORS of best's standard error), or None."""
    if not math.isfinite(event["valid_loss"]):
        return f"validation loss {event['valid_loss']}"
    margin = REGRESSION_STANDARD_ERRORS * standard_error(best, key)
    if BEST_BY[key] * (event[key] - best[key]) > margin:
        return (f"{key} {event[key]:.4g} at step {event['step']} is worse than the best {best[key]:.4g} (step "
                f"{best['step']}) by more than {REGRESSION_STANDARD_ERRORS:g} standard errors ({margin:.2g})")
    return None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.state = self.path / "state.json"
        self.adapter = self.path / "adapter.gguf"
        self.best = self.path / "adapter.best.gguf"
        self.last = self.path / "adapter.last.gguf"

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgezoError(f"cannot create the run directory {self.path}: {exc.strerror or exc}") from None

    def save_checkpoint(self, adapter: LoraAdapter, step: int, optimizer: dict[str, np.ndarray] | None = None) -> None:
        """The adapter after `step` (and the optimizer's state, e.g. ConMeZO's momentum), then state.json names them."""
        path = self.path / f"checkpoint-{step:06d}.gguf"
        adapter.save(path)
        state = {"step": step, "checkpoint": path.name, "sha256": sha256_file(path)}
        keep = {path}
        if self.best.exists():  # a later rollback after --resume restores the best as it was at this checkpoint
            best = self.path / f"checkpoint-{step:06d}.best.gguf"
            copy_atomic(self.best, best)
            state.update(best=best.name, best_sha256=sha256_file(best))
            keep.add(best)
        if optimizer is not None:
            extra = self.path / f"checkpoint-{step:06d}.optimizer.npz"
            write_npz_atomic(extra, optimizer)
            state.update(optimizer=extra.name, optimizer_sha256=sha256_file(extra))
            keep.add(extra)
        write_json_atomic(self.state, state)
        # Only now is the previous checkpoint no longer needed; also drop temp files of a write a kill cut short.
        for old in [*self.path.glob("checkpoint-*"), *self.path.glob(".checkpoint-*.tmp")]:
            if old not in keep:
                old.unlink(missing_ok=True)

    def load_optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer state saved with the last checkpoint (its sha256 checked)."""
        state = self._state()
        if "optimizer" not in state:
            raise EdgezoError(f"{self.state}: the checkpoint has no optimizer state (a run of another estimator?)")
        path = self.path / state["optimizer"]
        if not path.exists() or sha256_file(path) != state["optimizer_sha256"]:
            raise EdgezoError(f"{path}: missing or changed since it was written (sha256 differs); cannot resume exactly")
        with np.load(path) as arrays:
            return {name: arrays[name] for name in arrays.files}

    def _state(self) -> dict:
        """state.json's fields, checked: step, checkpoint, sha256, and optimizer / optimizer_sha256 if it has them."""
        try:
            state = json.loads(self.state.read_text())
            checked = {"step": int(state["step"]), "checkpoint": str(state["checkpoint"]), "sha256": str(state["sha256"])}
            for extra in ("optimizer", "best"):
                if extra in state:
                    checked.update({extra: str(state[extra]), f"{extra}_sha256": str(state[f"{extra}_sha256"])})
            return checked
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EdgezoError(f"{self.state}: corrupted or missing checkpoint state ({exc})") from None

    @property
    def checkpoint(self) -> Path:
        """The checkpoint state.json points at (state.json itself if there is none yet, for messages)."""
        try:
            return self.path / self._state()["checkpoint"]
        except EdgezoError:
            return self.state

    def load_checkpoint(self, base_info) -> tuple[LoraAdapter, int]:
        state = self._state()
        path = self.path / state["checkpoint"]
        if not path.exists() or sha256_file(path) != state["sha256"]:
            raise EdgezoError(f"{path}: checkpoint missing or does not match {self.state.name} (corrupted)")
        if "best" in state:  # adapter.best.gguf may hold a later best, from steps after the checkpoint
            best = self.path / state["best"]
            if not best.exists() or sha256_file(best) != state["best_sha256"]:
                raise EdgezoError(f"{best}: missing or does not match {self.state.name} (corrupted)")
            copy_atomic(best, self.best)
        return LoraAdapter.load(path, base_info), state["step"]

    def best_eval(self, up_to_step: int, key: str = "valid_loss") -> dict | None:
        """The logged evaluation best on `key` (see BEST_BY) at or before `up_to_step` (the first on a tie), if
        adapter.best.gguf holds it; None for a new run or one from before best adapters were kept."""
        if not self.best.exists():
            return None
        best = None
        for event in self.events():
            if key in event and event["step"] <= up_to_step and is_better(event, best, key):
                best = event
        return best

    def train_seconds_at(self, step: int) -> float:
        """Cumulative training seconds logged up to `step` (0.0 for a new run), so a resumed run's clock continues."""
        return max((e.get("train_seconds", 0.0) for e in self.events() if e["step"] <= step), default=0.0)

    def events(self) -> list[dict]:
        """metrics.jsonl, one dict per step and per evaluation ([] before the first); a line that is not JSON is an
        error naming it."""
        return [event for _, event in self._lines()]

    def _lines(self, torn_tail_ok: bool = False) -> list[tuple[str, dict]]:
        """(line, event) pairs; with torn_tail_ok a last line that is not JSON (an append a kill cut short) is left
        out instead of being an error."""
        if not self.metrics.exists():
            return []
        lines = self.metrics.read_text().splitlines()
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        pairs = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                pairs.append((line, json.loads(line)))
            except ValueError:
                if torn_tail_ok and i == last:
                    break
                raise EdgezoError(f"{self.metrics}:{i + 1}: not JSON") from None
        return pairs

    def truncate_metrics(self, after_step: int) -> None:
        """Drop log lines of steps after the checkpoint (they will be recomputed identically), and a last line a kill
        cut short."""
        keep = [line for line, event in self._lines(torn_tail_ok=True) if event["step"] <= after_step]
        if self.metrics.exists():
            write_text_atomic(self.metrics, "".join(line + "\n" for line in keep))
