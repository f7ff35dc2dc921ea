"""What every benchmark in bench/ shares: machine and version info, a fresh-process runner, statistics, results files.

Method (bench/README.md): each configuration runs in its own fresh process (no warm caches, allocator state or
thread pools carried over from another configuration), does a warm-up, then several timed repetitions; we report
the median and min/max. Comparisons are ratios of figures measured in the same run, because absolute times on a
shared machine drift. Every result line carries the machine, library versions, model sha256 and seed, and the
load average before and after, so a figure measured under load can be told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from edgezo.devicebench import timed  # noqa: F401  (common.timed: the benchmarks' timer is `edgezo bench`'s)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

LIBRARIES = ("llama_cpp_python", "numpy", "gguf", "torch", "transformers", "peft", "accelerate")


# ---- statistics -----------------------------------------------------------------------------------------------
def summary(values: Sequence[float]) -> dict:
    """{median, min, max, n} of repeated measurements (the median resists the outliers of a shared machine)."""
    if not values:
        raise ValueError("no measurements to summarise")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


# ---- machine and versions -------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def versions(names: Sequence[str] = LIBRARIES) -> dict:
    """Installed versions, read from package metadata (importing torch just to ask would cost seconds and RSS)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            pass
    return out


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_bytes": ram_bytes(), "os": platform.platform(),
            "versions": versions(), "load_average": load_average()}


def sha256(path: str | os.PathLike) -> str:
    from edgezo.files import sha256_file

    return sha256_file(path)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---- fresh processes ------------------------------------------------------------------------------------------
class ChildFailed(RuntimeError):
    pass


# ---- the scripts' shared command-line layer ----
def work_dir(text: str) -> Path:
    """argparse type of a --work / --workdir option: a directory, created (with its parents) if missing."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_main(main: Callable[[], int | None]) -> int:
    """A script's main() with the CLI's exit codes: a failed child command, an edgezo error or a file problem ends
    in one line `bench/SCRIPT: error: ...` and exit 1 (no traceback), an interrupt in exit 130."""
    from edgezo.files import EdgezoError

    name = f"bench.{Path(sys.argv[0]).stem}"
    try:
        return main() or 0
    except (ChildFailed, EdgezoError, OSError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


# Linux keeps ru_maxrss across fork and exec: a child starts with the high-water mark of the process that forked it
# (a pytest process holding torch made `python -c pass` report 427 MiB). So every measured command is started by
# this launcher, a fresh interpreter of ~10 MiB, and its figure is the command's own ru_maxrss from wait4, written
# to the file named by argv[1]. SIGTERM is passed on (the timeout's kill); SIGINT reaches the command directly
# from the terminal's process group, so the launcher ignores it, and the command gets it back as the default: an
# ignored signal is inherited through exec, and a Ctrl-C while an edgezo command was still loading (before its
# trainer sets its own handler) was lost, the command training on as an orphan.
_LAUNCHER = """
import os, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen(sys.argv[2:], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
signal.signal(signal.SIGTERM, lambda sig, frame: child.send_signal(sig))
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
if code < 0:  # die of the same signal, so the caller sees the same status
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def run_fresh(cmd: Sequence[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `cmd` in a fresh process; return {stdout, stderr, seconds, peak_rss_bytes, returncode}.

    peak_rss_bytes is the command's own ru_maxrss from wait4 (the kernel's high-water mark of its resident set,
    the same figure as VmHWM), taken by _LAUNCHER, so it is measured the same way whatever the command is and
    whatever it reports, and does not carry this process's high-water mark. Output goes through files, not pipes.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".maxrss") as maxrss:
        t0 = time.perf_counter()
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, maxrss.name, *cmd], stdout=out, stderr=err,
                                env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})})
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the launcher passes it on to the command
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise ChildFailed(f"{' '.join(cmd[:4])} ...: timed out after {timeout:.0f} s") from None
        seconds = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        kib = maxrss.read().strip()
        return {"stdout": out.read(), "stderr": err.read(), "seconds": seconds,
                "peak_rss_bytes": int(kib) * 1024 if kib else None, "returncode": proc.returncode}


def last_json(stdout: str) -> dict:
    """The JSON object on the last non-empty line of stdout (the convention of every edgezo command and child)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ChildFailed("the child printed nothing on stdout")
    return json.loads(lines[-1])


def run_json(cmd: Sequence[str], what: str, env: dict | None = None, timeout: float | None = None) -> dict:
    """run_fresh + parse the last stdout line; the measured peak RSS and wall time are added under `_process`."""
    done = run_fresh(cmd, env=env, timeout=timeout)
    if done["returncode"] != 0:
        raise ChildFailed(f"{what} failed (exit {done['returncode']}):\n{done['stderr'][-3000:]}")
    result = last_json(done["stdout"])
    result["_process"] = {"peak_rss_bytes": done["peak_rss_bytes"], "seconds": done["seconds"]}
    return result


def python_cmd(module: str, *args: object) -> list[str]:
    """`python -m bench.NAME ARGS`: run_fresh puts the checkout on the child's PYTHONPATH, so `bench` imports."""
    return [sys.executable, "-m", module, *map(str, args)]


# ---- results --------------------------------------------------------------------------------------------------
def append_result(name: str, result: dict, directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")
    return path


def write_splits(directory: str | os.PathLike, splits: dict[str, list[dict]]) -> Path:
    """A generated dataset as `directory`/{split}.jsonl, one record per line (what --data DIRECTORY reads)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def write_markdown(name: str, text: str, directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.md"
    path.write_text(text)
    return path


def publish(name: str, title: str, result: dict, text: str, as_json: bool) -> None:
    """Append the result line, rewrite results/<name>.md with the table, and print the result (JSON) or the table."""
    append_result(name, result)
    write_markdown(name, f"# {title}\n\n{text}")
    print(json.dumps(result) if as_json else text)


def child_or_publish(args, name: str, title: str, child: Callable, run: Callable, render: Callable) -> int:
    """A benchmark's main body. Invoked as its own measured child (--child), print the child's figures as JSON for
    the parent; else run the whole benchmark and publish it."""
    if args.child:
        print(json.dumps(child(args)))
        return 0
    result = run(args)
    publish(name, title, result, render(result), args.json)
    return 0


def latest_result(name: str, directory: Path = RESULTS) -> dict | None:
    """The last line of results/<name>.jsonl (the run a table quotes), None if there is none."""
    path = directory / f"{name}.jsonl"
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


# ---- markdown -------------------------------------------------------------------------------------------------
def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mib(n_bytes: float | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.0f} MiB"


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def spread(stats: dict, digits: int = 3, scale: float = 1.0) -> str:
    """'median (min-max)' of a summary() dict."""
    return (f"{stats['median'] * scale:.{digits}f} ({stats['min'] * scale:.{digits}f}-"
            f"{stats['max'] * scale:.{digits}f})")


def provenance(result: dict) -> str:
    """One line under each table: when, on what, and whether the machine was busy."""
    m = result.get("machine", {})
    v = m.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("llama_cpp_python", "torch", "transformers", "peft") if k in v)
    load = m.get("load_average") or []
    note = f"**{result['note']}.** " if result.get("note") else ""
    return (f"{note}Measured {result.get('time', '?')} on {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
            f"{m.get('ram_bytes', 0) / 2**30:.0f} GiB RAM; {libs}; load average at start {load[0] if load else '?'}.")
