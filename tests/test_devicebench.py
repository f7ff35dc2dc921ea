"""`edgezo bench` (edgezo.devicebench) end to end on the tiny model: the table's rows and columns, figures that are
positive finite numbers, crashed children reported as failed rows, peak RSS that is the child's own, list flags.

Nothing here asserts a speed: the figures' values depend on the machine."""
import csv
import io
import json
import math
import os
import signal

import numpy as np
import pytest

from edgezo import devicebench
from edgezo.cli import build_parser, main
from edgezo.files import EdgezoError, peak_rss_bytes
from tests.helpers import run_json

LLAMA_FIGURES = ("pp_tokens_per_s", "tg_tokens_per_s", "mezo_step_s", "mezo_step_over_two_forwards",
                 "mezo_peak_rss_bytes", "mezo_predicted_rss_bytes")
BP_FIGURES = ("bp_step_s", "bp_peak_rss_bytes", "bp_predicted_rss_bytes")
SPREADS = ("pp_tokens_per_s_sd", "tg_tokens_per_s_sd", "mezo_step_s_sd", "mezo_step_over_two_forwards_sd")


def bench_args(model, *extra) -> list[str]:
    return ["bench", "--model", str(model), "--prompt-tokens", "8", "--gen-tokens", "3", "--threads", "1", *extra]


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture
def without_torch(monkeypatch):
    """As on a device without the torch extra (and fast: no torch child)."""
    monkeypatch.setattr(devicebench, "torch_extra_missing", lambda: ["torch"])


def test_json_has_one_row_per_combination_with_positive_finite_figures(tiny_gguf, without_torch, capsys):
    result = run_json(capsys, bench_args(tiny_gguf, "--batch-size", "1,2", "--repeats", "2", "--json"))
    assert result["columns"] == list(devicebench.COLUMNS)
    rows = result["rows"]
    assert [(r["batch_size"], r["prompt_tokens"], r["gen_tokens"]) for r in rows] == [(1, 8, 3), (2, 8, 3)]
    for row in rows:
        assert set(devicebench.COLUMNS) <= set(row) and row["status"] == "ok" and row["note"] == ""
        assert {k: row[k] for k in LLAMA_FIGURES if not positive_finite(row[k])} == {}
        assert all(math.isfinite(row[k]) and row[k] >= 0 for k in SPREADS)
        assert [row[k] for k in BP_FIGURES] == [None] * 3  # torch missing: skipped, not failed
        llama = row["details"]["llama"]["result"]
        assert len(llama["forward_s"]) == len(llama["mezo_step_s"]) == 2  # --repeats
        # generation ignores end-of-generation tokens: exactly batch x gen tokens, as llama-bench counts them
        assert llama["n_generated_tokens"] == row["batch_size"] * 3
        assert llama["n_prompt_tokens"] == row["batch_size"] * 8
    assert "torch" in result["bp_skipped"] and not result["bp"]


def test_csv_has_the_fixed_columns_and_numbers(tiny_gguf, without_torch, capsys):
    assert main(bench_args(tiny_gguf, "--batch-size", "2", "--repeats", "1", "--csv")) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table[0] == list(devicebench.COLUMNS) and len(table) == 2
    row = dict(zip(table[0], table[1]))
    assert row["status"] == "ok" and row["batch_size"] == "2"
    assert {k: row[k] for k in LLAMA_FIGURES if not positive_finite(float(row[k]))} == {}
    assert [row[k] for k in BP_FIGURES] == ["", "", ""]


def test_a_model_file_that_crashes_its_child_is_a_failed_row_and_the_rest_is_measured(tiny_gguf, tmp_path,
                                                                                       without_torch, capsys):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))  # a header llama.cpp refuses
    result = run_json(capsys, bench_args(f"{fake},{tiny_gguf}", "--batch-size", "1", "--repeats", "1", "--json"))
    failed, ok = result["rows"]
    assert failed["status"] == "failed" and "MeZO child failed: exit 1" in failed["note"]
    assert [failed[k] for k in LLAMA_FIGURES[:5]] == [None] * 5
    assert failed["details"]["llama"]["stderr_tail"]  # what the child said, for a bug report
    assert ok["status"] == "ok" and all(positive_finite(ok[k]) for k in LLAMA_FIGURES)


def test_a_child_killed_by_a_signal_is_reported_failed_in_the_markdown_table(tiny_gguf, without_torch, monkeypatch,
                                                                             capsys):
    # the child of batch size 2 kills itself before measuring anything; batch size 1 runs as usual
    dying = ("import json, os, signal, sys\n"
             "if json.loads(sys.argv[1])['point']['batch_size'] == 2: os.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setattr(devicebench, "CHILD_PROGRAM", dying + devicebench.CHILD_PROGRAM)
    assert main(bench_args(tiny_gguf, "--batch-size", "1,2", "--repeats", "1")) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and table[0].startswith("| model | quant | batch |")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[1:]]
    assert cells[0][2] == "1" and "failed" not in cells[0]
    assert cells[1][2] == "2" and cells[1][5:10] == ["failed"] * 5
    assert "row 2 failed: MeZO child failed: killed by SIGKILL" in out
    assert "BP not measured: the torch extra is not installed" in out


def test_the_peak_rss_is_the_childs_own_not_the_parents(monkeypatch):
    """Linux carries a process's peak RSS into the children it forks and execs; the launcher must not."""
    held = np.ones(64 * 2**20)  # 512 MiB touched: this process's high-water mark is now above that
    assert peak_rss_bytes() >= held.nbytes or peak_rss_bytes() == 0
    monkeypatch.setattr(devicebench, "CHILD_PROGRAM", "print('{\"x\": 1}')")
    point = devicebench.BenchPoint("m", None, "m.gguf", 1, 1, 1)
    outcome = devicebench.run_in_child("llama", point, devicebench.BenchConfig())
    assert outcome["ok"] and outcome["result"] == {"x": 1}
    assert 0 < outcome["peak_rss_bytes"] < 128 * 2**20  # an interpreter printing a line
    del held


def test_a_child_past_its_timeout_is_stopped_and_failed(monkeypatch):
    monkeypatch.setattr(devicebench, "CHILD_PROGRAM", "import time; time.sleep(60)")
    point = devicebench.BenchPoint("m", None, "m.gguf", 1, 1, 1)
    outcome = devicebench.run_in_child("llama", point, devicebench.BenchConfig(timeout_s=0.5))
    assert not outcome["ok"] and outcome["error"] == "timed out after 0.5 s"
    assert outcome["returncode"] == -signal.SIGTERM  # the launcher passed the SIGTERM on and saw the child end
    assert outcome["seconds"] < 30


def test_bp_step_and_its_peak_rss_beside_the_prediction(tiny_gguf, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    result = run_json(capsys, bench_args(tiny_gguf, "--batch-size", "2", "--repeats", "1", "--json"))
    (row,) = result["rows"]
    assert result["bp"] and result["bp_skipped"] is None
    assert row["status"] == "ok", row["note"]
    assert {k: row[k] for k in LLAMA_FIGURES + BP_FIGURES if not positive_finite(row[k])} == {}


# ---- flags -------------------------------------------------------------------------------------------------------
def test_list_flags_parse_like_llama_benchs():
    args = build_parser().parse_args(["bench", "--model", "a.gguf, smollm2-135m", "--quant", "q4_0,q8_0", "-b", "1,16",
                                      "-p", "128", "-n", "32,64", "--no-bp"])
    assert args.model == ["a.gguf", "smollm2-135m"] and args.quant == ["q4_0", "q8_0"]
    assert (args.batch_size, args.prompt_tokens, args.gen_tokens, args.bp) == ([1, 16], [128], [32, 64], False)
    defaults = build_parser().parse_args(["bench"])
    assert defaults.model == ["smollm2-135m"] and defaults.quant is None and defaults.bp
    assert (defaults.batch_size, defaults.prompt_tokens, defaults.gen_tokens, defaults.repeats) == ([1, 16], [64], [32], 3)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "1,x"], "expected comma-separated whole numbers, got '1,x'"),
    (["--prompt-tokens", "0"], "expected comma-separated numbers >= 1, got '0'"),
    (["--gen-tokens", ","], "expected comma-separated numbers >= 1, got ','"),
    (["--model", " , "], "expected comma-separated names"),
    (["--json", "--csv"], "not allowed with argument"),  # one output format
])
def test_bad_list_flags_are_argparse_errors_naming_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_busy_loops_run_at_their_nice_value_while_measuring_and_stop_after():
    with devicebench.busy_loops(2, 19) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        assert all(os.getpriority(os.PRIO_PROCESS, p.pid) == 19 for p in procs)
    assert all(p.poll() is not None for p in procs)


def test_bench_under_load_says_so(tiny_gguf, without_torch, capsys):
    assert main(bench_args(tiny_gguf, "--batch-size", "1", "--repeats", "1", "--busy", "1", "--busy-nice", "19")) == 0
    assert "under 1 busy loop(s) at nice 19" in capsys.readouterr().out
    result = run_json(capsys, bench_args(tiny_gguf, "--batch-size", "1", "--repeats", "1", "--busy", "1", "--json"))
    assert result["busy"] == {"processes": 1, "nice": 0} and result["rows"][0]["status"] == "ok"


def test_the_bench_config_refuses_nonsense():
    with pytest.raises(EdgezoError, match="repeats must be >= 1"):
        devicebench.BenchConfig(repeats=0)
    with pytest.raises(EdgezoError, match="must be >= 1"):
        devicebench.BenchPoint("m", None, "m.gguf", 1, 0, 1)
    with pytest.raises(EdgezoError, match="nice value 0-19"):
        devicebench.BenchConfig(busy_nice=20)


def test_summary_is_mean_and_sample_sd():
    s = devicebench.summary([1.0, 2.0, 3.0])
    assert (s["mean"], s["sd"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)
    assert devicebench.summary([4.0])["sd"] == 0.0
    assert json.loads(json.dumps(s)) == s
