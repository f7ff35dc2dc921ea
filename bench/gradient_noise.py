"""What limits MeZO here: the signal-to-noise of the LoRA gradient, by target and block range, from per-example
gradients (torch; needs the torch extra).

    python -m bench.gradient_noise                    # every LoRA target of SmolLM2-135M, 512 training reviews
    python -m bench.gradient_noise --task intents --work runs/intents   # bench/intents_data.py's requests

One process computes the gradient g_i of each of n training examples (batch of 1, the reference's float model and
loss) with respect to the LoRA B tensors of every target; A's gradient is exactly 0 at init, where B = 0. From them,
for any set of parameters (a target, a block range, the default k,v):

- |G|^2, the squared norm of the mean gradient (unbiased: |mean g|^2 - tr(Sigma)/n);
- T = E|g_i|^2, the trace of the empirical Fisher, the curvature proxy of a cross-entropy;
- rho = |G|^2 / T, the share of one example's gradient energy that is signal;
- the noise scale B_noise = tr(Sigma) / |G|^2 (McCandlish et al. 2018): a batch of B has E|g_B|^2 = |G|^2 (1 + B_noise/B).

A two-sided MeZO step moves lr (z . g_B) z. On a quadratic model its expected loss change is
-lr |G|^2 + lr^2/2 tr(H) E|g_B|^2 (the tr(H) term dominates for a high effective rank), so at the best rate it gains
|G|^4 / (2 tr(H) E|g_B|^2), which with tr(H) ~ T is rho / (2 (1 + B_noise/B)) nats: a set of parameters trains
fast only if its examples agree (a small B_noise), whatever its size. The table reports that
progress per step relative to the default (k,v on every block), from all examples and from each half of them (how
stable the estimate is), the best rate it implies, also relative to the default's, and the expected gain per step
at fixed rates, to hold against the first steps of a real run (bench/estimators.py). These are the model's
predictions, not training measurements: the best rates it implies are far larger than those that train stably, so
read the progress column as a ranking, and distrust it where the implied rate is many times the default's.

The curvature probe checks tr(H) ~ T where it matters, on MeZO's own directions: the mean over Gaussian z of
(L(B + eps z) + L(B - eps z) - 2 L(B)) / eps^2 is tr(H) of the batch loss in the default targets' B.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from dataclasses import dataclass

import numpy as np

from bench import common
from bench.estimators import TASKS

from edgezo.adapter import DEFAULT_TARGETS, KNOWN_TARGETS as TARGETS  # noqa: E402
from edgezo.convert.peft import GGUF_TO_HF, HF_TO_GGUF  # noqa: E402  (the reference model's module names)

NAME, TITLE = "gradient_noise", "What limits MeZO here: gradient signal-to-noise by LoRA target and block range"
BATCH = 16  # the batch the progress column assumes (finetune's default)
RATES = (1e-3, 4e-3)  # the predicted gain per step at these rates, to hold against a training run's first steps
RANGE_BLOCKS = 6  # block ranges of the second table
# the curvature probe's step: (L+ + L- - 2 L0) must stand well above float32 rounding (~1e-7) and the cubic term
# small; at 3e-2 eps^2 z'Hz is about 1e-2 nats here
CURVATURE_EPS = 3e-2


@dataclass(frozen=True)
class Noise:
    """Gradient statistics of one set of parameters over n examples."""
    n_params: int
    signal: float  # |G|^2, unbiased
    energy: float  # T = E|g_i|^2
    spread: float  # tr(Sigma)

    @property
    def rho(self) -> float:
        return self.signal / self.energy

    @property
    def noise_scale(self) -> float:
        return self.spread / self.signal if self.signal > 0 else float("inf")

    def progress(self, batch: int = BATCH) -> float:
        """Loss decrease per MeZO step at the best rate on the quadratic model with tr(H) ~ T, times 2:
        |G|^4 / (T E|g_B|^2) = rho / (1 + B_noise/B)."""
        return max(self.rho, 0.0) / (1 + self.noise_scale / batch)

    def gain(self, rate: float, batch: int = BATCH) -> float:
        """Expected loss decrease of one MeZO step at `rate` on the same model."""
        return rate * self.signal - rate ** 2 / 2 * self.energy * (self.signal + self.spread / batch)

    def best_rate(self, batch: int = BATCH) -> float:
        """The rate that gains progress(): |G|^2 / (T E|g_B|^2)."""
        return self.progress(batch) / self.signal if self.signal > 0 else 0.0


def noise_of(grads: np.ndarray) -> Noise:
    """Statistics of the rows of `grads` (one example's gradient per row)."""
    n = grads.shape[0]
    if n < 2:
        raise ValueError("at least two examples are needed")
    mean = grads.mean(axis=0, dtype=np.float64)
    spread = float(((grads - mean) ** 2).sum() / (n - 1))
    return Noise(n_params=grads.shape[1], signal=float(mean @ mean - spread / n),
                 energy=float((grads.astype(np.float64) ** 2).sum() / n), spread=spread)


@dataclass
class Setup:
    """The reference model with LoRA on every target at its init, the loss, and the shuffled training examples."""
    model: object
    scorer: object
    task: object
    examples: list

    def lora_b(self) -> list[tuple[str, object]]:
        return [(name, p) for name, p in sorted(self.model.named_parameters()) if "lora_B" in name]

    def loss(self, batch) -> float:
        import torch

        from edgezo import reference

        with torch.no_grad():
            return float(reference.batch_loss(self.scorer, batch, self.task).double())


def load(model_name: str, data_flags: list[str], seed: int, threads: int) -> Setup:
    import torch

    from edgezo import reference
    from edgezo.adapter import LoraAdapter, read_base_model_info
    from edgezo.cli.parser import build_parser
    from edgezo.engine import Vocabulary
    from edgezo.resolve import load_task_and_splits, lora_from_args, resolve_base

    if threads:
        torch.set_num_threads(threads)
    # the options of `edgezo reference-bp`, so model, data and LoRA resolve exactly as a training run's
    args = build_parser().parse_args(["reference-bp", "--model", model_name, "--quant", "q4_0", *data_flags,
                                      "--targets", ",".join(TARGETS), "--seed", str(seed), "--out", "unused"])
    path = resolve_base(args)
    base = read_base_model_info(path)
    with Vocabulary(path) as vocab:
        task, examples, _ = load_task_and_splits(vocab, args.data, args, ["train"])
    model = reference.load_model(path, LoraAdapter.init(base, lora_from_args(args), seed=seed), base,
                                 reference.ReferenceConfig())
    chosen = list(examples["train"])
    random.Random(seed).shuffle(chosen)
    return Setup(model, reference.TorchScorer(model), task, chosen)


def per_example_gradients(setup: Setup, n: int) -> tuple[np.ndarray, dict]:
    """[n, d] gradients of the LoRA B tensors (every target) and {(target, block): columns}."""
    import torch

    from edgezo import reference

    tensors = setup.lora_b()
    grads = np.zeros((n, sum(p.numel() for _, p in tensors)), np.float32)
    for i, example in enumerate(setup.examples[:n]):
        setup.model.zero_grad()
        reference.batch_loss(setup.scorer, [example], setup.task).backward()
        grads[i] = torch.cat([p.grad.flatten() for _, p in tensors]).numpy()
    columns, offset = {}, 0
    for name, p in tensors:
        block = int(re.search(r"layers\.(\d+)\.", name).group(1))
        target = HF_TO_GGUF[re.search(r"\.(\w+_proj)\.", name).group(1)][1]
        columns[(target, block)] = np.arange(offset, offset + p.numel())
        offset += p.numel()
    return grads, columns


def curvature_along_directions(setup: Setup, batches: int, directions: int, eps: float, seed: int) -> list[float]:
    """z'Hz = (L(B + eps z) + L(B - eps z) - 2 L(B)) / eps^2 for Gaussian z over the default targets' B, per batch
    of BATCH examples (float32 torch, no quantization jitter): its mean is tr(H), the curvature MeZO's step meets."""
    import torch

    tensors = [p for name, p in setup.lora_b() if any(f".{GGUF_TO_HF[t]}." in name for t in DEFAULT_TARGETS)]
    centre = [p.detach().clone() for p in tensors]
    generator = torch.Generator().manual_seed(seed)

    def place(zs=None, scale: float = 0.0) -> None:
        """The B tensors at centre + scale * zs (at the centre without zs)."""
        with torch.no_grad():
            for i, (p, c) in enumerate(zip(tensors, centre, strict=True)):
                p.copy_(c if zs is None else c + scale * zs[i])

    values = []
    for b in range(batches):
        batch = setup.examples[b * BATCH:(b + 1) * BATCH]
        at_centre = setup.loss(batch)
        for _ in range(directions):
            zs = [torch.randn(p.shape, generator=generator) for p in tensors]
            place(zs, eps)
            plus = setup.loss(batch)
            place(zs, -eps)
            minus = setup.loss(batch)
            place()
            values.append((plus + minus - 2 * at_centre) / eps ** 2)
    return values


def select(columns: dict, targets=TARGETS, blocks: range | None = None) -> np.ndarray:
    return np.concatenate([c for (t, b), c in sorted(columns.items())
                           if t in targets and (blocks is None or b in blocks)])


def measure(grads: np.ndarray, columns: dict) -> dict:
    """Rows of the two tables: whole targets (and the default and all together), then targets x block ranges."""
    halves = (slice(0, len(grads) // 2), slice(len(grads) // 2, None))

    def row(name, cols):
        full, *parts = (noise_of(grads[rows][:, cols]) for rows in (slice(None), *halves))
        return {"name": name, "n_params": full.n_params, "signal": full.signal, "energy": full.energy,
                "rho": full.rho, "noise_scale": full.noise_scale, "progress": full.progress(),
                "best_rate": full.best_rate(), "gain_at": {str(rate): full.gain(rate) for rate in RATES},
                "progress_halves": [p.progress() for p in parts]}

    n_blocks = max(b for _, b in columns) + 1
    whole = [row(f"default ({','.join(DEFAULT_TARGETS)})", select(columns, DEFAULT_TARGETS)), row("all targets", select(columns))]
    whole += [row(t, select(columns, (t,))) for t in TARGETS]
    ranges = [row(f"{t} {a}:{min(a + RANGE_BLOCKS, n_blocks)}", select(columns, (t,), range(a, a + RANGE_BLOCKS)))
              for t in TARGETS for a in range(0, n_blocks, RANGE_BLOCKS)]
    return {"whole": whole, "ranges": ranges, "n_blocks": n_blocks}


def render_curvature(probe: dict, energy: float) -> str:
    values = np.array(probe["values"])
    per_batch = values.reshape(probe["batches"], probe["directions"]).mean(axis=1)
    return (f"\nCurvature along MeZO's directions (the default targets' B, {probe['batches']} batches of {BATCH} x "
            f"{probe['directions']} Gaussian directions, central second differences at eps {probe['eps']:g}): "
            f"tr(H) = {values.mean():.3g} ± {values.std(ddof=1) / np.sqrt(len(values)):.2g} (per batch "
            f"{', '.join(f'{v:.3g}' for v in per_batch)}), against T = {energy:.3g} from the per-example "
            f"gradients.\n")


def render(result: dict) -> str:
    default = result["whole"][0]

    def relative(x):
        return x / default["progress"]

    rows = [[r["name"], f"{r['n_params']:,}", f"{r['signal']:.3g}", f"{r['energy']:.3g}", f"{r['rho']:.3f}",
             f"{r['noise_scale']:.0f}", f"**{relative(r['progress']):.2f}**",
             " / ".join(f"{relative(p):.2f}" for p in r["progress_halves"]),
             f"{r['best_rate'] / default['best_rate']:.1f}",
             *[f"{r['gain_at'][str(rate)] * 1e4:.2f}" for rate in RATES]] for r in result["whole"]]
    text = common.table(["parameters (LoRA B, every block)", "d", "\\|G\\|^2", "T = E\\|g_i\\|^2", "rho",
                         "B_noise", "progress / default", "on each half", "best rate / default's",
                         *[f"gain per step at lr {rate:g} (1e-4 nats)" for rate in RATES]], rows)
    by_range = {}
    for r in result["ranges"]:
        target, span = r["name"].split(" ")
        by_range.setdefault(span, {})[target] = r
    grid = [[span, *[f"{cells[t]['rho']:.3f} / {relative(cells[t]['progress']):.2f} / "
                     f"{cells[t]['best_rate'] / default['best_rate']:.0f}" for t in TARGETS]]
            for span, cells in by_range.items()]
    text += ("\nBy block range, rho / progress over the default's / best rate over the default's:\n\n"
             + common.table(["blocks", *TARGETS], grid))
    text += render_curvature(result["curvature"], default["energy"])
    return (text + f"\n{result['model']} q4_0, {result['task']}, {result['n_examples']} training examples (seed "
            f"{result['seed']}), one at a time, through the torch reference (float base), LoRA rank 16 on every "
            f"target at its init; progress per MeZO step at batch {BATCH} relative to the default, on the quadratic "
            f"model with the empirical Fisher as curvature (the docstring), at each set's own best rate, so a "
            f"ranking, not a training measurement; 'on each half' is the same from each half of the examples. The "
            f"gradients took {result['seconds']:.0f} s.\n\n" + common.provenance(result) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", choices=list(TASKS), default="movie-reviews",
                   help="movie-reviews, or intents: bench/intents_data.py's held-out-style task [%(default)s]")
    p.add_argument("--work", type=common.work_dir, help="where --task intents writes its data")
    p.add_argument("--examples", type=int, default=512, help="training examples, one gradient each [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="which examples, and the LoRA A init [%(default)s]")
    p.add_argument("--curvature-batches", type=int, default=4, help="batches of the curvature probe [%(default)s]")
    p.add_argument("--directions", type=int, default=32, help="directions per batch of the probe [%(default)s]")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    task = TASKS[args.task]
    if task.name != "movie-reviews" and args.work is None:
        p.error(f"--task {task.name} needs --work (its data is written there)")
    machine = common.machine_info()
    setup = load(args.model, task.data_flags(args.work), args.seed, args.threads)
    start = time.perf_counter()
    grads, columns = per_example_gradients(setup, args.examples)
    seconds = time.perf_counter() - start
    curvature = curvature_along_directions(setup, args.curvature_batches, args.directions, CURVATURE_EPS, args.seed)
    result = {"benchmark": NAME, "task": task.name, "time": common.utc_now(), "machine": machine, "model": args.model,
              "n_examples": args.examples, "seed": args.seed, "seconds": seconds, **measure(grads, columns),
              "curvature": {"eps": CURVATURE_EPS, "batches": args.curvature_batches, "directions": args.directions,
                            "values": curvature},
              "load_average_end": common.load_average()}
    common.publish(task.results(NAME), TITLE, result, render(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))
