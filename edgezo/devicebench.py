"""`edgezo bench`: llama-bench's figures for fine-tuning, measured on this device, each configuration in fresh processes.

A point is (model file, batch size B, prompt tokens P, generated tokens N). Its "llama" child builds an Engine of
B sequences of max(P, N) tokens and a synthetic batch: B sequences of exactly P tokens cut from a fixed text by the
model's own tokenizer, two label tokens (the default fine-tuning task's shape). Then, each timed `repeats` times
after `warmup` untimed calls:
    pp    Engine.logits of the batch in one decode, logits at each sequence's last token, no adapter:
          tokens_per_s = B * P / seconds. This is also the bare forward the MeZO step is compared with.
    tg    B one-token prompts, N greedy decodes each (Engine.generate_greedy, end of generation ignored, as
          llama-bench's tg does): tokens_per_s = B * N / seconds, from an empty context
    mezo  the default LoRA (edgezo.adapter.LoraConfig()) set on the engine, then edgezo.mezo.mezo_step with
          edgezo.objective.loss_function on the same batch, as bench/mezo_step.py times it; the ratio of each
          step over two of the bare forwards (a two-sided step evaluates the loss twice: 1.0 is the floor)
The child's peak RSS is that of a short MeZO run (the warm-up and timed steps); it sits beside the memory accountant's
prediction for the same engine (edgezo.memory.predict_llama_cpp, what `edgezo memory --method mezo` computes).
With the torch extra a "bp" child times one AdamW step of edgezo.reference on the same batch (what `edgezo
reference-bp` runs: the GGUF dequantized to float32, the same LoRA, initial adapter and loss); its peak RSS sits
beside edgezo.memory.predict_torch.

Every child runs under a small launcher that reads the child's own ru_maxrss from wait4 (see _LAUNCHER), so a peak RSS
is that child's alone; a crash (a signal, a non-zero exit, a timeout) becomes a failed row instead of ending the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .files import EdgezoError

TORCH_EXTRA = ("torch", "transformers", "peft")  # what edgezo.reference imports
# The synthetic sequences are windows of this text's tokens, each starting PROMPT_STRIDE tokens after the previous
# one: real tokens of the model's vocabulary, no dataset to fetch, and every sequence exactly P tokens long.
SYNTHETIC_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small lamp and a notebook "
    "in which he wrote down the colour of the sea, the direction of the wind and the names of the ships that passed. "
    "Over forty years the notebook became a library: storms that bent the pines, summers without a single cloud, a "
    "whale that followed a fishing boat into the harbour, children who learned to swim between the rocks below. "
    "When the light was finally automated, the town asked him what he would miss most, and he said it was not the "
    "view but the counting, because a thing you count every day is a thing you never stop seeing."
)
PROMPT_STRIDE = 7
CHILD_GRACE_S = 10.0  # after a timeout's SIGTERM, before SIGKILL

# Linux keeps a process's peak RSS (ru_maxrss) across fork and exec: a child of this process would start with our
# own high-water mark. So every child is started by this launcher, a fresh interpreter of ~10 MiB, whose wait4 gives
# the child's own ru_maxrss (the approach of bench/common.py's run_fresh). The launcher's report is the last line of
# stdout, after whatever the child printed. SIGTERM (a timeout) is passed on; SIGINT reaches the child directly from
# the terminal's process group, so the launcher ignores it and still reports.
_LAUNCHER = """
import json, os, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen(sys.argv[1:])
signal.signal(signal.SIGTERM, lambda sig, frame: child.send_signal(sig))
_, status, usage = os.wait4(child.pid, 0)
scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "peak_rss_bytes": usage.ru_maxrss * scale}))
"""
# What each child runs: run_child on the JSON payload, its result as one JSON line. (Tests replace it to crash one.)
CHILD_PROGRAM = ("import json, sys; from edgezo.devicebench import run_child; "
                 "print(json.dumps(run_child(json.loads(sys.argv[1]))), flush=True)")

COLUMNS = ("model", "quant", "batch_size", "prompt_tokens", "gen_tokens", "status",
           "pp_tokens_per_s", "pp_tokens_per_s_sd", "tg_tokens_per_s", "tg_tokens_per_s_sd",
           "mezo_step_s", "mezo_step_s_sd", "mezo_step_over_two_forwards", "mezo_step_over_two_forwards_sd",
           "mezo_peak_rss_bytes", "mezo_predicted_rss_bytes",
           "bp_step_s", "bp_step_s_sd", "bp_peak_rss_bytes", "bp_predicted_rss_bytes", "note")


@dataclass(frozen=True)
class BenchPoint:
    """One row of the table: a model file and the shape of its batch."""

    model: str  # as the user named it: a built-in name or a GGUF path
    quant: str | None  # the requantization applied (None: the file as it is)
    model_path: str  # the resolved GGUF
    batch_size: int  # sequences per decode: the pp batch, the tg streams, the MeZO and BP batch
    prompt_tokens: int  # tokens per sequence of pp, MeZO and BP
    gen_tokens: int  # tokens generated per sequence (tg)

    def __post_init__(self):
        if min(self.batch_size, self.prompt_tokens, self.gen_tokens) < 1:
            raise EdgezoError(f"batch size, prompt and generated tokens must be >= 1, got {self.batch_size}, "
                              f"{self.prompt_tokens} and {self.gen_tokens}")

    @property
    def n_ctx_per_seq(self) -> int:
        """Context per sequence of the llama child's engine: the prompt, or N generated tokens from position 0."""
        return max(self.prompt_tokens, self.gen_tokens)


@dataclass(frozen=True)
class BenchConfig:
    repeats: int = 3  # timed calls of each measurement
    warmup: int = 1  # untimed calls before them (the first decode builds llama.cpp's graph)
    threads: int = 0  # llama.cpp and torch threads; 0: the engine's choice (the load), torch's default
    seed: int = 0  # the initial adapter and the MeZO directions
    bp: bool = True  # also time a BP step where the torch extra is installed
    timeout_s: float = 1800.0  # per child process
    busy_processes: int = 0  # busy loops kept running while everything is measured (a device doing other things)
    busy_nice: int = 0  # their nice value (0: normal priority, 19: lowest)

    def __post_init__(self):
        if self.busy_processes < 0 or not 0 <= self.busy_nice <= 19:
            raise EdgezoError(f"busy processes must be >= 0 and their nice value 0-19, got {self.busy_processes} "
                              f"and {self.busy_nice}")
        if self.repeats < 1 or self.warmup < 0:
            raise EdgezoError(f"repeats must be >= 1 and warm-up >= 0, got {self.repeats} and {self.warmup}")
        if not self.timeout_s > 0:
            raise EdgezoError(f"the timeout must be > 0 s, got {self.timeout_s}")


BUSY_LOOP = "while True: pass"


@contextlib.contextmanager
def busy_loops(n: int, nice: int):
    """`n` processes spinning on the CPU at `nice` for the duration (bench/busy.py's loads), killed on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], preexec_fn=(lambda: os.nice(nice)) if nice else None)
             for _ in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


# ---- statistics -------------------------------------------------------------------------------------------------
def summary(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value, as llama-bench prints), min, max, n and values."""
    if not values:
        raise ValueError("no measurements to summarise")
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values), "n": len(values),
            "values": list(values)}


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return seconds


# ---- what the children measure ----------------------------------------------------------------------------------
def synthetic_batch(vocab, batch_size: int, prompt_tokens: int):
    """(B examples of exactly P tokens, a two-label classification Task), tokenized by `vocab` (an Engine or
    Vocabulary). The loss reads two logits at each sequence's last token, as the default fine-tuning task does;
    which two tokens are the labels changes nothing of its cost."""
    from .data import Example, Format, Task

    pool = vocab.tokenize(SYNTHETIC_TEXT, add_special=False)
    prefix = vocab.tokenize("", add_special=True)  # BOS where the model wants one
    labels = tuple(dict.fromkeys(pool))[:2]
    if len(labels) < 2:
        raise EdgezoError("the synthetic text tokenizes to fewer than two distinct tokens")
    batch = []
    for i in range(batch_size):
        start = i * PROMPT_STRIDE
        window = [pool[(start + j) % len(pool)] for j in range(prompt_tokens)]
        tokens = tuple((prefix + window)[:prompt_tokens])
        batch.append(Example(tokens, target_start=len(tokens), label=i % 2))
    return batch, Task(format=Format.CLASSIFICATION, labels=("first", "second"), label_token_ids=labels)


def _fixed_length_engine(model_path: str, config):
    """An Engine whose generation never stops at an end-of-generation token: like llama-bench's tg, a timed run
    generates exactly N tokens per sequence whatever they are."""
    from .engine import Engine  # here, not at the top: the parent process never loads llama.cpp for this module

    class FixedLengthEngine(Engine):
        def is_end_of_generation(self, token: int) -> bool:
            return False

    return FixedLengthEngine(model_path, config)


def measure_llama(point: BenchPoint, config: BenchConfig) -> dict:
    """pp, tg and MeZO steps in this process (see the module docstring). Seconds per call, lists of `repeats`."""
    from .adapter import LoraAdapter, LoraConfig, read_base_model_info
    from .engine import EngineConfig, system_info
    from .mezo import MezoConfig, mezo_step
    from .objective import loss_function

    # The base model's info first, as edgezo.resolve.open_engine reads it: gguf's reader holds large Python objects
    # while it lives, which would otherwise add to the engine's peak RSS (and the prediction assumes this order).
    base = read_base_model_info(point.model_path)
    engine_config = EngineConfig(n_seq_max=point.batch_size, n_ctx_per_seq=point.n_ctx_per_seq, n_threads=config.threads)
    with _fixed_length_engine(point.model_path, engine_config) as engine:
        batch, task = synthetic_batch(engine, point.batch_size, point.prompt_tokens)
        sequences = [ex.tokens for ex in batch]
        positions = [[len(s) - 1] for s in sequences]
        forward_s = timed(lambda: engine.logits(sequences, positions, columns=task.label_token_ids),
                          config.warmup, config.repeats)
        prompts, generated = [s[:1] for s in sequences], []

        def generate():
            generated[:] = engine.generate_greedy(prompts, [point.gen_tokens] * len(prompts))

        generate_s = timed(generate, config.warmup, config.repeats)
        adapter = LoraAdapter.init(base, LoraConfig(), seed=config.seed)
        engine.set_adapter(adapter)
        loss = loss_function(engine, batch, task)
        n_steps = config.warmup + config.repeats
        steps = iter(range(n_steps))
        step_s = timed(lambda: mezo_step(adapter.tensors, loss, MezoConfig(), config.seed, next(steps), n_steps),
                       config.warmup, config.repeats)
        n_threads = engine.n_threads
    return {"forward_s": forward_s, "generate_s": generate_s, "mezo_step_s": step_s,
            "n_generated_tokens": sum(len(g) for g in generated), "n_prompt_tokens": sum(map(len, sequences)),
            "n_adapter_params": adapter.n_params, "n_threads": n_threads, "system_info": system_info()}


def prepare_bp(point: BenchPoint) -> dict:
    """The GGUF as a transformers directory (converted once, cached): in its own process, so the conversion's memory
    is not counted in the BP child's peak."""
    from . import reference

    return {"hf_dir": str(reference.hf_model_dir(Path(point.model_path)))}


def measure_bp(point: BenchPoint, config: BenchConfig) -> dict:
    """AdamW steps of the torch reference (reference-bp's defaults: float32 weights) on the synthetic batch."""
    from . import reference
    from .adapter import LoraAdapter, LoraConfig, read_base_model_info
    from .engine import Vocabulary
    from .mezo import MezoConfig

    if config.threads:
        reference.torch.set_num_threads(config.threads)
    base = read_base_model_info(point.model_path)
    with Vocabulary(point.model_path) as vocab:  # llama.cpp's tokenizer: the token ids the llama child used
        batch, task = synthetic_batch(vocab, point.batch_size, point.prompt_tokens)
    adapter = LoraAdapter.init(base, LoraConfig(), seed=config.seed)
    model = reference.load_model(Path(point.model_path), adapter, base, reference.ReferenceConfig())
    n_steps = config.warmup + config.repeats
    stepper = reference.BackpropStepper(model, reference.TorchScorer(model), task, base, MezoConfig(), n_steps)
    steps = iter(range(n_steps))
    step_s = timed(lambda: stepper.step(batch, next(steps)), config.warmup, config.repeats)
    # the accountant counts only the embedding rows a run reads
    token_ids = sorted({t for ex in batch for t in ex.tokens} | set(task.label_token_ids))
    return {"bp_step_s": step_s, "token_ids": token_ids, "n_threads": reference.torch.get_num_threads()}


def run_child(payload: dict) -> dict:
    """The entry point of a child process (CHILD_PROGRAM): one role on one point."""
    point, config = BenchPoint(**payload["point"]), BenchConfig(**payload["config"])
    roles = {"llama": lambda: measure_llama(point, config), "bp": lambda: measure_bp(point, config),
             "prepare-bp": lambda: prepare_bp(point)}
    return roles[payload["role"]]()


# ---- running the children ----------------------------------------------------------------------------------------
def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_in_child(role: str, point: BenchPoint, config: BenchConfig) -> dict:
    """run_child(role, point) in a fresh interpreter under _LAUNCHER.

    {"ok": True, "result": the child's dict, "peak_rss_bytes", "seconds"} or, on a crash, a timeout or a missing
    result, {"ok": False, "error": one line, "returncode", "stderr_tail", "seconds"} (and "signal" when killed)."""
    payload = json.dumps({"role": role, "point": asdict(point), "config": asdict(config)})
    cmd = [sys.executable, "-c", _LAUNCHER, sys.executable, "-c", CHILD_PROGRAM, payload]
    t0, timed_out = time.perf_counter(), False
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=config.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.terminate()  # the launcher passes it on to the child, then reports
            try:
                out, err = proc.communicate(timeout=CHILD_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    lines = [line for line in out.splitlines() if line.strip()]
    stderr_tail = err.strip().splitlines()[-5:]
    report = _json_line(lines, -1)
    if "peak_rss_bytes" not in report:  # the launcher itself did not finish
        report = {"returncode": proc.returncode, "peak_rss_bytes": None}
    code = report["returncode"]
    failure = {"ok": False, "returncode": code, "stderr_tail": stderr_tail, "seconds": seconds}
    if timed_out:
        return {**failure, "error": f"timed out after {config.timeout_s:g} s"}
    if code < 0:
        return {**failure, "signal": -code, "error": f"killed by {_signal_name(-code)}"}
    if code != 0:
        last = stderr_tail[-1] if stderr_tail else "no message"
        return {**failure, "error": f"exit {code}: {last}"}
    result = _json_line(lines, -2)
    if not result:
        return {**failure, "error": "the child printed no result"}
    return {"ok": True, "result": result, "peak_rss_bytes": report["peak_rss_bytes"], "seconds": seconds}


def _json_line(lines: list[str], index: int) -> dict:
    """lines[index] as a JSON object, {} if there is none."""
    try:
        value = json.loads(lines[index])
    except (IndexError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def torch_extra_missing() -> list[str]:
    """The torch extra's packages this interpreter cannot import (found without importing them)."""
    return [name for name in TORCH_EXTRA if importlib.util.find_spec(name) is None]


def machine_info() -> dict:
    from . import kernels, threads
    from .doctor import installed_version

    return {"cpu": kernels.cpu_model_name(), "n_cores": os.cpu_count(), "usable_cores": threads.usable_cores(),
            "load_average": list(os.getloadavg()), "python": sys.version.split()[0],
            "versions": {name: installed_version(name) for name in ("llama-cpp-python", *TORCH_EXTRA)}}


# ---- the table ---------------------------------------------------------------------------------------------------
def predicted_rss_bytes(point: BenchPoint, token_ids: Sequence[int] | None,
                        system_info: str | None = None) -> tuple[int, int]:
    """(MeZO, BP) peak RSS as edgezo.memory predicts them for the children's runs: the llama child's engine
    (B sequences of n_ctx_per_seq cells, P tokens each decoded, the default LoRA) and reference-bp's float32 run on
    the same batch (two label columns; `token_ids` the rows it reads, None: every row). system_info: the llama
    child's build (which weights it repacks); None: edgezo.memory's calibration build."""
    from .adapter import LoraConfig
    from .memory import CALIBRATION_SYSTEM_INFO, predict_llama_cpp, predict_torch, read_model_shape

    shape = read_model_shape(point.model_path)
    mezo = predict_llama_cpp(shape, "mezo", point.batch_size, point.n_ctx_per_seq, lora=LoraConfig(),
                             n_tokens_per_seq=point.prompt_tokens, system_info=system_info or CALIBRATION_SYSTEM_INFO)
    bp = predict_torch(shape, "bp", point.batch_size, point.prompt_tokens, lora=LoraConfig(), logit_cols=2,
                       token_ids=None if token_ids is None else set(token_ids))
    return mezo.total_bytes, bp.total_bytes


def _mean_sd(row: dict, key: str, values: list[float]) -> None:
    stats = summary(values)
    row[key], row[f"{key}_sd"] = stats["mean"], stats["sd"]


def make_row(point: BenchPoint, llama: dict, bp: dict | None) -> dict:
    """The flat row of COLUMNS (None where a part failed or was not run: bp None), plus "details": the children's
    raw outcomes (every timing, threads, stderr of a failure). Its note names what failed and why."""
    row = dict.fromkeys(COLUMNS)
    row.update(model=point.model, quant=point.quant or "as is", batch_size=point.batch_size,
               prompt_tokens=point.prompt_tokens, gen_tokens=point.gen_tokens)
    notes = []
    if llama["ok"]:
        r = llama["result"]
        forward, generate, step = r["forward_s"], r["generate_s"], r["mezo_step_s"]
        _mean_sd(row, "pp_tokens_per_s", [r["n_prompt_tokens"] / s for s in forward])
        _mean_sd(row, "tg_tokens_per_s", [r["n_generated_tokens"] / s for s in generate])
        _mean_sd(row, "mezo_step_s", step)
        # repeat i's step over two of repeat i's bare forwards
        _mean_sd(row, "mezo_step_over_two_forwards", [s / (2 * f) for s, f in zip(step, forward)])
        row["mezo_peak_rss_bytes"] = llama["peak_rss_bytes"]
    else:
        notes.append(f"MeZO child failed: {llama['error']}")
    if bp is not None and bp["ok"]:
        _mean_sd(row, "bp_step_s", bp["result"]["bp_step_s"])
        row["bp_peak_rss_bytes"] = bp["peak_rss_bytes"]
    elif bp is not None:
        notes.append(f"BP child failed: {bp['error']}")
    try:
        token_ids = bp["result"]["token_ids"] if bp is not None and bp["ok"] else None
        built = llama["result"].get("system_info") if llama["ok"] else None
        row["mezo_predicted_rss_bytes"], bp_predicted = predicted_rss_bytes(point, token_ids, built)
        if bp is not None:
            row["bp_predicted_rss_bytes"] = bp_predicted
    except (EdgezoError, OSError, ValueError) as exc:
        notes.append(f"no prediction: {exc}")
    row["status"] = "ok" if llama["ok"] and (bp is None or bp["ok"]) else "failed"
    row["note"] = "; ".join(notes)
    row["details"] = {"model_path": point.model_path, "llama": llama, "bp": bp}
    return row


def run_bench(points: Sequence[BenchPoint], config: BenchConfig,
              on_child: Callable[[str, int, int], None] = lambda label, done, total: None) -> dict:
    """Every point in its own child processes, in order; on_child(label, n_done, n_total) before each child starts.

    A failed child fails its row, never the run. BP runs where config.bp and the torch extra is installed; the first
    BP of each model file is preceded by a child that converts it for transformers (once; cached)."""
    t0 = time.perf_counter()
    missing = torch_extra_missing()
    with_bp = config.bp and not missing
    bp_skipped = None if with_bp else ("--no-bp" if not config.bp else f"the torch extra is not installed "
                                       f"({', '.join(missing)} missing: pip install 'edgezo[torch]')")
    paths = list(dict.fromkeys(p.model_path for p in points))
    total = len(points) * (2 if with_bp else 1) + (len(paths) if with_bp else 0)
    done, prepared = 0, {}

    def child(role: str, point: BenchPoint, label: str) -> dict:
        nonlocal done
        on_child(label, done, total)
        outcome = run_in_child(role, point, config)
        done += 1
        return outcome

    with busy_loops(config.busy_processes, config.busy_nice):
        rows = [measure_point(point, child, with_bp, prepared) for point in points]
    on_child("done", total, total)
    return {"columns": list(COLUMNS), "rows": rows, "machine": machine_info(),
            "repeats": config.repeats, "warmup": config.warmup, "threads": config.threads, "seed": config.seed,
            "busy": {"processes": config.busy_processes, "nice": config.busy_nice},
            "bp": with_bp, "bp_skipped": bp_skipped, "seconds": time.perf_counter() - t0}


def measure_point(point: BenchPoint, child: Callable[[str, BenchPoint, str], dict], with_bp: bool,
                  prepared: dict) -> dict:
    """One row: the llama child, then (with BP) the conversion for torch once per model file and the BP child."""
    label = f"{Path(point.model).name} {point.quant or ''} b{point.batch_size} p{point.prompt_tokens} n{point.gen_tokens}"
    llama = child("llama", point, f"{label}: pp, tg, MeZO")
    bp = None
    if with_bp:
        if point.model_path not in prepared:
            prepared[point.model_path] = child("prepare-bp", point, f"{label}: converting for torch")
        prep = prepared[point.model_path]
        bp = (child("bp", point, f"{label}: BP") if prep["ok"]
              else {**prep, "error": f"converting the model for torch: {prep['error']}"})
    return make_row(point, llama, bp)
