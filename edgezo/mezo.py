"""MeZO: memory-efficient zeroth-order SGD (Malladi et al. 2023), independent of any inference engine.

The optimizer sees only `loss_fn(params) -> float`, where `params` maps tensor names to float32 arrays.
One step with n directions:
    for k in 1..n:  seed_k = f(run_seed, step, k)
                    z_k    = N(0, I), regenerated tensor by tensor from (seed_k, tensor index)
                    g_k    = (L(theta + eps z_k) - L(theta - eps z_k)) / (2 eps)     # projected gradient
    theta <- theta - lr_t * (1/n) sum_k (g_k z_k + wd theta)
z is never stored: the perturbed parameters are a lazy view (`PerturbedParams`) that builds theta + eps z
one tensor at a time while the engine uploads it, and theta itself is never modified by a perturbation,
so "perturb then restore" is exact by construction. A run is replayable from its (seed_k, g_k) log.

FZOO (Dang et al., arXiv 2506.09034) is the second estimator: n one-sided Rademacher directions u_k (entries
+-1) around one unperturbed loss l_0, the step normalised by the standard deviation of the n perturbed losses:
    g_k = (L(theta + eps u_k) - l_0) / std_k(L(theta + eps u_k))
    theta <- theta - lr_t * (1/n) sum_k g_k u_k
n + 1 evaluations per step instead of 2n; the update is the same expression as MeZO's, so the same replay holds.

ConMeZO (Behric et al., arXiv 2511.02757) is MeZO with its directions drawn in a cone around a momentum m of its
past estimates, so the search concentrates where the gradient has been (u_k ~ N(0, I) from the seed as above):
    z_k = cos(angle) sqrt(d) m / |m| + sin(angle) u_k          (z_k = u_k while m = 0, i.e. on the first step)
    theta <- theta - lr_t * (1/n) sum_k g_k z_k
    m     <- beta m + (1 - beta) (1/n) sum_k g_k z_k
m is the only state (the shapes of theta, float32), checkpointed with the adapter; it is a function of the step
log, so a run stays replayable from (seed_k, g_k) in order.

The step size is a fixed learning rate (with its schedule) or, with learning_rate="auto", AutoRate's: a move of a
set number of probe radii along z, whatever the scale of the model's projected gradients (its docstring). Either
way the rate a step used is in its record, so replay needs only (lr, seed_k, g_k).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from .files import EdgezoError

Params = dict[str, np.ndarray]
LossFn = Callable[[Mapping[str, np.ndarray]], float]
AUTO = "auto"  # learning_rate="auto": AutoRate chooses each step's rate


class Estimator(str, Enum):
    MEZO = "mezo"  # two-sided, Gaussian directions
    FZOO = "fzoo"  # one-sided around l_0, Rademacher directions, step normalised by the losses' std
    CONMEZO = "conmezo"  # two-sided, Gaussian directions in a cone around the momentum of past estimates


class Schedule(str, Enum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


@dataclass(frozen=True)
class MezoConfig:
    learning_rate: float | str = 1e-3  # a number, or AUTO
    eps: float = 1e-2
    n_directions: int = 1
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.CONSTANT
    warmup_steps: int = 0
    estimator: Estimator = Estimator.MEZO
    # ConMeZO: the cone's half-angle in radians and the momentum's decay (the paper's OPT settings)
    cone_angle: float = 1.35
    cone_momentum: float = 0.99
    # learning_rate="auto" (AutoRate): a typical step moves auto_step probe radii (eps) along z; the projected
    # gradients' scale is their RMS over the last auto_window steps; a step's |g| counts at most auto_clip times it
    auto_step: float = 0.1
    auto_window: int = 50
    auto_clip: float = 3.0  # 0: no clip

    @property
    def auto(self) -> bool:
        return self.learning_rate == AUTO

    def __post_init__(self):
        object.__setattr__(self, "schedule", Schedule(self.schedule))
        object.__setattr__(self, "estimator", Estimator(self.estimator))
        if self.estimator is Estimator.FZOO and self.n_directions < 2:
            raise EdgezoError("fzoo normalises by the std of its directions' losses: n_directions must be >= 2, "
                              f"got {self.n_directions}")
        if not (self.auto or (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0)):
            raise EdgezoError(f"learning rate must be > 0 or {AUTO!r}, got {self.learning_rate!r}")
        if not (self.auto_step > 0 and self.auto_window >= 1 and self.auto_clip >= 0):
            raise EdgezoError("auto_step must be > 0, auto_window >= 1 and auto_clip >= 0")
        if not self.eps > 0:
            raise EdgezoError(f"eps must be > 0, got {self.eps}")
        if self.n_directions < 1:
            raise EdgezoError(f"n_directions must be >= 1, got {self.n_directions}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise EdgezoError("weight decay and warmup steps must be >= 0")
        if not (0 <= self.cone_angle <= math.pi / 2 and 0 <= self.cone_momentum < 1):
            raise EdgezoError(f"the cone's angle must be in [0, pi/2] and its momentum in [0, 1), got "
                              f"{self.cone_angle} and {self.cone_momentum}")


def learning_rate_at(config: MezoConfig, step: int, total_steps: int, peak: float | None = None) -> float:
    """Learning rate for 0-based `step`: linear warmup to `peak` (default config.learning_rate; 1.0 gives the
    schedule's factor), then the schedule decays to 0 at `total_steps`."""
    peak = config.learning_rate if peak is None else peak
    if peak == AUTO:
        return math.nan  # chosen by AutoRate once the step's projected gradients are known
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.schedule is Schedule.LINEAR:
        return peak * (1.0 - progress)
    if config.schedule is Schedule.COSINE:
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak


class AutoRate:
    """learning_rate="auto": the step moves about auto_step probe radii along z, whatever the gradients' scale.

    MeZO's update is lr g z, a move of lr |g| along z, and the losses were probed at eps along z: outside that
    radius the estimate says nothing. The fixed rate that is stable depends on the model and task (1e-3 on
    SmolLM2-135M, 1e-4 on Gemma-3-270M, 1e-3 diverges on Qwen2.5-Coder-1.5B once |g| grows). Dividing by the
    projected gradients' running scale sigma makes the move a fixed share of the probe radius:
        lr_t = schedule(t) * auto_step * eps / sigma_t,   sigma_t = RMS of g over the last auto_window steps and this one
    and one step's |g| counts at most auto_clip * sigma_t (a trust region: an outlier moves no further than
    auto_clip * auto_step probe radii). When the gradients grow as the run leaves its basin, sigma grows and the
    steps shrink. The window is a function of the step log, so a resumed run rebuilds it from metrics.jsonl.
    """

    def __init__(self, config: MezoConfig, total_steps: int, history: Iterable[Iterable[float]] = ()):
        self.config, self.total_steps = config, total_steps
        self.history: deque[tuple[float, ...]] = deque((tuple(g) for g in history), maxlen=config.auto_window)

    def __call__(self, record: StepRecord) -> float:
        """The rate of `record`'s step (its projected gradients known); pure: observe() adds the step once taken."""
        grads = [g for step in self.history for g in step] + list(record.projected_grads)
        sigma = math.sqrt(math.fsum(g * g for g in grads) / len(grads))
        if sigma == 0.0:
            return 0.0
        lr = learning_rate_at(self.config, record.step, self.total_steps, peak=1.0) * self.config.auto_step
        lr *= self.config.eps / sigma
        largest = max(abs(g) for g in record.projected_grads)
        if self.config.auto_clip and largest > self.config.auto_clip * sigma:
            lr *= self.config.auto_clip * sigma / largest
        return lr

    def observe(self, projected_grads: Iterable[float]) -> None:
        """A step was taken with these projected gradients."""
        self.history.append(tuple(projected_grads))


def direction_seed(run_seed: int, step: int, k: int) -> int:
    """The seed of direction k at `step`: a pure function of (run_seed, step, k), so resume needs no RNG state."""
    return int(np.random.SeedSequence([run_seed, step, k]).generate_state(1, dtype=np.uint32)[0])


def direction(seed: int, tensor_index: int, shape: tuple[int, ...], rademacher: bool = False) -> np.ndarray:
    """z for one tensor: its own generator, so tensors can be produced in any order and one at a time.
    Gaussian N(0, 1), or Rademacher (+-1 with equal probability) for FZOO."""
    rng = np.random.default_rng([seed, tensor_index])
    if rademacher:
        z = rng.integers(0, 2, size=shape, dtype=np.int8).astype(np.float32)
        z *= 2
        z -= 1
        return z
    return rng.standard_normal(shape, dtype=np.float32)


@dataclass(frozen=True)
class Cone:
    """ConMeZO's directions at one step: z = along * m + across * u(seed), with along = cos(angle) sqrt(d) / |m|."""

    momentum: Params
    along: np.float32
    across: np.float32

    @classmethod
    def around(cls, momentum: Params, config: MezoConfig) -> Cone | None:
        """The cone of this step, None while the momentum is zero (then z = u)."""
        norm = math.sqrt(sum(float(np.dot(m.ravel().astype(np.float64), m.ravel())) for m in momentum.values()))
        if norm == 0.0:
            return None
        d = sum(m.size for m in momentum.values())
        return cls(momentum, np.float32(math.cos(config.cone_angle) * math.sqrt(d) / norm),
                   np.float32(math.sin(config.cone_angle)))


def step_direction(seed: int, index: int, name: str, shape: tuple[int, ...], rademacher: bool = False,
                   cone: Cone | None = None) -> np.ndarray:
    """z of tensor `name` (position `index` in theta) for direction `seed`: direction(), or its cone version."""
    z = direction(seed, index, shape, rademacher)
    if cone is not None:
        z *= cone.across
        z += cone.along * cone.momentum[name]
    return z


class PerturbedParams(Mapping):
    """Read-only view theta + scale * z(seed); each access builds one tensor (nothing else is materialised)."""

    def __init__(self, theta: Params, seed: int, scale: float, rademacher: bool = False, cone: Cone | None = None):
        self._theta, self._seed, self._scale, self._rademacher = theta, seed, np.float32(scale), rademacher
        self._cone = cone
        self._index = {name: i for i, name in enumerate(theta)}

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._theta[name]
        z = step_direction(self._seed, self._index[name], name, t.shape, self._rademacher, self._cone)
        z *= self._scale  # in place: one tensor-sized allocation per access, not three
        z += t
        return z

    def __iter__(self):
        return iter(self._theta)

    def __len__(self) -> int:
        return len(self._theta)


@dataclass
class StepRecord:
    """Everything needed to replay one step: theta_{t+1} = update(theta_t, seeds, projected_grads, lr)."""

    step: int
    lr: float
    seeds: list[int] = field(default_factory=list)
    projected_grads: list[float] = field(default_factory=list)
    losses_plus: list[float] = field(default_factory=list)
    losses_minus: list[float] = field(default_factory=list)  # MeZO only
    loss_center: float | None = None  # FZOO's unperturbed loss l_0

    @property
    def loss(self) -> float:
        """The loss at theta on this step's batch: FZOO's l_0, or MeZO's mean of the + and - losses (an estimate)."""
        if self.loss_center is not None:
            return self.loss_center
        return float(np.mean(self.losses_plus + self.losses_minus))


class NonFiniteLoss(EdgezoError):
    pass


def check_finite(step: int, **losses: float) -> None:
    if not all(math.isfinite(v) for v in losses.values()):
        shown = ", ".join(f"{name} = {value}" for name, value in losses.items())
        raise NonFiniteLoss(f"step {step + 1}: loss is not finite ({shown})")


Rate = Callable[["StepRecord"], float]  # the rate of a step whose projected gradients are known


def zo_step(theta: Params, loss_fn: LossFn, config: MezoConfig, run_seed: int, step: int, total_steps: int,
            momentum: Params | None = None, rate: Rate | None = None) -> StepRecord:
    """One step of the configured estimator, updating `theta` (and ConMeZO's `momentum`) in place; NonFiniteLoss
    (both untouched) on NaN/inf. `rate`, if given, sets the step's lr once its projected gradients are known."""
    if config.estimator is Estimator.FZOO:
        return fzoo_step(theta, loss_fn, config, run_seed, step, total_steps, rate)
    return mezo_step(theta, loss_fn, config, run_seed, step, total_steps, momentum, rate)


def fzoo_step(theta: Params, loss_fn: LossFn, config: MezoConfig, run_seed: int, step: int, total_steps: int,
              rate: Rate | None = None) -> StepRecord:
    """One FZOO step (module docstring): l_0, then n one-sided Rademacher evaluations, then the normalised update."""
    record = StepRecord(step=step, lr=learning_rate_at(config, step, total_steps))
    record.loss_center = float(loss_fn(theta))
    check_finite(step, L0=record.loss_center)
    for k in range(config.n_directions):
        seed = direction_seed(run_seed, step, k)
        loss = float(loss_fn(PerturbedParams(theta, seed, config.eps, rademacher=True)))
        check_finite(step, **{f"L{k + 1}": loss})
        record.seeds.append(seed)
        record.losses_plus.append(loss)
    sigma = float(np.std(record.losses_plus))
    # All n losses equal (e.g. eps below the loss's resolution): no direction is better than another, no step.
    record.projected_grads = [(loss - record.loss_center) / sigma if sigma > 0 else 0.0 for loss in record.losses_plus]
    if rate is not None:
        record.lr = rate(record)
    apply_update(theta, record, config)
    return record


def mezo_step(theta: Params, loss_fn: LossFn, config: MezoConfig, run_seed: int, step: int, total_steps: int,
              momentum: Params | None = None, rate: Rate | None = None) -> StepRecord:
    """One MeZO (or ConMeZO: `momentum` given) step, updating `theta` in place. Raises NonFiniteLoss (theta
    untouched) on a NaN/inf loss."""
    record = StepRecord(step=step, lr=learning_rate_at(config, step, total_steps))
    cone = Cone.around(momentum, config) if momentum is not None else None
    for k in range(config.n_directions):
        seed = direction_seed(run_seed, step, k)
        loss_plus = float(loss_fn(PerturbedParams(theta, seed, +config.eps, cone=cone)))
        loss_minus = float(loss_fn(PerturbedParams(theta, seed, -config.eps, cone=cone)))
        add_two_sided(record, seed, loss_plus, loss_minus, config.eps)
    if rate is not None:
        record.lr = rate(record)
    apply_update(theta, record, config, momentum)
    return record


def initial_momentum(theta: Params) -> Params:
    """ConMeZO's momentum before the first step: zeros shaped as theta."""
    return {name: np.zeros_like(t) for name, t in theta.items()}


def add_two_sided(record: StepRecord, seed: int, loss_plus: float, loss_minus: float, eps: float) -> None:
    """Direction `seed`'s two losses into `record`, with its projected gradient; NonFiniteLoss on NaN/inf.
    The one expression of MeZO's estimate: a distributed step gathers the losses and adds them here too."""
    check_finite(record.step, **{"L+": loss_plus, "L-": loss_minus})
    record.seeds.append(seed)
    record.projected_grads.append((loss_plus - loss_minus) / (2.0 * eps))
    record.losses_plus.append(loss_plus)
    record.losses_minus.append(loss_minus)


def apply_update(theta: Params, record: StepRecord, config: MezoConfig, momentum: Params | None = None) -> None:
    """theta -= lr * (mean_k g_k z_k + wd * theta), regenerating each z_k; float32 throughout, so replay is bit-exact.
    With ConMeZO's `momentum` (the z_k in its cone), also momentum <- beta * momentum + (1 - beta) * mean_k g_k z_k."""
    n = len(record.seeds)
    rademacher = config.estimator is Estimator.FZOO
    cone = Cone.around(momentum, config) if momentum is not None else None  # before any tensor of m changes
    lr = np.float32(record.lr)
    beta = np.float32(config.cone_momentum)
    for index, (name, t) in enumerate(theta.items()):
        if config.weight_decay:
            t -= lr * np.float32(config.weight_decay) * t
        estimate = np.zeros_like(t) if momentum is not None else None
        for seed, g in zip(record.seeds, record.projected_grads):
            z = step_direction(seed, index, name, t.shape, rademacher, cone)
            if estimate is not None:
                estimate += np.float32(g / n) * z
            z *= lr * np.float32(g / n)
            t -= z
        if momentum is not None:
            m = momentum[name]
            m *= beta
            m += (np.float32(1) - beta) * estimate
