"""Distributed MeZO (edgezo.distributed) with real processes on localhost, gloo backend, on the tiny model.

Ranks are started either by `finetune --workers N` (the local launcher) or by hand with torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which is also how ranks on different machines are started.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch.distributed")

from edgezo.adapter import LoraAdapter  # noqa: E402
from edgezo.distributed import DistConfig, Group, adapter_sha256  # noqa: E402
from edgezo.files import EdgezoError  # noqa: E402

from tests.helpers import dying_cli, finetune_args, run_json  # noqa: E402

from bench import netns  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argvs, logs, commands=None):
    """One `python -m edgezo.cli` per argv (or the given command, where not None), as torchrun would start them;
    stdout/stderr to files in `logs`."""
    port, procs = free_port(), []
    for rank, (argv, command) in enumerate(zip(argvs, commands or [None] * len(argvs))):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(len(argvs)), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        with open(logs / f"rank{rank}.out", "w") as out, open(logs / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen(command or [sys.executable, "-m", "edgezo.cli", *argv], env=env, stdout=out,
                                          stderr=err))
    return procs


def finish(procs, logs, timeout=120):
    codes = [p.wait(timeout=timeout) for p in procs]
    outputs = [(logs / f"rank{r}.out").read_text() for r in range(len(procs))]
    errors = [(logs / f"rank{r}.err").read_text() for r in range(len(procs))]
    return codes, [json.loads(o.splitlines()[-1]) if o.strip().startswith("{") else o for o in outputs], errors


def step_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def adapter_hash(run_dir) -> str:
    """The hash of the run's last adapter (adapter.gguf is the best validated one)."""
    return adapter_sha256(LoraAdapter.load(run_dir / "adapter.last.gguf"))


def test_data_parallel_replicas_are_identical_and_exchange_16_bytes_per_step(tiny_gguf, sentiment_dir, tmp_path, capsys):
    steps = 6
    two = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "two", steps, "--workers", "2"))
    assert two["workers"] == 2 and two["parallel"] == "data" and two["threads_per_worker"] == 1
    assert two["replicas_identical"] and len(two["replica_sha256"]) == 2
    assert two["replica_sha256"][0] == adapter_hash(tmp_path / "two")  # the hash is of the adapter rank 0 wrote
    # Payload: the two loss sums (float64) per step, never the adapter; nothing sent at start but the handshake.
    assert two["bytes_per_step_per_worker"] == 16 and two["bytes_per_step_by_rank"] == [16, 16]  # target: <= 64
    assert two["join_bytes"] == 0 and two["largest_payload_bytes"] <= 72 < two["adapter_bytes"]
    assert [r["step"] for r in step_lines(tmp_path / "two")] == list(range(1, steps + 1))
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["distributed"] == {"mode": "data", "world_size": 2}

    # Against one worker on the same batches: same seeds; step 1 (same theta) gives the same projected gradient
    # up to llama.cpp's batch-composition effects (each rank decodes 2 sequences instead of 4), then the
    # trajectories drift apart by those rounding differences.
    one = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "one", steps))
    a, b = step_lines(tmp_path / "one"), step_lines(tmp_path / "two")
    assert [r["seeds"] for r in a] == [r["seeds"] for r in b]
    np.testing.assert_allclose(b[0]["projected_grads"], a[0]["projected_grads"], rtol=1e-4)
    np.testing.assert_allclose(b[0]["loss"], a[0]["loss"], rtol=1e-6)
    assert two["valid_accuracy"] == pytest.approx(one["valid_accuracy"], abs=0.13)  # 16 examples: 2 may flip


def test_data_parallel_on_one_rank_is_bit_identical_to_the_single_process_run(tiny_gguf, sentiment_dir, tmp_path, capsys):
    argv = finetune_args(tiny_gguf, sentiment_dir, tmp_path / "rank", 5)
    codes, results, errors = finish(start_ranks([argv], tmp_path), tmp_path)
    assert codes == [0], errors[0][-2000:]
    run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "plain", 5))
    assert results[0]["replica_sha256"] == [adapter_hash(tmp_path / "plain")]
    def untimed(run_dir):
        return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds", "rss_bytes")}
                for r in step_lines(run_dir)]

    assert untimed(tmp_path / "rank") == untimed(tmp_path / "plain")  # seeds, losses, projected gradients


# ConMeZO with a short momentum (0.5) so that its cone moves every direction from step 2 on
ESTIMATORS = {"mezo": (), "conmezo": ("--estimator", "conmezo", "--cone-momentum", "0.5")}


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_direction_parallel_is_bit_identical_to_one_worker_with_n_directions(tiny_gguf, sentiment_dir, tmp_path, capsys,
                                                                              estimator):
    steps, flags = 5, ESTIMATORS[estimator]
    two = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "two", steps, "--workers", "2",
                                         "--parallel", "direction", *flags))
    assert two["replicas_identical"]
    assert two["bytes_per_step_per_worker"] == 24  # (seed, L+, L-) as float64
    one = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "one", steps, "--n-directions", "2", *flags))
    assert two["replica_sha256"][0] == adapter_hash(tmp_path / "one")
    assert [(r["seeds"], r["projected_grads"]) for r in step_lines(tmp_path / "two")] == \
           [(r["seeds"], r["projected_grads"]) for r in step_lines(tmp_path / "one")]
    assert two["valid_loss"] == one["valid_loss"]  # the sharded validation adds up to the same totals


KILL_AT = 4  # rank 1 SIGKILLs itself as this step begins


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_a_dead_rank_stops_the_other_with_a_checkpoint_and_the_restart_is_exact(tiny_gguf, sentiment_dir, tmp_path, capsys,
                                                                                estimator):
    run, flags = tmp_path / "run", ESTIMATORS[estimator]
    argv = finetune_args(tiny_gguf, sentiment_dir, run, 2000, "--eval-every", "0", "--save-every", "1000", *flags)
    procs = start_ranks([argv, argv], tmp_path, commands=[None, dying_cli(KILL_AT, argv)])  # rank 1 dies at step 4
    codes, _, errors = finish(procs, tmp_path)
    assert codes == [130, -signal.SIGKILL], errors[0][-2000:]
    assert "lost contact with another rank after step" in errors[0] and "continue with --resume" in errors[0]
    state = json.loads((run / "state.json").read_text())
    done = state["step"]
    assert done == len(step_lines(run)) == KILL_AT - 1  # the checkpoint is the last step both ranks completed
    assert ("optimizer" in state) == (estimator == "conmezo")  # ConMeZO's momentum is saved with it
    # The restarted rank 1 comes back with nothing (an empty --out, as on a new machine): it rebuilds the
    # adapter from the seed init and the step log that rank 0 sends, no weights.
    argvs = [finetune_args(tiny_gguf, sentiment_dir, out, 12, "--resume", *flags) for out in (run, tmp_path / "empty")]
    codes, results, errors = finish(start_ranks(argvs, tmp_path), tmp_path)
    assert codes == [0, 0], "\n".join(e[-1500:] for e in errors)
    assert results[0]["replicas_identical"] and results[0]["join_bytes"] == 8 + done * 3 * 8
    assert not (tmp_path / "empty").exists()  # ranks > 0 write nothing
    whole = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "whole", 12, "--workers", "2", *flags))
    assert results[0]["replica_sha256"] == whole["replica_sha256"]
    assert [r["step"] for r in step_lines(run)] == list(range(1, 13))


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_a_late_rank_catches_up_from_its_older_checkpoint_and_the_step_log(tiny_gguf, sentiment_dir, tmp_path, capsys,
                                                                           estimator):
    def args(out, steps, *extra):
        return finetune_args(tiny_gguf, sentiment_dir, out, steps, "--workers", "2", *ESTIMATORS[estimator], *extra)

    first, old = tmp_path / "first", tmp_path / "old"
    run_json(capsys, args(first, 4))
    shutil.copytree(first, old)  # a machine that kept its copy of the run at step 4
    resumed = run_json(capsys, args(first, 6, "--resume"))  # both ranks load first's checkpoint: nothing to send
    assert resumed["join_bytes"] == 0
    codes, results, errors = finish(start_ranks([args(first, 8, "--resume"), args(old, 8, "--resume")], tmp_path), tmp_path)
    assert codes == [0, 0], "\n".join(e[-1500:] for e in errors)
    result = results[0]
    assert result["replicas_identical"] and result["steps"] == 8
    # Only the log of steps 5 and 6 crossed the network: 8 bytes of header + 2 rows of (lr, seed, grad).
    assert result["join_bytes"] == 8 + 2 * 3 * 8 and result["largest_payload_bytes"] < result["adapter_bytes"]
    assert not (old / "checkpoint-000008.gguf").exists()  # ranks > 0 write nothing
    whole = run_json(capsys, args(tmp_path / "whole", 8))
    assert result["replica_sha256"] == whole["replica_sha256"]


def test_ranks_with_different_configurations_refuse_to_train(tiny_gguf, sentiment_dir, tmp_path):
    argv = finetune_args(tiny_gguf, sentiment_dir, tmp_path / "run", 4)
    other = [*argv, "--learning-rate", "0.02"]
    codes, outputs, errors = finish(start_ranks([argv, other], tmp_path), tmp_path)
    assert codes == [1, 1], (outputs, errors)
    assert "rank(s) [1] run a different configuration or training data than rank 0" in errors[0]


def test_data_parallel_needs_a_batch_divisible_by_the_workers():
    with pytest.raises(EdgezoError, match="--batch-size 5 is not divisible by 2 workers"):
        Group(DistConfig("data"), rank=0, world=2).engine_batch_size(5)
    assert Group(DistConfig("direction"), rank=0, world=2).engine_batch_size(5) == 5
    with pytest.raises(EdgezoError, match="--parallel must be one of data, direction"):
        DistConfig("pipeline")


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair (bench/netns.py); skipped, saying why, where they cannot be made."""
    try:
        with netns.two_hosts() as hosts:
            yield hosts
    except netns.HostsUnavailable as exc:
        pytest.skip(f"cannot build the two-host network: {exc}")


def test_torchrun_on_two_hosts_trains_the_same_adapter_as_two_local_workers(two_hosts, tiny_gguf, sentiment_dir,
                                                                            tmp_path, capsys):
    """The README's two-machine command: one torchrun per host (static rendezvous on host 0's address), gloo over
    the veth link, each host its own run directory. The result must equal `--workers 2` on one machine."""
    steps, port = 6, free_port()
    procs = []
    for node, host in enumerate(two_hosts):
        argv = finetune_args(tiny_gguf, sentiment_dir, tmp_path / f"host{node}", steps)
        cmd = host.command([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                            "--nproc-per-node", "1", "--master-addr", two_hosts[0].address, "--master-port", str(port),
                            "-m", "edgezo.cli", *argv])
        with open(tmp_path / f"host{node}.out", "w") as out, open(tmp_path / f"host{node}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err,
                                          env={**os.environ, "GLOO_SOCKET_IFNAME": host.device}))
    codes = [p.wait(timeout=300) for p in procs]
    errors = [(tmp_path / f"host{n}.err").read_text() for n in range(2)]
    assert codes == [0, 0], "\n".join(e[-2000:] for e in errors)
    result = json.loads((tmp_path / "host0.out").read_text().strip().splitlines()[-1])
    assert result["replicas_identical"] and result["bytes_per_step_per_worker"] == 16
    assert not (tmp_path / "host1").exists()  # only rank 0 writes a run directory
    assert two_hosts[1].counters()["tx_packets"] > 0  # the ranks did talk over the link
    local = run_json(capsys, finetune_args(tiny_gguf, sentiment_dir, tmp_path / "local", steps, "--workers", "2"))
    assert result["replica_sha256"] == local["replica_sha256"]
