"""What the command line shows: messages on stderr, the JSON result on stdout, progress lines."""

from __future__ import annotations

import json
import logging
import sys

from ..trainer import TrainingEvents


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit_json(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


class SayHandler(logging.Handler):
    """Library log records to stderr through `say` (which finds sys.stderr at each call)."""

    def emit(self, record: logging.LogRecord) -> None:
        say(f"edgezo: {record.getMessage()}")


class ConsoleProgress(TrainingEvents):
    """tqdm bar over training steps (loss, rate, valid accuracy, rollbacks, s/step, RSS); evaluation on its own bar."""

    def __init__(self, desc: str = "finetune"):
        self.desc, self.bar, self.eval_bar, self.postfix = desc, None, None, {}
        self.preparation = _Bar("hidden states")

    def preparing(self, done: int, total: int) -> None:
        self.preparation.update(done, total)
        if done == total:
            self.preparation.close()

    def start(self, step: int, total_steps: int) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total_steps, initial=step, desc=self.desc, unit="step", file=sys.stderr,
                        dynamic_ncols=True)

    def step(self, fields: dict) -> None:
        self.postfix.update(loss=f"{fields['loss']:.4f}", lr=f"{fields['lr']:.2g}", s_step=f"{fields['seconds']:.2f}",
                            rss=f"{fields['rss_bytes'] / 2**20:.0f}MiB")
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(1)

    def eval_start(self, step: int, n_examples: int) -> None:
        self.eval_bar = self._tqdm(total=n_examples, desc=f"  validate @{step}", unit="ex", file=sys.stderr,
                                   leave=False, dynamic_ncols=True)

    def eval_batch(self, n_examples: int) -> None:
        if self.eval_bar is not None:
            self.eval_bar.update(n_examples)

    def evaluated(self, fields: dict) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()
        self.postfix["val_acc"] = f"{fields['valid_accuracy']:.3f}"
        self.bar.set_postfix(self.postfix)
        generated = "".join(f", {key.removeprefix('valid_')} {fields[key]:.4f}"
                            for key in ("valid_exact_match", "valid_reward") if key in fields)
        self.bar.write(f"step {fields['step']}: valid loss {fields['valid_loss']:.4f}, "
                       f"accuracy {fields['valid_accuracy']:.4f}{generated} ({fields['n_valid']} examples)",
                       file=sys.stderr)

    def rolled_back(self, fields: dict) -> None:
        self.postfix["rollbacks"] = self.postfix.get("rollbacks", 0) + 1
        self.bar.set_postfix(self.postfix)
        self.bar.write(f"step {fields['step']}: rolled back to the adapter of step {fields['rollback_to']}, rate x"
                       f"{fields['rate_scale']:g} ({fields['reason']})", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Bar:
    """A tqdm bar on stderr, made at the first callback (when the total is known), closed on exit."""

    unit = "ex"

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def update(self, done: int, total: int):
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TensorProgress(_Bar):
    """A tqdm bar for the converters' progress(done, total, ...) callbacks."""

    unit = "tensor"

    def __call__(self, done: int, total: int, *rest) -> None:
        self.update(done, total)


class ChildProgress(_Bar):
    """A tqdm bar over child processes (edgezo bench): on_child(label, done, total) names the one starting."""

    unit = "run"

    def __call__(self, label: str, done: int, total: int) -> None:
        self.update(done, total)
        self.bar.set_postfix_str(label)
