"""A synthetic held-out task: the intent of a short phone-assistant request, built from templates (not movie reviews).

    python -m bench.intents_data OUT_DIR      # writes OUT_DIR/{train,valid,test}.jsonl

Four intents, each answered by one label letter (" A" alarm, " B" weather, " C" music, " D" message) so the model
cannot lean on the label word's meaning: zero-shot it guesses, and what it learns is the task. The split is fixed
by SEED; test requests use templates no training request uses, so test accuracy measures generalisation beyond
the training phrasings. Used by the issue "Fast MeZO" to check that settings chosen on movie-reviews are not tuned
to that one task. Synthetic: the sentences are edgezo's own, made from the lists below.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from bench import common

SEED = 20261202
LABELS = {"alarm": "A", "weather": "B", "music": "C", "message": "D"}
TEMPLATE = "Request: {text}\nAnswer with A (alarm), B (weather), C (music) or D (message).\nIntent:"
TIMES = ["6 am", "7:30", "noon", "half past eight", "9 tonight", "5:45 tomorrow", "ten minutes from now", "dawn"]
PLACES = ["Paris", "the beach", "Tokyo", "my office", "Denver", "the mountains", "Lagos", "home"]
ARTISTS = ["some jazz", "Miles Davis", "the new Adele album", "lo-fi beats", "my workout playlist", "Bach", "rock"]
PEOPLE = ["mom", "Sam", "my boss", "the team", "Priya", "grandpa", "my landlord", "Alex"]
# (train templates, test-only templates) per intent
TEMPLATES = {
    "alarm": (["wake me up at {t}", "set an alarm for {t}", "alarm at {t} please", "I need to be up by {t}"],
              ["make sure I don't oversleep past {t}", "ring at {t} so I get up"]),
    "weather": (["will it rain in {p}", "what's the weather in {p}", "how hot is it in {p} today", "forecast for {p}"],
                ["should I bring an umbrella to {p}", "is it sunny in {p} right now"]),
    "music": (["play {a}", "put on {a}", "I want to hear {a}", "start {a} in the kitchen"],
              ["could you queue {a}", "shuffle {a} for me"]),
    "message": (["text {w} that I'm late", "send {w} a message saying hi", "tell {w} I'll call back", "message {w}: on my way"],
                ["let {w} know dinner is ready", "write to {w} that the meeting moved"]),
}
N = {"train": 600, "valid": 200, "test": 200}


def _fill(template: str, rng: random.Random) -> str:
    return template.format(t=rng.choice(TIMES), p=rng.choice(PLACES), a=rng.choice(ARTISTS), w=rng.choice(PEOPLE))


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    out = {}
    for split, n in N.items():
        rows = []
        for i in range(n):
            intent = list(LABELS)[i % len(LABELS)]
            train_templates, test_templates = TEMPLATES[intent]
            template = rng.choice(test_templates if split == "test" else train_templates)
            rows.append({"text": _fill(template, rng), "label": LABELS[intent]})
        rng.shuffle(rows)
        out[split] = rows
    return out


def write(directory: str | Path) -> Path:
    return common.write_splits(directory, build())


if __name__ == "__main__":
    print(write(sys.argv[1]))
