"""Distributed MeZO as steppers of the training loop: each rank evaluates its share of a step, the losses are
all-gathered (a few floats), and every rank applies the identical update, so replicas stay bit-identical without
sending an adapter.

    data       every rank evaluates every direction on its shard of the batch; the shards' loss sums are added
    direction  every rank evaluates its own n directions on the whole batch; the step uses world x n directions
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..adapter import LoraAdapter
from ..data import Example, Task
from ..mezo import (Cone, MezoConfig, PerturbedParams, StepRecord, add_two_sided, apply_update, direction_seed,
                    learning_rate_at)
from ..objective import score
from ..steppers import ZoStepper
from .group import Group


class GroupStepper(ZoStepper):
    """A step of the group: the mode's estimate, then the update every rank applies."""

    def __init__(self, group: Group, engine, task: Task, adapter: LoraAdapter, mezo: MezoConfig, run_seed: int,
                 total_steps: int):
        super().__init__(adapter, mezo, run_seed, total_steps)
        self.group, self.engine, self.task = group, engine, task

    def estimate(self, batch: Sequence[Example], step: int) -> StepRecord:
        self.group.collective.phase = "step"
        record = StepRecord(step=step, lr=learning_rate_at(self.mezo, step, self.total_steps))
        # ConMeZO's cone: the momentum is the same on every rank, and so is every direction
        cone = Cone.around(self.momentum, self.mezo) if self.momentum is not None else None
        self.gather(record, batch, cone)  # the losses are the same on every rank: every rank stops on a NaN or none does
        record.lr = self.step_rate(record)
        apply_update(self.theta, record, self.mezo, self.momentum)
        self.group.completed, self.group.steps_run = step + 1, self.group.steps_run + 1
        return record

    def gather(self, record: StepRecord, batch: Sequence[Example], cone: Cone | None) -> None:
        raise NotImplementedError

    def _losses(self, seed: int, batch: Sequence[Example], cone: Cone | None, reduce) -> list[float]:
        """The + and - evaluation of direction `seed` on `batch`, each reduced from the batch's Totals."""
        losses = []
        for sign in (+1, -1):
            self.engine.update_adapter(PerturbedParams(self.theta, seed, sign * self.mezo.eps, cone=cone))
            losses.append(reduce(score(self.engine, batch, self.task)))
        return losses


class DataParallelStepper(GroupStepper):
    def gather(self, record: StepRecord, batch: Sequence[Example], cone: Cone | None) -> None:
        world, rank = self.group.world, self.group.rank
        size = len(batch) // world
        shards = [batch[r * size:(r + 1) * size] for r in range(world)]
        n_targets = sum(_n_targets(shard, self.task) for shard in shards)
        seeds = [direction_seed(self.run_seed, record.step, k) for k in range(self.mezo.n_directions)]
        local = [loss for seed in seeds for loss in self._losses(seed, shards[rank], cone, lambda t: t.loss_sum)]
        sums = self.group.exchange(np.array(local, dtype=np.float64))  # [world, 2n]
        for j, seed in enumerate(seeds):
            # Python's sum adds in rank order: the same float64 result on every rank.
            loss_plus = sum(float(x) for x in sums[:, 2 * j]) / n_targets
            loss_minus = sum(float(x) for x in sums[:, 2 * j + 1]) / n_targets
            add_two_sided(record, seed, loss_plus, loss_minus, self.mezo.eps)


class DirectionParallelStepper(GroupStepper):
    def gather(self, record: StepRecord, batch: Sequence[Example], cone: Cone | None) -> None:
        n, world, rank = self.mezo.n_directions, self.group.world, self.group.rank
        local = []
        for k in range(rank * n, (rank + 1) * n):
            seed = direction_seed(self.run_seed, record.step, k)
            local += [seed, *self._losses(seed, batch, cone, lambda t: t.loss)]
        got = self.group.exchange(np.array(local, dtype=np.float64)).reshape(world * n, 3)  # k order
        for seed, loss_plus, loss_minus in got:
            add_two_sided(record, int(seed), float(loss_plus), float(loss_minus), self.mezo.eps)


STEPPERS = {"data": DataParallelStepper, "direction": DirectionParallelStepper}


def group_stepper(group: Group, engine, task: Task, adapter: LoraAdapter, mezo: MezoConfig, run_seed: int,
                  total_steps: int) -> GroupStepper:
    """The stepper of the group's mode (--parallel)."""
    return STEPPERS[group.config.mode](group, engine, task, adapter, mezo, run_seed, total_steps)


def _n_targets(batch: Sequence[Example], task: Task) -> int:
    """The loss's denominator for `batch`, as objective.score counts it (known to every rank for every shard)."""
    if task.is_classification:
        return len(batch)
    return sum(len(ex.target_indices) for ex in batch)
