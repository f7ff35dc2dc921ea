"""Device profiles: the RAM an app may use on a device (edgezo/device_profiles/*.toml)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from ..files import EdgezoError
from .llama_terms import ANY_BUILD_SYSTEM_INFO


# Package data (importlib.resources): an installed wheel has the profiles as well as a checkout.
PROFILE_DIR = resources.files("edgezo") / "device_profiles"


@dataclass(frozen=True)
class DeviceProfile:
    key: str
    name: str
    total_ram_bytes: int
    usable_ram_bytes: int
    usable_ram_source: str
    cores: int
    # llama_print_system_info() of the llama.cpp build the device runs (which weights it repacks); a profile without
    # `llama_cpp_system_info` gets ANY_BUILD_SYSTEM_INFO, every rule of every build (the larger prediction)
    llama_cpp_system_info: str = ANY_BUILD_SYSTEM_INFO


def load_device_profile(name: str, directory: Path | Traversable = PROFILE_DIR) -> DeviceProfile:
    """A profile of edgezo's device_profiles/ by NAME, or a path to a .toml file."""
    import tomllib

    path = Path(name) if name.endswith(".toml") else directory / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".toml") for p in directory.iterdir() if p.name.endswith(".toml"))
        raise EdgezoError(f"unknown device profile {name!r}; known: {', '.join(known)}")
    try:
        d = tomllib.loads(path.read_text())
        return DeviceProfile(key=path.name.removesuffix(".toml"), name=d["name"], total_ram_bytes=int(d["total_ram_bytes"]),
                             usable_ram_bytes=int(d["usable_ram_bytes"]), usable_ram_source=d["usable_ram_source"],
                             cores=int(d["cores"]),
                             llama_cpp_system_info=str(d.get("llama_cpp_system_info", ANY_BUILD_SYSTEM_INFO)))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EdgezoError(f"{path}: invalid device profile ({exc})") from None
