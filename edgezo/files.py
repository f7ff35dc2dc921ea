"""Crash-safe file writes and small file helpers shared by the store, the trainer and export.

A phone kills a fine-tune at any moment; a file under its final name must therefore always be complete.
Every write goes to a temporary file in the same directory, is fsync'ed, then renamed over the target
(rename is atomic on POSIX within one file system), and the directory is fsync'ed so the rename survives.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class EdgezoError(Exception):
    """An error the user can fix: the message names the input and the problem. The CLI prints it and exits 1."""


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success fsync it and rename it to `target`.

    On any exception the temporary file is removed and an existing `target` is left untouched.
    """
    target = Path(target)
    directory = target.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise EdgezoError(f"cannot write {target}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the final file gets the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_directory(directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EdgezoError(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json_atomic(target: str | os.PathLike, obj) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def copy_atomic(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """`target` becomes a copy of `source`, never half-written."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def write_npz_atomic(target: str | os.PathLike, arrays: dict) -> None:
    """Named arrays as one .npz (numpy's own format; through a file object, so numpy adds no suffix)."""
    import numpy as np

    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM), 0 where /proc is missing."""
    return _proc_status_kib("VmHWM") * 1024


def current_rss_bytes() -> int:
    return _proc_status_kib("VmRSS") * 1024


# glibc's mallopt parameter M_MMAP_THRESHOLD (malloc.h): allocations of at least this many bytes get a mapping of
# their own, unmapped when freed. Setting it also stops glibc from raising the threshold by itself.
_M_MMAP_THRESHOLD = -3
# One LoRA tensor of rank 16 (16 x 896 float32 = 56 KiB for Qwen2.5-0.5B) stays on the heap; activations do not.
TRAINING_MMAP_THRESHOLD_BYTES = 64 * 1024


def map_large_allocations(threshold_bytes: int = TRAINING_MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc give every allocation of at least `threshold_bytes` its own mapping, returned to the kernel when
    freed, for a torch training process. By default glibc raises its threshold to the largest mapped block freed
    (up to 32 MiB), which loading a model does, so a step's activations then come from the heap, and the holes they
    leave stay resident and are not all reused by later blocks and steps: on Qwen2.5-Coder-0.5B's Q4_0 blocks with
    checkpointing (batch 16), 18 MiB per block during the first forward and 2169 MiB after step 1, against 1231 MiB
    with the threshold fixed here. Returns False, changing nothing, where the C library has no mallopt or refuses
    it, or where the user chose a threshold (MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES): theirs wins."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library to load, or one without mallopt (macOS)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1


def _proc_status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---- the cache directory and its file digests ----
def home() -> Path:
    """edgezo's cache: built-in models and data, requantized and split files, digests."""
    return Path(os.environ.get("EDGEZO_HOME") or Path.home() / ".cache" / "edgezo")


def _hash_cache_path() -> Path:
    return home() / "sha256-cache.json"


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, recomputed only when its (size, mtime_ns, inode) changed since the last time.

    Hashing a multi-GB GGUF takes seconds to minutes on a small device; a rewrite, truncation or replacement of the
    file changes at least one of the three, so the cached digest is reused only for the same bytes on disk."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    cache_file = _hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(str(path)) if isinstance(cache, dict) else None
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) and "sha256" in entry:
        return entry["sha256"]
    digest = sha256_file(path)
    cache = {k: v for k, v in (cache if isinstance(cache, dict) else {}).items() if Path(k).exists()}  # drop gone files
    cache[str(path)] = {**stamp, "sha256": digest}
    try:
        write_json_atomic(cache_file, cache)
    except EdgezoError:
        pass  # a read-only cache directory only costs the next run a re-hash
    return digest
