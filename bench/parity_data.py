"""A held-out task of edgezo's own making: is a number written in English words odd or even?

    python -m bench.parity_data OUT_DIR      # writes OUT_DIR/{train,valid,test}.jsonl

Not in any built-in or benchmark set here, and not sentiment: the answer is in the last word ("forty-three": odd),
which the model must learn to read. Numbers 1-999, split by number (no test number is seen in training), labels
balanced. Used by bench/robustness.py to check the fine-tune defaults on a task they were not designed on.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from bench import common

SEED = 20261207
TEMPLATE = "Number: {text}\nIs it odd or even? Answer:"
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
N = {"test": 300, "valid": 200}  # the rest (499) trains


def words(n: int) -> str:
    """1 <= n <= 999 in English words, as written: 'three hundred and forty-one'."""
    hundreds, rest = divmod(n, 100)
    parts = [f"{ONES[hundreds]} hundred"] if hundreds else []
    if rest:
        tens, ones = divmod(rest, 10)
        below = ONES[rest] if rest < 20 else TENS[tens] + (f"-{ONES[ones]}" if ones else "")
        parts.append(("and " if hundreds else "") + below)
    return " ".join(parts)


def build() -> dict[str, list[dict]]:
    numbers = list(range(1, 1000))
    random.Random(SEED).shuffle(numbers)
    rows = [{"text": words(n), "label": "odd" if n % 2 else "even"} for n in numbers]
    return {"test": rows[: N["test"]], "valid": rows[N["test"]: N["test"] + N["valid"]],
            "train": rows[N["test"] + N["valid"]:]}


def write(directory: str | Path) -> Path:
    return common.write_splits(directory, build())


if __name__ == "__main__":
    print(write(sys.argv[1]))
