from pathlib import Path

import numpy as np
import pytest

from tests.helpers import write_jsonl  # noqa: E402
from tests.tiny_model import write_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch, request):
    """Each test gets its own empty $EDGEZO_HOME, except real-model tests, which share the user's cache."""
    if "real_model" not in request.keywords:
        monkeypatch.setenv("EDGEZO_HOME", str(tmp_path / "edgezo-home"))


@pytest.fixture
def sentiment_dir(tmp_path) -> Path:
    """A small classification dataset whose label words (' good' / ' bad') are single tokens of the tiny vocab."""
    rng = np.random.default_rng(0)
    words = {"good": ["fine", "great", "lovely", "fun"], "bad": ["dull", "awful", "boring", "weak"]}
    directory = tmp_path / "data"
    directory.mkdir()
    for split, n in (("train", 64), ("valid", 16), ("test", 16)):
        records = []
        for _ in range(n):
            label = str(rng.choice(["good", "bad"]))
            records.append({"text": f"a {rng.choice(words[label])} movie", "label": label})
        write_jsonl(directory / f"{split}.jsonl", records)
    return directory
