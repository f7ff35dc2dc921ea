"""Objectives and metrics on generated text: what MeZO can optimise and backprop cannot.

MeZO needs only a number per evaluation, so it can maximise a score of the model's own greedy generations (an
exact match, a valid function call, a user's reward) instead of the likelihood of reference tokens.

Each prompt/completion or chat example becomes a generation case: the prompt is its tokens before its (last) target
span, the reference the span's tokens up to its first end-of-generation token (a chat turn's end-of-turn marker).
A case's generation is greedy, batched through the engine, and stops at end of generation or at its token budget:
a chat turn's target includes the end-of-turn marker, so a tuned model stops by itself and the budget is the
reference's length plus GENERATION_SLACK_TOKENS (a function call's: twice its length plus that, for the same
call written at length, as untuned models do); prompt/completion data has no end marker to learn, so its budget is
the reference's length (a model is judged on the completion it was asked for, not on what it adds after it).
Rewards see text: (prompt, completion, reference) -> float. Function-calls data (BFCL) has no single reference text:
its reference is the accepted calls as JSON (edgezo.bfcl.answer_json), what the built-in "bfcl" reward and the
bfcl_* metrics grade against; exact_match is not reported there.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .data import Example, Format, Task, chunks
from .files import EdgezoError
from .objective import Totals, score
from . import bfcl, toolcalls
from .toolcalls import call_reward, score_call

# A chat turn that has not ended this many tokens past its reference's length is cut there: it cannot match any
# more, and a reward that wants longer text is not what these tasks ask for.
GENERATION_SLACK_TOKENS = 8

Reward = Callable[[str, str, str], float]  # (prompt, completion, reference) -> score, higher is better


class Generator(Protocol):
    """What generation needs from an engine (edgezo.engine.Engine)."""

    def generate_greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int]) -> list[list[int]]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def is_end_of_generation(self, token: int) -> bool: ...


class RewardError(EdgezoError):
    """The reward function raised or returned something that is not a finite number."""


@dataclass(frozen=True)
class Case:
    prompt: tuple[int, ...]
    reference: tuple[int, ...]
    max_new_tokens: int


def has_completions(task: Task) -> bool:
    """Whether `task`'s examples have a completion to generate: prompt/completion or chat data, prompt masked."""
    return task.format in (Format.COMPLETIONS, Format.CHAT, Format.FUNCTION_CALLS) and task.mask_prompt


def generation_case(example: Example, task: Task, is_end_of_generation: Callable[[int], bool]) -> Case:
    if not has_completions(task):
        raise EdgezoError("generation metrics and rewards need prompt/completion or chat data with the prompt "
                          "masked (the default; not --no-mask-prompt)")
    start, end = example.target_spans[-1] if example.target_spans else (example.target_start, len(example.tokens))
    reference = []
    for token in example.tokens[start:end]:
        if is_end_of_generation(token):
            break
        reference.append(token)
    slack = GENERATION_SLACK_TOKENS if task.format is Format.CHAT else 0
    if task.format is Format.FUNCTION_CALLS:  # room for the same call written out at length (indented JSON, a fence)
        slack = len(reference) + GENERATION_SLACK_TOKENS
    return Case(example.tokens[:start], tuple(reference), len(reference) + slack)


@dataclass(frozen=True)
class Generation:
    prompt: str
    completion: str
    reference: str


def generate(engine: Generator, batch: Sequence[Example], task: Task) -> list[Generation]:
    """The greedy completion of every example of `batch`, in one batched generation. The reference is the example's
    answer where it has one (function calls), else the reference completion's text."""
    cases = [generation_case(ex, task, engine.is_end_of_generation) for ex in batch]
    outputs = engine.generate_greedy([c.prompt for c in cases], [c.max_new_tokens for c in cases])
    return [Generation(engine.detokenize(c.prompt), engine.detokenize(out), ex.answer or engine.detokenize(c.reference))
            for ex, c, out in zip(batch, cases, outputs)]


# ---- rewards ---------------------------------------------------------------------------------------------------
def exact_match(prompt: str, completion: str, reference: str) -> float:
    return float(completion.strip() == reference.strip())


def tool_call_reward(prompt: str, completion: str, reference: str) -> float:
    return call_reward(completion, reference)


def bfcl_reward(prompt: str, completion: str, reference: str) -> float:
    return bfcl.reward(completion, reference)


BUILTIN_REWARDS: dict[str, Reward] = {"exact-match": exact_match, "tool-call": tool_call_reward, "bfcl": bfcl_reward}


def tool_call_metrics() -> dict[str, Reward]:
    """The built-in tool-calls task's metrics, per generation: JSON validity, name and argument accuracy."""

    def metric(field_name: str) -> Reward:
        return lambda prompt, completion, reference: float(getattr(score_call(completion, reference), field_name))

    return {"json_valid": metric("valid_json"), "name_accuracy": metric("name_correct"),
            "argument_accuracy": metric("argument_accuracy"), "tool_call_reward": tool_call_reward}


def bfcl_metrics() -> dict[str, Reward]:
    """Function-calls data's metrics, per generation: BFCL's AST check (bfcl_accuracy), the first call's function
    name, whether the completion reads as calls in the format asked for, argument accuracy, the check on calls
    read leniently (lenient_accuracy: a fenced JSON call counts), and the graded reward."""

    def metric(field_name: str) -> Reward:
        return lambda prompt, completion, reference: float(getattr(bfcl.score(completion, reference), field_name))

    return {"bfcl_accuracy": metric("correct"), "name_accuracy": metric("name_correct"),
            "valid_call_rate": metric("valid_call"), "argument_accuracy": metric("argument_accuracy"),
            "lenient_accuracy": metric("correct_lenient"), "bfcl_reward": bfcl_reward}


def load_reward(spec: str) -> Reward:
    """A built-in reward by name, or a user's `module:function(prompt, completion) -> float` (module importable
    from the current directory or the Python path)."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise EdgezoError(f"unknown objective {spec!r}: expected loss, {', '.join(BUILTIN_REWARDS)}, "
                          f"or MODULE:FUNCTION")
    if "" not in sys.path:  # `python -m` and console scripts may leave the working directory out
        sys.path.insert(0, "")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise EdgezoError(f"reward {spec}: cannot load the function ({exc})") from None
    if not callable(function):
        raise EdgezoError(f"reward {spec}: {function_name} is not a function")
    try:
        inspect.signature(function).bind("prompt", "completion")
    except (TypeError, ValueError):
        raise EdgezoError(f"reward {spec}: the function must take (prompt, completion)") from None
    return lambda prompt, completion, reference: function(prompt, completion)


def rewards(reward: Reward, generations: Sequence[Generation], name: str = "reward") -> list[float]:
    """reward() of every generation, each checked to be a finite number."""
    values = []
    for i, g in enumerate(generations):
        try:
            value = reward(g.prompt, g.completion, g.reference)
        except Exception as exc:  # a user's function: any failure is reported as theirs, with the input
            raise RewardError(f"the {name} function raised {type(exc).__name__}: {exc} "
                              f"(on the completion {g.completion[:80]!r})") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardError(f"the {name} function returned {value!r} for the completion {g.completion[:80]!r}; "
                              f"it must return a finite number")
        values.append(float(value))
    return values


# ---- the objective and evaluation ------------------------------------------------------------------------------
def reward_loss_function(engine, batch: Sequence[Example], task: Task,
                         reward: Reward) -> Callable[[Mapping], float]:
    """MeZO's objective for a reward: put `params` into the engine's adapter, generate the batch's completions,
    return minus their mean reward (MeZO minimises). The generations are greedy, so the objective is a
    deterministic function of the parameters and resume stays exact."""

    def loss(params: Mapping) -> float:
        engine.update_adapter(params)
        values = rewards(reward, generate(engine, batch, task))
        return -sum(values) / len(values)

    return loss


@dataclass
class GenerationTotals(Totals):
    """Totals plus sums of per-generation metrics, so batches combine exactly."""

    metric_sums: dict[str, float] = field(default_factory=dict)

    def add(self, other: Totals) -> None:
        super().add(other)
        for name, value in getattr(other, "metric_sums", {}).items():
            self.metric_sums[name] = self.metric_sums.get(name, 0.0) + value

    @property
    def metrics(self) -> dict[str, float]:
        return {name: total / max(self.n_examples, 1) for name, total in self.metric_sums.items()}


def evaluate_with_generation(engine, examples: Sequence[Example], task: Task, batch_size: int,
                             metrics: Mapping[str, Reward], on_batch: Callable[[int], None] | None = None
                             ) -> GenerationTotals:
    """objective.evaluate's loss and token accuracy, plus the mean of each of `metrics` over greedy generations
    (exact_match always, but on function-calls data, which has no reference text)."""
    if task.format is not Format.FUNCTION_CALLS:
        metrics = {"exact_match": exact_match, **metrics}
    totals = GenerationTotals()
    for batch in chunks(examples, batch_size):
        totals.add(score(engine, batch, task))
        generations = generate(engine, batch, task)
        totals.add(GenerationTotals(metric_sums={name: sum(rewards(fn, generations, name))
                                                 for name, fn in metrics.items()}))
        if on_batch:
            on_batch(len(batch))
    return totals


def generation_metrics(task: Task, data_spec: str, reward: str | None) -> dict | None:
    """The metrics of greedy generations eval reports on `task` (exact_match comes always; `reward` as "reward";
    the built-in tool-calls data's call metrics; function-calls data's bfcl_metrics), or None for data without
    completions to generate."""
    if not has_completions(task):
        if reward:
            raise EdgezoError("--reward needs prompt/completion or chat data with the prompt masked")
        return None
    metrics = (bfcl_metrics() if task.format is Format.FUNCTION_CALLS
               else tool_call_metrics() if data_spec == toolcalls.NAME else {})
    if reward:
        metrics["reward"] = load_reward(reward)
    return metrics
