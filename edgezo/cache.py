"""What $EDGEZO_HOME holds, area by area, and clearing areas: a phone or a board has little storage, and the files
edgezo derives (quantized models, split parts, hidden-state tables) can outgrow the downloads they come from."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .files import EdgezoError, home


@dataclass(frozen=True)
class CacheArea:
    name: str  # its directory under $EDGEZO_HOME
    holds: str
    comes_back: str  # what a run does when it needs the area's files again
    derived: bool  # made on this machine from other files (else downloaded)


AREAS = (
    CacheArea("models", "downloaded base models (GGUF)", "downloaded again by `edgezo fetch` or a run", False),
    CacheArea("datasets", "downloaded and split datasets", "downloaded again", False),
    CacheArea("hf", "base models as Hugging Face files for the torch reference", "converted again", True),
    CacheArea("quantized", "base models requantized for --quant", "requantized by the next run (minutes)", True),
    CacheArea("split", "prefix / suffix parts of a base for --prefix-reuse", "rewritten by the next run", True),
    CacheArea("hidden-states", "--prefix-reuse cache tables", "recomputed by the next run (minutes)", True),
)
BY_NAME = {a.name: a for a in AREAS}


@dataclass(frozen=True)
class AreaUsage:
    area: CacheArea
    path: Path
    n_files: int
    n_bytes: int


def usage(root: Path | None = None, areas=AREAS) -> list[AreaUsage]:
    """Files and bytes of each of `areas` (0 where the directory does not exist)."""
    root = root or home()
    out = []
    for area in areas:
        files = [p for p in (root / area.name).rglob("*") if p.is_file()] if (root / area.name).is_dir() else []
        out.append(AreaUsage(area, root / area.name, len(files), sum(p.stat().st_size for p in files)))
    return out


def resolve_areas(spec: str) -> list[CacheArea]:
    """'derived', 'all' or comma-separated area names -> the areas; an unknown name is refused with the known ones."""
    if spec == "derived":
        return [a for a in AREAS if a.derived]
    if spec == "all":
        return list(AREAS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise EdgezoError(f"unknown cache area {', '.join(unknown) or repr(spec)}; choose derived, all or "
                          f"{', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names]


def clear(areas: list[CacheArea], root: Path | None = None) -> int:
    """Remove the areas' directories; the bytes freed. A run that has a file of them open keeps reading it (Linux
    frees it at close); the next run remakes or downloads what it needs."""
    freed = 0
    for u in usage(root, areas):  # only the areas cleared are walked
        if u.path.is_dir():
            shutil.rmtree(u.path)
            freed += u.n_bytes
    return freed
