"""The PyTorch reference: the same LoRA, data, prompts, loss and initial adapter as `edgezo finetune`, trained in torch.

Two methods, both on the weights llama.cpp runs (the run's GGUF dequantized to float and converted GGUF -> HF by
convert/gguf_to_hf.py), both starting from edgezo's own initial adapter (LoraAdapter.init, same seed) loaded into PEFT:
    bp    backpropagation with AdamW (optionally gradient checkpointing, float32 or bfloat16 base weights), or with
          base_dtype q8_0 / q4_0 on a quantized base as QLoRA and MeBP do: the linear layers keep the GGUF's own blocks
          and dequantize them on use, forward and backward (edgezo.quant_torch); the file must be of that type
    mezo  the MeZO baseline as Malladi et al. wrote it for torch: perturb the LoRA parameters in place with
          z ~ N(0, I) from a seeded generator, +eps, -2 eps, +eps, then step along z; float32
Token ids come from llama.cpp's tokenizer (edgezo.engine.Vocabulary) and the loss mirrors edgezo.objective.score,
so a reference run and a MeZO run differ only in the optimizer and the runtime. The run directory has the MeZO
trainer's layout (config.json, metrics.jsonl, adapter.gguf) plus peft/, the adapter as PEFT wrote it.

torch, transformers and peft come from the `torch` extra and are imported here only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import store
from .adapter import BaseModelInfo, LoraAdapter
from .data import Example, Task
from .files import EdgezoError, map_large_allocations, sha256_file
from .formats import QUANTIZED_BASES, check_base_file
from .mezo import MezoConfig, NonFiniteLoss, check_finite, direction_seed, learning_rate_at
from .objective import Totals, evaluate
from .rundir import RunDir
from .trainer import StepFailed, TrainConfig, TrainingEvents, TrainResult, train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = ("bp", "mezo")
OPTIMIZERS = ("adamw", "sgd")  # bp: sgd is plain SGD (no momentum), the update MeZO's estimate feeds
BASE_DTYPES = ("float", *QUANTIZED_BASES)  # float: the GGUF dequantized once; q8_0 / q4_0: its blocks, dequantized on use


@dataclass(frozen=True)
class ReferenceConfig:
    method: str = "bp"  # "bp": AdamW (or SGD) on the LoRA tensors; "mezo": MeZO on the same tensors, in place
    optimizer: str = "adamw"  # bp: "sgd" steps lr * gradient, as MeZO steps lr * its estimate
    dtype: str = "float32"  # base weights (the LoRA tensors stay float32, as PEFT keeps them)
    gradient_checkpointing: bool = False  # bp: recompute each layer's activations in backward instead of storing them
    base_dtype: str = "float"  # bp: "q8_0" / "q4_0" keeps the linear layers in the GGUF's blocks (QLoRA-style)
    # Freed tensors go back to the kernel at once (edgezo.files.map_large_allocations): a lower peak RSS that the
    # accountant predicts without its heap-retention term, for slower steps (every large tensor is mapped afresh).
    release_freed_memory: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise EdgezoError(f"unknown reference method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.dtype not in DTYPES:
            raise EdgezoError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise EdgezoError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.method == "mezo" and self.optimizer != "adamw":
            raise EdgezoError("--optimizer is for reference-bp; the torch MeZO baseline steps along its estimate")
        if self.base_dtype not in BASE_DTYPES:
            raise EdgezoError(f"--base-dtype must be one of {', '.join(BASE_DTYPES)}, got {self.base_dtype!r}")
        if self.method == "mezo" and (self.dtype != "float32" or self.gradient_checkpointing or self.quantized_base):
            raise EdgezoError("the torch MeZO baseline runs in float32 on a float base without gradient checkpointing")
        if self.quantized_base and self.dtype != "float32":
            raise EdgezoError(f"--base-dtype {self.base_dtype} dequantizes to float32; --dtype {self.dtype} is for "
                              f"the float base")

    @property
    def quantized_base(self) -> bool:
        return self.base_dtype != "float"


# ---- model ---------------------------------------------------------------------------------------------------
def hf_model_dir(gguf_path: Path, log: Callable[[str], None] = lambda msg: None) -> Path:
    """The GGUF as a transformers directory, converted once and cached by content hash in $EDGEZO_HOME/hf/."""
    from edgezo.convert.gguf_to_hf import convert_gguf_to_hf

    target = store.home() / "hf" / sha256_file(gguf_path)[:16]
    if (target / "config.json").exists():
        return target
    log(f"converting {gguf_path.name} to a transformers model (once; cached in {target}) ...")
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    convert_gguf_to_hf(gguf_path, scratch)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)  # a directory appears whole or not at all
    return target


def load_model(gguf_path: Path, adapter: LoraAdapter, base: BaseModelInfo, config: ReferenceConfig,
               log: Callable[[str], None] = lambda msg: None):
    """transformers model of the GGUF's weights with `adapter` attached through PEFT (its tensors trainable for bp).

    With a quantized base_dtype every linear layer is an edgezo.quant_torch.QuantLinear on the GGUF's blocks (PEFT
    wraps it like any nn.Linear); embeddings and norms are float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgezo.convert.peft import adapter_to_peft

    if config.quantized_base:
        from .quant_torch import causal_lm_from_gguf

        check_base_file(gguf_path, config.base_dtype)
        model = causal_lm_from_gguf(gguf_path, log)
    else:
        model = AutoModelForCausalLM.from_pretrained(hf_model_dir(gguf_path, log), dtype=DTYPES[config.dtype],
                                                     attn_implementation="sdpa")
    model.config.use_cache = False  # training: no KV cache
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with tempfile.TemporaryDirectory() as tmp:
        adapter_to_peft(adapter, tmp, base)
        model = PeftModel.from_pretrained(model, tmp, is_trainable=config.method == "bp")
    model.train()  # checkpointing acts only in training mode; LoRA dropout is 0 and attention dropout 0, so no noise
    return model


class TorchScorer:
    """edgezo.objective's Scorer protocol on a transformers model, so evaluation is objective.evaluate itself."""

    def __init__(self, model):
        self.causal_lm = model.get_base_model()
        self.softcap = getattr(self.causal_lm.config, "final_logit_softcapping", None)

    def logits_tensor(self, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                      columns: Sequence[int] | None = None) -> torch.Tensor:
        """Logits at `positions[i]` of sequence i, stacked: [sum(len(p)), n_vocab or len(columns)], differentiable.

        Sequences are right-padded to the longest, without an attention mask: attention is causal, so a real token
        never sees the padding after it (and the pad positions' outputs are never read). Only the rows asked for
        go through lm_head, and only the `columns` of it, as llama.cpp computes only flagged outputs.
        """
        longest = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), longest), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s)
        hidden = self.causal_lm.model(input_ids=ids).last_hidden_state
        rows = torch.tensor([i for i, p in enumerate(positions) for _ in p])
        cols = torch.tensor([q for p in positions for q in p])
        head, hidden = self.causal_lm.lm_head, hidden[rows, cols]
        if getattr(head, "weight", None) is None:  # an untied output layer in GGUF blocks (edgezo.quant_torch)
            logits = head(hidden) if columns is None else F.linear(hidden, head.dequantize_rows(list(columns)))
        else:
            logits = F.linear(hidden, head.weight if columns is None else head.weight[list(columns)])
        logits = logits.float()
        if self.softcap:  # Gemma's final logit soft-capping, as its forward() does
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, sequences, positions, columns=None, copy: bool = True) -> np.ndarray:
        """A fresh array either way (`copy` is the Scorer protocol's; nothing here is reused between calls)."""
        with torch.no_grad():
            return self.logits_tensor(sequences, positions, columns).numpy()


def batch_loss(scorer: TorchScorer, batch: Sequence[Example], task: Task) -> torch.Tensor:
    """Mean cross-entropy of the batch, exactly the quantity edgezo.objective.score reports as loss."""
    sequences = [ex.tokens for ex in batch]
    if task.is_classification:
        logits = scorer.logits_tensor(sequences, [[len(ex.tokens) - 1] for ex in batch], task.label_token_ids)
        return F.cross_entropy(logits, torch.tensor([ex.label for ex in batch]))
    positions = [[i - 1 for i in ex.target_indices] for ex in batch]
    targets = torch.tensor([ex.tokens[i] for ex in batch for i in ex.target_indices])
    return F.cross_entropy(scorer.logits_tensor(sequences, positions), targets)


def lora_parameters(model) -> list[torch.Tensor]:
    """The LoRA tensors in a fixed order (the names sort the same in every process)."""
    return [p for name, p in sorted(model.named_parameters()) if "lora_" in name]


# ---- steppers (edgezo.trainer) ---------------------------------------------------------------------------------
class TorchStepper:
    """A torch method on the PEFT model: the adapter is the model's LoRA tensors, saved through PEFT. The torch
    MeZO baseline does not resume (a stop keeps the adapter so far); BP does (BackpropStepper)."""

    resumable = False

    def __init__(self, model, scorer: TorchScorer, task: Task, base: BaseModelInfo, schedule: MezoConfig,
                 total_steps: int):
        self.model, self.scorer, self.task, self.base = model, scorer, task, base
        self.schedule, self.total_steps = schedule, total_steps

    def save(self, path: Path) -> None:
        """The adapter as PEFT writes it (peft/ beside `path`) and as GGUF LoRA at `path`."""
        save_adapter(self.model, self.base, Path(path).parent / "peft", path)

    def checkpoint(self, run: RunDir, step: int) -> None:
        pass


class BackpropStepper(TorchStepper):
    """One AdamW (or plain SGD) step on the LoRA tensors (the gradient of the batch loss by autograd)."""

    def __init__(self, *args, optimizer: str = "adamw"):
        super().__init__(*args)
        kind = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
        self.optimizer = kind(lora_parameters(self.model), lr=1.0, weight_decay=self.schedule.weight_decay)

    resumable = True

    def checkpoint(self, run: RunDir, step: int) -> None:
        """The adapter as GGUF LoRA, and beside it the exact float32 LoRA tensors and the optimizer's state
        (AdamW's step count and two moments per tensor): what --resume needs to continue bit for bit."""
        from edgezo.convert.peft import peft_to_adapter

        params = lora_parameters(self.model)
        arrays = {f"param.{i}": p.detach().numpy().copy() for i, p in enumerate(params)}
        for i, p in enumerate(params):
            for key, value in self.optimizer.state.get(p, {}).items():  # SGD without momentum keeps nothing
                arrays[f"{key}.{i}"] = value.detach().numpy().copy()
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            run.save_checkpoint(peft_to_adapter(tmp, self.base), step, optimizer=arrays)

    @torch.no_grad()
    def resume(self, run: RunDir) -> None:
        """The LoRA tensors and optimizer state of the run's last checkpoint (written by checkpoint())."""
        arrays = run.load_optimizer_state()
        params = lora_parameters(self.model)
        if sorted(k for k in arrays if k.startswith("param.")) != sorted(f"param.{i}" for i in range(len(params))):
            raise EdgezoError(f"{run.state}: the checkpoint's LoRA tensors do not match this model's")
        for i, p in enumerate(params):
            if arrays[f"param.{i}"].shape != tuple(p.shape):
                raise EdgezoError(f"{run.state}: LoRA tensor {i} is {arrays[f'param.{i}'].shape}, the model's "
                                  f"{tuple(p.shape)}")
            p.copy_(torch.from_numpy(arrays[f"param.{i}"]))
            state = {key.rsplit(".", 1)[0]: torch.from_numpy(value.copy()) for key, value in arrays.items()
                     if not key.startswith("param.") and key.rsplit(".", 1)[1] == str(i)}
            if state:
                self.optimizer.state[p] = state

    def step(self, batch, step: int) -> dict:
        lr = learning_rate_at(self.schedule, step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = batch_loss(self.scorer, batch, self.task)
        if not torch.isfinite(loss):
            raise StepFailed(f"step {step + 1}: loss is not finite ({loss.item()})")
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "lr": lr}


class TorchMezoStepper(TorchStepper):
    """MeZO as in Malladi et al.'s reference code: z from a generator seeded per step, applied in place."""

    def __init__(self, *args, run_seed: int):
        super().__init__(*args)
        self.params, self.run_seed = lora_parameters(self.model), run_seed

    def _add_z(self, seed: int, scale: float) -> None:
        generator = torch.Generator().manual_seed(seed)
        for p in self.params:
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype), alpha=scale)

    @torch.no_grad()
    def step(self, batch, step: int) -> dict:
        lr, eps = learning_rate_at(self.schedule, step, self.total_steps), self.schedule.eps
        seed = direction_seed(self.run_seed, step, 0)
        self._add_z(seed, eps)
        loss_plus = batch_loss(self.scorer, batch, self.task).item()
        self._add_z(seed, -2 * eps)
        loss_minus = batch_loss(self.scorer, batch, self.task).item()
        self._add_z(seed, eps)  # restore (to rounding, as in the reference code)
        try:
            check_finite(step, **{"L+": loss_plus, "L-": loss_minus})
        except NonFiniteLoss as exc:
            raise StepFailed(str(exc)) from None
        grad = (loss_plus - loss_minus) / (2 * eps)
        if self.schedule.weight_decay:
            for p in self.params:
                p.mul_(1 - lr * self.schedule.weight_decay)
        self._add_z(seed, -lr * grad)
        return {"loss": (loss_plus + loss_minus) / 2, "seeds": [seed], "projected_grads": [grad], "lr": lr}


# ---- a reference run -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceRun:
    """What a reference run trains on: the model, its adapter and data, and the schedule shared with MeZO."""

    gguf_path: Path
    base: BaseModelInfo
    adapter: LoraAdapter  # the initial adapter
    task: Task
    train_set: Sequence[Example]
    valid_set: Sequence[Example]
    schedule: MezoConfig  # learning rate, schedule, warmup, weight decay (and eps for mezo)


def train_reference(run_spec: ReferenceRun, config: ReferenceConfig, train_cfg: TrainConfig, run: RunDir,
                    events: TrainingEvents | None = None, log: Callable[[str], None] = lambda msg: None,
                    start_step: int = 0) -> TrainResult:
    """Train with edgezo.trainer.train (same batches, validation points, metrics lines as MeZO), in torch; from the
    run's last checkpoint (`start_step`, BP only) when resuming."""
    if not run_spec.train_set:
        raise EdgezoError("the training split is empty")
    if config.release_freed_memory and not map_large_allocations():  # before the model exists
        log("--release-freed-memory: the C library's allocator keeps its own rule here (not glibc, or "
            "MALLOC_MMAP_THRESHOLD_ / GLIBC_TUNABLES set)")
    model = load_model(run_spec.gguf_path, run_spec.adapter, run_spec.base, config, log)
    scorer = TorchScorer(model)
    parts = (model, scorer, run_spec.task, run_spec.base, run_spec.schedule, train_cfg.steps)
    stepper = (BackpropStepper(*parts, optimizer=config.optimizer) if config.method == "bp"
               else TorchMezoStepper(*parts, run_seed=train_cfg.seed))

    if start_step:
        if not stepper.resumable:
            raise EdgezoError(f"reference-{config.method} runs do not resume")
        stepper.resume(run)

    def validate(examples, on_batch) -> Totals:
        return evaluate(scorer, examples, run_spec.task, train_cfg.batch_size, on_batch=on_batch)

    return train(stepper, validate, run_spec.train_set, run_spec.valid_set, train_cfg, run, start_step=start_step,
                 events=events)


def save_adapter(model, base: BaseModelInfo, peft_dir: Path, gguf_path: Path) -> None:
    """The adapter as PEFT writes it (`peft_dir`) and as GGUF LoRA (`gguf_path`) for llama.cpp and edgezo eval."""
    from edgezo.convert.peft import peft_to_adapter

    model.save_pretrained(peft_dir)
    peft_to_adapter(peft_dir, base).save(gguf_path)
