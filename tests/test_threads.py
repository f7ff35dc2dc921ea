"""edgezo.threads: the thread count that fits the machine's load (issue 30). The engine's side, that results do not
depend on the count, is tested on the real model (tests/test_real_model.py) and the tiny one (below)."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from edgezo import threads
from edgezo.engine import Engine, EngineConfig
from edgezo.threads import CpuReading, ThreadGovernor, others_busy_cores, threads_for


@pytest.mark.parametrize("usable, others_busy, expected", [
    (2, 0.0, 2),    # idle
    (2, 0.05, 2),   # background noise is not a taken core
    (2, 0.67, 1),   # one busy loop against our two threads gets 2/3 of a core
    (2, 1.0, 1),    # one busy loop against our one thread
    (2, 1.33, 1),   # two busy loops: never fewer than one thread
    (8, 2.7, 5),    # three cores taken of eight
    (1, 3.0, 1),
    (4, 0.3, 4),    # under TAKEN_FROM_SHARE: not taken
])
def test_one_thread_fewer_for_each_core_others_keep_busy(usable, others_busy, expected):
    assert threads_for(usable, others_busy) == expected


def test_others_busy_is_the_machine_time_less_our_own():
    before = CpuReading(wall_s=10.0, machine_busy_s=100.0, own_s=5.0)
    after = CpuReading(wall_s=11.0, machine_busy_s=101.6, own_s=6.0)  # 1.6 core-s in 1 s, 1.0 of them ours
    assert others_busy_cores(before, after) == pytest.approx(0.6)
    assert others_busy_cores(before, CpuReading(11.0, 100.5, 6.0)) == 0.0  # tick rounding never goes negative


class FakeClock:
    def __init__(self):
        self.readings = []

    def __call__(self):
        return self.readings.pop(0) if self.readings else None


def test_the_governor_drops_threads_under_load_and_takes_them_back():
    clock = FakeClock()
    clock.readings = [CpuReading(0.0, 0.0, 0.0),
                      CpuReading(0.05, 0.08, 0.05),  # too soon after the last reading: no decision
                      CpuReading(1.0, 1.7, 1.0),     # others 0.7 cores: one thread
                      CpuReading(2.0, 3.7, 2.0),     # others 1.0
                      CpuReading(3.0, 5.7, 3.9)]     # others 0.1: the load went away
    governor = ThreadGovernor(usable=2, read=clock)
    assert governor.n_threads == 2
    assert [governor.choose() for _ in range(4)] == [2, 1, 1, 2]
    assert governor.others_busy == pytest.approx(0.1)


def test_the_governor_keeps_all_cores_where_the_load_cannot_be_read():
    governor = ThreadGovernor(usable=4, read=lambda: None)
    assert governor.choose() == 4 and governor.others_busy is None


def test_a_cgroup_quota_caps_the_usable_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert threads.usable_cores() == 4  # no file
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.usable_cores() == 4
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    assert threads.usable_cores() == 2


@pytest.mark.skipif(not threads.PROC_STAT.exists(), reason="needs /proc/stat")
def test_a_real_busy_process_is_seen():
    """Against the machine as it is (other tests' processes may run): a spinner adds most of a core to the reading.
    That our own work is not counted is tested on synthetic readings above."""
    governor = ThreadGovernor(usable=2)
    time.sleep(0.5)
    governor.choose()
    baseline = governor.others_busy
    if baseline > threads.usable_cores() - 1:
        pytest.skip(f"other processes keep {baseline:.1f} cores busy: no core free for the spinner to show on")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # the interpreter's start-up
        governor.choose()
        time.sleep(0.5)
        governor.choose()
    finally:
        spinner.kill()
        spinner.wait()
    assert governor.others_busy - baseline > 0.4, (baseline, governor.others_busy)


def test_user_openmp_settings_win(monkeypatch):
    monkeypatch.setattr(threads, "OPENMP_DEFAULTS", {"GOMP_SPINCOUNT": "123"})
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # the user chose: nothing of ours is added
    threads.configure_openmp()
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    threads.configure_openmp()
    assert os.environ["GOMP_SPINCOUNT"] == "123"


def test_the_engine_sets_openmp_before_llama_cpp_loads():
    """libgomp reads GOMP_SPINCOUNT once, when llama_cpp loads it: a fresh interpreter that imports the engine must
    have edgezo's value in its environment by then."""
    code = ("import os, sys, edgezo.engine; "
            "assert 'llama_cpp' in sys.modules; print(os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == threads.OPENMP_DEFAULTS["GOMP_SPINCOUNT"]


class Alternating:
    """A governor that changes the thread count before every decode."""

    def __init__(self):
        self.n_threads, self.calls = 2, 0

    def choose(self):
        self.calls += 1
        self.n_threads = 1 + self.calls % 2
        return self.n_threads


def test_changing_threads_between_decodes_changes_no_logit(tiny_gguf):
    seqs = [[1, 5, 9, 13, 2, 7], [1, 4, 4, 8]]
    positions = [list(range(len(s))) for s in seqs]
    with Engine(tiny_gguf, EngineConfig(n_seq_max=2, n_ctx_per_seq=16, n_threads=1)) as fixed:
        expected = [fixed.logits(seqs, positions) for _ in range(3)]
    with Engine(tiny_gguf, EngineConfig(n_seq_max=2, n_ctx_per_seq=16)) as governed:
        governed.governor = Alternating()
        got = [governed.logits(seqs, positions) for _ in range(3)]
        assert governed.governor.calls == 3 and governed.n_threads == 2
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
