"""edgezo cache: $EDGEZO_HOME area by area (each test has its own empty home, tests/conftest.py)."""
import json

import pytest

from edgezo import cache
from edgezo.cli import main
from edgezo.files import EdgezoError, home


def fill(files: dict[str, int]) -> None:
    for name, size in files.items():
        path = home() / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)


def run_json(argv, capsys) -> dict:
    assert main(["cache", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cache_lists_every_area_and_clears_only_the_derived_ones(capsys):
    fill({"models/m/m.gguf": 1000, "datasets/d/train.jsonl": 10, "quantized/m.q4_0.gguf": 300,
          "split/abc/prefix.gguf": 200, "split/abc/suffix.gguf": 100, "hidden-states/t.f32": 50})
    listed = {a["area"]: a for a in run_json([], capsys)["areas"]}
    assert set(listed) == {a.name for a in cache.AREAS}
    assert (listed["models"]["bytes"], listed["split"]["files"], listed["split"]["bytes"]) == (1000, 2, 300)
    assert listed["hf"]["bytes"] == 0 and not listed["models"]["derived"] and listed["quantized"]["derived"]
    cleared = run_json(["--clear", "derived"], capsys)
    assert cleared["freed_bytes"] == 300 + 300 + 50
    after = {a["area"]: a["bytes"] for a in cleared["areas"]}
    assert after == {"models": 1000, "datasets": 10, "hf": 0, "quantized": 0, "split": 0, "hidden-states": 0}
    assert run_json(["--clear", "models,datasets"], capsys)["freed_bytes"] == 1010
    assert not (home() / "models").exists()


def test_unknown_area_is_refused_with_the_known_ones(capsys):
    fill({"quantized/m.q4_0.gguf": 5})
    assert main(["cache", "--clear", "quantised"]) == 1
    err = capsys.readouterr().err
    assert "unknown cache area quantised" in err and "hidden-states" in err
    assert (home() / "quantized/m.q4_0.gguf").exists()  # nothing removed
    with pytest.raises(EdgezoError):
        cache.resolve_areas(",")
