"""A zeroth-order run rebuilt from its step log alone: the seed init, then metrics.jsonl's events in order.

Each step line carries what its update needs (lr, seeds, projected_grads; edgezo.mezo.apply_update regenerates the
directions), and a rollback line names the validation whose adapter the run took back (edgezo.trainer). Replay
keeps the adapter at each validation a rollback names, so the result is the training's bit for bit, float32 and in
the same order; it is how a run is audited or shared without its checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable

from .mezo import MezoConfig, Params, StepRecord, apply_update, initial_momentum


def replay_events(theta: Params, events: Iterable[dict], mezo: MezoConfig, momentum: Params | None = None) -> None:
    """Apply `events` (metrics.jsonl's dicts, in order) to `theta` in place, and to ConMeZO's `momentum`."""
    events = list(events)
    targets = {e["rollback_to"] for e in events if "rollback_to" in e}
    kept: dict[int, Params] = {}  # the adapter at each validation a rollback returns to
    for event in events:
        if "projected_grads" in event:
            record = StepRecord(step=event["step"] - 1, lr=event["lr"], seeds=event["seeds"],
                                projected_grads=event["projected_grads"])
            apply_update(theta, record, mezo, momentum)
        elif "rollback_to" in event:
            for name, t in theta.items():
                t[...] = kept[event["rollback_to"]][name]
            if momentum is not None:
                momentum.update(initial_momentum(theta))
        elif "valid_loss" in event and event["step"] in targets:
            kept[event["step"]] = {name: t.copy() for name, t in theta.items()}
