"""What several test modules use: CLI runners and argument lists, small data writers, a character tokenizer, and the
torch reference's adapter and batch (torch-free, so core-only tests can import this module)."""
import json
import sys
from pathlib import Path

import numpy as np

from edgezo.adapter import LoraAdapter, LoraConfig, read_base_model_info
from edgezo.cli import main
from edgezo.data import Example, Format, Task


def run_json(capsys, argv) -> dict:
    code = main(argv)
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert code == 0, captured.err[-2000:]
    return json.loads(out[-1])  # the last stdout line is one JSON object


def finetune_args(model, data, out, steps, *extra):
    return ["finetune", "--model", str(model), "--quant", "f32", "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--batch-size", "4", "--threads", "1", "--eval-every", "3", "--save-every", "2",
            "--template", "{text}\nLabel:", "--learning-rate", "0.01", "--json", *extra]


# `python -m edgezo.cli ARGV` that SIGKILLs itself as its KILL_AT-th training step begins (counted in this process;
# the trainer draws each step's batch first): a crash at a chosen step, with no poll loop racing a fast machine.
_DYING_CLI = """
import os, signal, sys
from edgezo import trainer
from edgezo.cli import main

kill_at, batch_indices, started = int(sys.argv[1]), trainer.batch_indices, []

def dying_batch_indices(*args, **kwargs):
    started.append(None)
    if len(started) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return batch_indices(*args, **kwargs)

trainer.batch_indices = dying_batch_indices
sys.exit(main(sys.argv[2:]))
"""


def dying_cli(kill_at_step: int, argv) -> list[str]:
    return [sys.executable, "-c", _DYING_CLI, str(kill_at_step), *map(str, argv)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class CharTokenizer:
    """One token per character (ord), ' good'/' bad' as single words: enough to test the data logic exactly."""

    words = {" good": [1000], " bad": [1001], " so so": [1002, 1003]}

    def tokenize(self, text, add_special):
        if text in self.words:
            return list(self.words[text])
        return ([1] if add_special else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt):
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


# ---- the torch reference's tests (tests/test_reference.py, tests/test_quant_torch.py) ----
LORA = LoraConfig(rank=4, alpha=8, targets=("attn_q", "attn_k", "attn_v", "ffn_down"))


def trained_adapter(tiny_gguf, seed=0) -> LoraAdapter:
    """An adapter with non-zero B, so the LoRA path changes the logits (a fresh adapter has B = 0)."""
    adapter = LoraAdapter.init(read_base_model_info(tiny_gguf), LORA, seed=seed)
    rng = np.random.default_rng(seed)
    for name, t in adapter.tensors.items():
        if name.endswith("lora_b"):
            t[...] = rng.normal(0, 0.1, t.shape)
    return adapter


def classification_batch(vocab) -> tuple[list[Example], Task]:
    good, bad = (vocab.tokenize(w, add_special=False)[0] for w in (" good", " bad"))
    task = Task(format=Format.CLASSIFICATION, labels=("bad", "good"), label_token_ids=(bad, good))
    texts = ["a fine movie\nLabel:", "an awful, dull and boring movie of some length\nLabel:", "weak\nLabel:"]
    batch = [Example(tuple(vocab.tokenize(t, add_special=True)), 0, label=i % 2) for i, t in enumerate(texts)]
    return [Example(ex.tokens, len(ex.tokens), ex.label) for ex in batch], task


def reference_args(tiny_gguf, sentiment_dir, out, *extra):
    return ["--model", str(tiny_gguf), "--quant", "none", "--data", str(sentiment_dir), "--steps", "4",
            "--batch-size", "4", "--eval-every", "2", "--targets", "attn_q,attn_v", "--rank", "4",
            "--out", str(out), "--json", *extra]
