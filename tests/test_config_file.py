"""Config files (-c/--config), mlx-lm flag aliases and grouped --help (issue 16, item 4)."""

import json

import numpy as np
import pytest

from edgezo.adapter import LoraAdapter
from edgezo.cli import build_parser, expand_config, main
from tests.helpers import finetune_args, run_json


def parse(argv):
    parser = build_parser()
    return parser.parse_args(expand_config(parser, argv))


def test_yaml_file_sets_flags_and_command_line_flags_override_it(tmp_path):
    pytest.importorskip("yaml")
    f = tmp_path / "run.yaml"
    f.write_text("model: gemma3-270m\nlearning_rate: 2.0e-4\niters: 7\nschedule: cosine\ntargets: [attn_q, attn_v]\n"
                 "steps-per-eval: 5\n")
    args = parse(["finetune", "-c", str(f), "--iters", "3", "--rank", "4"])
    assert (args.model, args.learning_rate, args.schedule, args.targets) == ("gemma3-270m", 2e-4, "cosine", "attn_q,attn_v")
    assert (args.steps, args.rank, args.eval_every) == (3, 4, 5)  # --iters on the line beats iters in the file
    assert parse(["finetune", "--config", str(f)]).steps == 7


def test_json_file_and_switches(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"resume": True, "max_seq_length": 64, "out": "runs/x", "template": "- {text} ->"}))
    args = parse(["finetune", f"--config={f}"])
    assert args.resume is True and args.max_seq_len == 64 and args.out == "runs/x"
    assert args.template == "- {text} ->"  # a value starting with '-' is not taken for a flag


@pytest.mark.parametrize("content, message", [
    ('{"learning_rat": 0.1}', "unknown key(s) learning_rat"),  # a typo is named, not ignored
    ('{"resume": "yes"}', "resume is a switch"),
    ('[1, 2]', "expected a mapping"),
    ('{"steps": ', "not valid JSON"),
])
def test_bad_config_files_are_one_clear_error(content, message, tmp_path, capsys):
    f = tmp_path / "bad.json"
    f.write_text(content)
    assert main(["finetune", "-c", str(f)]) == 1
    err = capsys.readouterr().err
    assert message in err and str(f) in err and "Traceback" not in err


@pytest.mark.parametrize("alias, flag, value", [
    ("--iters", "steps", 12),
    ("--adapter-path", "out", "runs/a"),
    ("--max-seq-length", "max_seq_len", 99),
    ("--steps-per-eval", "eval_every", 7),
])
def test_mlx_lm_flag_names_are_aliases(alias, flag, value):
    assert getattr(parse(["finetune", alias, str(value)]), flag) == value


def test_mlx_lm_adapter_path_loads_an_adapter_in_eval_and_generate():
    assert parse(["eval", "--adapter-path", "runs/a"]).adapter == "runs/a"
    assert parse(["generate", "--adapter-path", "runs/a:best", "-p", "x"]).adapter == "runs/a:best"


def test_help_groups_the_flags():
    text = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    sections = {}
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = sections.setdefault(line[:-1], [])
        elif line.strip().startswith("-") and sections:
            current.append(line.split()[0].rstrip(","))
    assert {"base model", "data", "LoRA", "optimizer", "training loop", "run directory", "memory budget",
            "distributed"} <= set(sections)
    assert "--rank" in sections["LoRA"] and "--learning-rate" in sections["optimizer"]
    assert "--steps" in sections["training loop"] and "--model" in sections["base model"]


def test_a_runs_config_json_round_trips(tiny_gguf, sentiment_dir, tmp_path, capsys):
    first = tmp_path / "first"
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, first, 3, "--rank", "4", "--schedule", "linear",
                                   "--label-words", "good=good,bad=bad", "--eps", "0.02"))
    again = tmp_path / "again"
    run_json(capsys, ["finetune", "-c", str(first / "config.json"), "--out", str(again), "--json"])
    assert json.loads((again / "config.json").read_text()) == json.loads((first / "config.json").read_text())
    a = LoraAdapter.load(first / "adapter.gguf").tensors
    b = LoraAdapter.load(again / "adapter.gguf").tensors
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the same run, bit for bit
    # other commands take it too, skipping the fields they have no flag for (steps, LoRA, ...)
    scored = run_json(capsys, ["eval", "-c", str(first / "config.json"), "--adapter", str(first), "--json"])
    assert scored["model"] == str(tiny_gguf) and scored["n_examples"] == 16
