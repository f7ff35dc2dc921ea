"""The installed package, not the checkout: a wheel built from the sources, installed in a fresh venv outside the
tree, still finds its package data (device profiles, model families) and its convert subpackage."""
import json
import shutil
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What a wheel is built from: pyproject.toml names the readme; the rest of the checkout must not be needed.
SOURCES = ("pyproject.toml", "README.md", "edgezo")


def run(cmd: list, cwd: Path) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd}: {out.stderr[-2000:]}"
    return out.stdout


def see_running_site_packages(python: Path) -> None:
    """Let the venv of `python` import the dependencies (llama-cpp-python, gguf, numpy) from the site-packages of the
    interpreter running the tests, whether that is a venv, the global Python or a user install. `--system-site-packages`
    would give the base interpreter's instead, which a venv's packages are not in. The paths of a .pth file come after
    the venv's own site-packages, and the .pth files in them are not run (no editable edgezo finder), so the wheel's
    edgezo is the one imported: the assertion on edgezo.__file__ below checks it."""
    paths = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    own = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=python.parent).strip()
    (Path(own) / "running-interpreter.pth").write_text("".join(f"{p}\n" for p in paths))


def test_wheel_installed_outside_the_tree_has_its_package_data(tmp_path, tiny_gguf):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
        cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("edgezo-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    python, edgezo = venv / "bin" / "python", venv / "bin" / "edgezo"
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp_path)
    see_running_site_packages(python)  # after the install: pip would take a non-editable edgezo there as installed
    work = tmp_path / "elsewhere"
    work.mkdir()

    where = run([python, "-c", "import edgezo, edgezo.convert.merge; print(edgezo.__file__)"], cwd=work).strip()
    assert Path(where).is_relative_to(venv), where
    capacity = json.loads(run([edgezo, "capacity", "--device", "raspberry-pi-5-4gb", "--json"], cwd=work))
    assert capacity["device"] == "raspberry-pi-5-4gb" and capacity["methods"]["mezo-q4_0"]["model"]
    memory = json.loads(run([edgezo, "memory", "--model", tiny_gguf, "--quant", "none", "--device", "android-4gb",
                             "--json"], cwd=work))
    assert memory["device"] == "android-4gb" and memory["usable_ram_bytes"] > 0
