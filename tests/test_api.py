"""The Python API (issue 16, item 6): the README's example runs, and finetune() is the CLI's finetune."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import edgezo
from edgezo.adapter import LoraAdapter
from edgezo.files import EdgezoError
from tests.helpers import finetune_args, run_json

README = Path(__file__).parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text()
    block = re.search(r"<!-- python-api:begin -->\s*```python\n(.*?)```\s*<!-- python-api:end -->", text, re.S)
    assert block, "README.md lost its Python API example (<!-- python-api:begin --> ... end)"
    return block.group(1)


def test_the_readme_example_runs(tiny_gguf, sentiment_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    code = readme_example()
    # The README trains SmolLM2 on movie reviews for minutes; here the same code runs on the tiny test model.
    swaps = [
        ('model="smollm2-135m"', f'model={str(tiny_gguf)!r}, template="{{text}}\\nLabel:", batch_size=4, threads=1'),
        ('data="movie-reviews"', f'data={str(sentiment_dir)!r}'),
        (re.compile(r"steps=\d+"), "steps=3"),
        ('split="test"', 'split="test", batch_size=4, threads=1'),
    ]
    for old, new in swaps:
        count = len(old.findall(code)) if isinstance(old, re.Pattern) else code.count(old)
        assert count == 1, f"the README example no longer contains {old!r} once"
        code = old.sub(new, code) if isinstance(old, re.Pattern) else code.replace(old, new)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    run, test = namespace["run"], namespace["test"]
    assert isinstance(run, edgezo.FinetuneResult) and run.steps == 3 and run.adapter.exists()
    assert run.best_adapter == run.run_dir / "adapter.best.gguf" and test.n_examples == 16
    assert test.adapter == run.adapter and (run.run_dir / "curves.png").exists()
    assert run.adapter.read_bytes() == run.best_adapter.read_bytes()  # the adapter a run leaves is its best
    printed = capsys.readouterr().out
    assert f"test accuracy {test.accuracy:.3f}" in printed


def test_finetune_is_the_cli_finetune(tiny_gguf, sentiment_dir, tmp_path, capsys):
    cli = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "cli", 3, "--targets", "attn_q,attn_v"))
    api = edgezo.finetune(model=tiny_gguf, quant="f32", data=sentiment_dir, out=tmp_path / "api", steps=3,
                          batch_size=4, threads=1, eval_every=3, save_every=2, template="{text}\nLabel:",
                          learning_rate=0.01, targets=["attn_q", "attn_v"])
    cli_config = json.loads((tmp_path / "cli" / "config.json").read_text())
    api_config = json.loads((tmp_path / "api" / "config.json").read_text())
    assert cli_config == api_config  # same defaults, same resolved configuration
    a = LoraAdapter.load(cli["adapter"]).tensors
    b = LoraAdapter.load(api.adapter).tensors
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert api.final_loss == cli["final_loss"] and api.valid_accuracy == cli["valid_accuracy"]
    assert [e["step"] for e in api.metrics() if "loss" in e] == [1, 2, 3]


def test_api_errors_raise_instead_of_exiting(tiny_gguf, tmp_path):
    with pytest.raises(TypeError, match="learning_rat"):
        edgezo.finetune(learning_rat=0.1)
    with pytest.raises(EdgezoError, match="no such GGUF file"):
        edgezo.finetune(model=tmp_path / "missing.gguf", out=tmp_path / "run")
