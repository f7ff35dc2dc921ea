"""Issue 33's experiment as data and rules, without running anything: the tasks, the budgets the accountant gives,
the cells, their order and CPU cost, the milestones of a run, the learning-rate choice and the wall-clock accounting.
bench/budget_experiment.py runs what this plans; tests/test_budget_experiment.py checks every rule here.

Vocabulary:
    arm    one method on one model under one budget and task, e.g. lean BP on qwen2.5-coder-0.5b (several learning
           rates until the first milestone, then the one chosen on validation), or MeZO with the auto rate
    cell   (task, budget): the arms compared, each on the largest built-in model its method fits
    piece  one process advancing one run to a milestone (killed and rerun, it resumes from its checkpoint)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

MIB = 2**20
HOUR = 3600.0
# The built-in models, smallest first (parameters as their GGUF files hold them).
MODELS = {"smollm2-135m": 135e6, "gemma3-270m": 268e6, "qwen2.5-coder-0.5b": 494e6, "qwen2.5-coder-1.5b": 1544e6}
MILESTONES_S = (900.0, 1800.0, 3600.0, 7200.0)  # training wall-clock of the validations (evaluations excluded)
# The lean BP (QLoRA / MeBP style): LoRA on the Q4_0 blocks, gradient checkpointing, freed tensors returned at once.
# It fits the largest model of every BP variant (docs/capacity.md); its accountant name is bp-quant-ckpt.
LEAN_BP = ["--base-dtype", "q4_0", "--gradient-checkpointing", "--release-freed-memory"]
BP_RATES = (1e-4, 3e-4, 1e-3)  # AdamW; the grid of the 2026-12-02 run (3e-4 won there)
MEZO_RATES = ("auto",)  # the default; a grid (e.g. auto,1e-4,3e-4) is chosen by the same rule
TIMING_STEPS = 6  # steps of the quiet timing run of an arm (its median sets the milestones' step counts)
SHARED_LOAD_CORES = 0.5  # a piece during which other processes kept this many cores busy on average shared the CPU
SHARED_SLOWDOWN = 1.25  # ... or whose median step took this much longer than the quiet timing run's
MAX_STEPS = 5000  # the accountant predicts each run's longest batch over this many steps; no run goes further
PHONE_PROFILES = ("android-4gb", "raspberry-pi-5-4gb")  # the phone-like budgets tried, tightest first


@dataclass(frozen=True)
class TaskSpec:
    name: str
    data: str  # a built-in name, or "long-context": bench/long_context_data.py's directory under the work dir
    batch_size: int
    max_seq_len: int
    n_valid: int  # validation examples at each milestone
    test_limit: int  # test examples scored once at the end (0: all)
    template: str | None = None
    models: tuple[str, ...] = tuple(MODELS)  # candidates; gemma3 beyond its 512-token window is not modelled for BP
    bp_models: tuple[str, ...] = tuple(MODELS)
    train_args: tuple[str, ...] = ()  # more flags of the training commands (the tests' LoRA on the tiny model)
    metric: str = "accuracy"  # the `edgezo eval --json` key of held-out accuracy: zero-shot, milestones, test
    # A generative task (function calls): the trainer validates by the target's NLL, and the held-out accuracy at
    # each milestone comes from generating with the adapter validation chose so far (RUN:best) on n_valid requests.
    generative: bool = False
    also: tuple[str, ...] = ()  # more `eval --json` keys kept beside the metric at every score (BFCL: the format aside)


LONG_TEMPLATE = "{text}\nQuestion: {question}?\nAnswer:"
TASKS = {
    "movie-reviews": TaskSpec("movie-reviews", "movie-reviews", 16, 256, 200, 500),
    "boolq": TaskSpec("boolq", "boolq", 16, 256, 200, 500),
    # ~580 tokens (Qwen tokenizer; 513-769 on valid / test): 4 sequences a step keeps a MeZO step of the 1.5B model
    # near 40 s and BP's activations the largest term of its peak
    "boolq-long": TaskSpec("boolq-long", "long-context", 4, 1024, 100, 300, LONG_TEMPLATE,
                           bp_models=("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")),
    # issue 32: BFCL simple_python (prompts of ~300-600 tokens with the function schema); only the Qwen models have
    # a tool-calling chat template, the others score 0 zero-shot in any format (bench/results/agentic.md)
    "bfcl": TaskSpec("bfcl", "bfcl", 4, 768, 50, 150, models=("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"),
                     bp_models=("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"), metric="bfcl_accuracy", generative=True,
                     also=("lenient_accuracy", "name_accuracy", "valid_call_rate")),
}


@dataclass(frozen=True)
class CellSpec:
    """(task, budget rule): 'separate' (lean BP fits qwen 0.5B, not 1.5B; MeZO fits 1.5B) or a device profile."""

    task: str
    budget: str
    why: str  # what it tests, for the plan


# Most informative first; the last is cut first.
CELLS = (
    CellSpec("boolq-long", "phone", "long context on a phone-like budget: where the paper predicts the widest gap"),
    CellSpec("boolq", "separate", "reading comprehension, where model size matters: headroom for the larger model"),
    CellSpec("boolq-long", "separate", "long context at the 0.5B/1.5B budget: does the gap grow with length"),
    CellSpec("movie-reviews", "separate", "the earlier task (no headroom: 1.5B is at 89.6 % zero-shot): cut first"),
    CellSpec("bfcl", "separate", "function calling (issue 32): held-out BFCL accuracy, generated at each milestone"),
)


@dataclass
class Arm:
    task: str
    budget_name: str
    budget_bytes: int
    method: str  # "bp" (lean) or "mezo"
    model: str
    predicted_bytes: int
    rates: tuple = ()

    @property
    def key(self) -> str:
        return f"{self.task}.{self.budget_name}.{self.method}.{self.model}"


@dataclass
class Cell:
    spec: CellSpec
    budget_bytes: int
    budget_source: str
    arms: list[Arm] = field(default_factory=list)
    note: str = ""


# ---- budgets ------------------------------------------------------------------------------------------------------
def largest_fitting(predictions: dict, method: str, budget: int, candidates) -> str | None:
    """The largest of `candidates` (MODELS order) whose predicted peak for `method` is within `budget`."""
    fitting = [m for m in MODELS if m in candidates and m in predictions and predictions[m][method] <= budget]
    return fitting[-1] if fitting else None


def separating_budget(predictions: dict, small: str = "qwen2.5-coder-0.5b", large: str = "qwen2.5-coder-1.5b") -> int:
    """Midway (rounded down to a MiB) between lean BP on `small` and on `large`, if MeZO fits `large` there.
    Raises ValueError naming the numbers when no budget separates the methods so."""
    bp_small, bp_large = predictions[small]["bp"], predictions[large]["bp"]
    if not bp_small < bp_large:
        raise ValueError(f"lean BP on {small} ({bp_small / MIB:.0f} MiB) is not below {large} ({bp_large / MIB:.0f})")
    budget = (bp_small + bp_large) // 2 // MIB * MIB
    if predictions[large]["mezo"] > budget:
        raise ValueError(f"MeZO on {large} ({predictions[large]['mezo'] / MIB:.0f} MiB) does not fit midway "
                         f"({budget / MIB:.0f} MiB) between lean BP on {small} and {large}")
    return budget


def phone_budget(predictions: dict, profiles: dict[str, int], task: TaskSpec) -> tuple[str, int]:
    """The first phone-like profile (PHONE_PROFILES order) where MeZO fits a larger model than lean BP, as
    (profile, usable bytes); else the first where MeZO fits anything."""
    fallback = None
    for name in PHONE_PROFILES:
        budget = profiles[name]
        mezo = largest_fitting(predictions, "mezo", budget, task.models)
        bp = largest_fitting(predictions, "bp", budget, task.bp_models)
        if mezo and (bp is None or MODELS[mezo] > MODELS[bp]):
            return name, budget
        fallback = fallback or ((name, budget) if mezo else None)
    if fallback is None:
        raise ValueError(f"{task.name}: MeZO fits no model on {', '.join(PHONE_PROFILES)}")
    return fallback


def plan_cells(specs, predictions: dict, profiles: dict[str, int], bp_rates=BP_RATES,
               mezo_rates=MEZO_RATES) -> list[Cell]:
    """The cells with their budgets and arms (the largest model each method fits). predictions: task -> model ->
    {"mezo": bytes, "bp": bytes} (lean BP)."""
    cells = []
    for spec in specs:
        task, p = TASKS[spec.task], predictions[spec.task]
        note = ""
        try:
            if spec.budget == "separate":
                budget, source = separating_budget(p), "midway between lean BP on qwen2.5-coder-0.5b and 1.5b"
            else:
                profile, budget = phone_budget(p, profiles, task)
                source = f"device profile {profile} (usable RAM)"
        except ValueError as exc:
            cells.append(Cell(spec, 0, "", [], note=f"no budget: {exc}"))
            continue
        cell = Cell(spec, budget, source)
        for method, candidates, rates in (("bp", task.bp_models, bp_rates), ("mezo", task.models, mezo_rates)):
            model = largest_fitting(p, method, budget, candidates)
            if model is None:
                note += f"{method} fits no model; "
                continue
            cell.arms.append(Arm(spec.task, spec.budget, budget, method, model, p[model][method], tuple(rates)))
        cell.note = note.strip("; ")
        cells.append(cell)
    return cells


# ---- time ---------------------------------------------------------------------------------------------------------
def milestone_steps(quiet_median_s: float, milestones=MILESTONES_S, max_steps: int = MAX_STEPS) -> list[int]:
    """The step counts that take each milestone's training time at the quiet timing run's median step time: the runs
    stop there, so a busy machine changes how long a piece takes, never where its validations fall."""
    if not quiet_median_s > 0:
        raise ValueError(f"the quiet median step time must be positive, got {quiet_median_s}")
    return [min(max_steps, max(1, round(m / quiet_median_s))) for m in milestones]  # non-decreasing


def is_shared(piece: dict, quiet_median_s: float) -> bool:
    """A piece shared the CPU if other processes kept SHARED_LOAD_CORES busy on average, or its median step took
    SHARED_SLOWDOWN x the quiet run's (a piece not watched, e.g. cut short by a kill, is judged on the latter)."""
    load = piece.get("others_busy_cores")
    slow = piece.get("median_step_s") is not None and piece["median_step_s"] > SHARED_SLOWDOWN * quiet_median_s
    return slow or (load is not None and load > SHARED_LOAD_CORES)


def account(step_seconds: dict[int, float], pieces: list[dict], quiet_median_s: float) -> dict[int, float]:
    """Training wall-clock at each step (cumulative, evaluations excluded), by the rule of issue 33: a piece that
    ran alone counts its measured step times; a piece that shared the CPU counts steps x the quiet median.

    step_seconds: step -> measured seconds (metrics.jsonl's step lines); pieces: {first_step, last_step,
    others_busy_cores, median_step_s} (steps first..last inclusive; steps in no piece are judged one by one on their
    own time). Returns step -> accounted seconds since the start, and 0 at step 0."""
    owner = {}
    for piece in pieces:
        shared = is_shared(piece, quiet_median_s)
        for step in range(piece["first_step"], piece["last_step"] + 1):
            owner[step] = shared
    clock, total = {0: 0.0}, 0.0
    for step in sorted(step_seconds):
        seconds = step_seconds[step]
        shared = owner.get(step, seconds > SHARED_SLOWDOWN * quiet_median_s)
        total += quiet_median_s if shared else seconds
        clock[step] = total
    return clock


def others_busy_cores(stat_before: list[int], stat_after: list[int], own_cpu_s: float, wall_s: float,
                      ticks_per_s: float = 100.0) -> float:
    """Cores kept busy by other processes over a piece: all CPUs' busy time from /proc/stat's first line (user,
    nice, system, irq, softirq, steal) less the piece's own CPU time, over its wall time."""
    busy = [stat_after[i] - stat_before[i] for i in (0, 1, 2, 5, 6, 7) if i < len(stat_after)]
    return max(0.0, (sum(busy) / ticks_per_s - own_cpu_s) / wall_s) if wall_s > 0 else 0.0


# ---- the learning rate ----------------------------------------------------------------------------------------------
def choose_rate(first_validations: dict, by_loss: bool = False) -> object:
    """The rate whose run validated best at the first milestone: highest accuracy, then lowest loss (by_loss, as the
    trainer chooses for a generative task: lowest loss), then the first listed. first_validations: rate ->
    {"valid_accuracy", "valid_loss"} (the test split is never looked at)."""
    if not first_validations:
        raise ValueError("no run reached the first milestone")
    order = list(first_validations)
    return min(order, key=lambda r: validation_rank(first_validations[r], by_loss) + (order.index(r),))


def validation_rank(event: dict, by_loss: bool = False) -> tuple:
    """Sort key of a validation, best first: accuracy then loss, or loss alone (generative tasks)."""
    return (event["valid_loss"],) if by_loss else (-event["valid_accuracy"], event["valid_loss"])


# ---- CPU budget ---------------------------------------------------------------------------------------------------
# Rough throughputs on the 2-core Intel Xeon, for the plan only (the runs measure their own): llama.cpp evaluation
# tokens/s per model, and the accountant-free guess of a training step's seconds per token.
EVAL_TOKENS_PER_S = {"smollm2-135m": 1400, "gemma3-270m": 900, "qwen2.5-coder-0.5b": 450, "qwen2.5-coder-1.5b": 170}
MEAN_TOKENS = {"movie-reviews": 40, "boolq": 160, "boolq-long": 590, "bfcl": 450}  # per example (Qwen tokenizer)
# Generative tasks: a held-out request is generated (bench/results/agentic.md: 50 BFCL test requests in 379 s on
# qwen2.5-coder-0.5b, 386 s on 1.5b)
GENERATION_S_PER_EXAMPLE = {"qwen2.5-coder-0.5b": 7.6, "qwen2.5-coder-1.5b": 7.7}


def eval_seconds(model: str, task: str, n_examples: int) -> float:
    if TASKS[task].generative:
        return n_examples * GENERATION_S_PER_EXAMPLE.get(model, 10.0)
    return n_examples * MEAN_TOKENS[task] / EVAL_TOKENS_PER_S[model]


def arm_cpu_seconds(arm: Arm, task: TaskSpec, milestones=MILESTONES_S) -> dict:
    """Projected CPU of one arm: training to the last milestone, the extra rates until the first, a timing run,
    a validation at the start and at each milestone (per rate until the first), and the test split once."""
    extra_rates = max(0, len(arm.rates) - 1)
    train = milestones[-1] + extra_rates * milestones[0]
    n_validations = 1 + len(milestones) + extra_rates
    evals = (n_validations * eval_seconds(arm.model, arm.task, task.n_valid)
             + eval_seconds(arm.model, arm.task, task.test_limit or 1000))
    timing = TIMING_STEPS * (milestones[0] / 100)  # a step is rarely above 1 % of the first milestone
    return {"train": train, "evals": evals, "timing": timing, "total": train + evals + timing}


def zero_shot_seconds(task: TaskSpec, test_models) -> float:
    """Every model's zero-shot validation (the figure's lines), and the test split of the models trained."""
    return (sum(eval_seconds(m, task.name, task.n_valid) for m in task.models)
            + sum(eval_seconds(m, task.name, task.test_limit or 1000) for m in test_models))


def cut_to_budget(cells: list[Cell], cpu_hours: float) -> tuple[list[Cell], list[Cell], list[dict]]:
    """(kept, cut, rows): cells in order while the projected CPU (arms + zero-shot evaluations not yet counted: each
    model's validation once per task, the test split of each trained model) stays within `cpu_hours`; the first cell
    is always kept, and once one is cut so is every later one. rows: the plan's projection per cell."""
    kept, cut, rows, total, seen = [], [], [], 0.0, set()  # seen: zero-shot evaluations already counted
    for cell in cells:
        task = TASKS[cell.spec.task]
        arms = {a.key: arm_cpu_seconds(a, task) for a in cell.arms}
        new_models = {a.model for a in cell.arms} - {m for t, m in seen if t == task.name}
        zero = zero_shot_seconds(task, new_models) - (0.0 if (task.name, None) not in seen else
                                                      sum(eval_seconds(m, task.name, task.n_valid) for m in task.models))
        cost = sum(a["total"] for a in arms.values()) + zero
        fits = not kept or (not cut and total + cost <= cpu_hours * HOUR)  # the order is the priority: no skipping
        if fits and cell.arms:
            kept.append(cell)
            total += cost
            seen |= {(task.name, None)} | {(task.name, m) for m in new_models}
        else:
            cut.append(cell)
        rows.append({"cell": cell, "arms": arms, "zero_shot": zero, "cost": cost, "kept": fits and bool(cell.arms),
                     "cumulative": total})
    return kept, cut, rows


def median(values) -> float:
    return statistics.median(values) if values else math.nan
