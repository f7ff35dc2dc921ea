"""The package's import graph, read from the source of the installed package (every import, also those inside
functions): no cycle between edgezo's modules, llama_cpp only in the engine, torch only in the torch extra. And the
checkout's own modules never shadow an installed package (issue 28: bench/kernels.py hid Hugging Face's `kernels`)."""
import ast
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

PACKAGE = "edgezo"
CHECKOUT = Path(__file__).resolve().parent.parent
LLAMA_CPP_IMPORTERS = {  # module (or package: each of its modules) -> the part of llama_cpp it may import
    "edgezo.engine": "llama_cpp",  # the engine package
    "edgezo.serve": "llama_cpp.server",  # `edgezo serve` runs llama-cpp-python's own OpenAI-compatible server
}
# The torch extra: the BP reference, BP on quantized blocks, distributed MeZO (torch.distributed), the HF side of
# conversion, and tensorboard's writer when tensorboardX is missing. Nothing else may import them.
TORCH_EXTRA = {"edgezo.reference", "edgezo.quant_torch", "edgezo.distributed.group", "edgezo.report",
               "edgezo.convert.peft", "edgezo.convert.tokenizer", "edgezo.convert.gguf_to_hf"}
TORCH_LIBRARIES = ("torch", "transformers", "peft", "accelerate")


def package_modules() -> dict[str, Path]:
    root = Path(importlib.util.find_spec(PACKAGE).submodule_search_locations[0])
    return {".".join((PACKAGE, *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}


def imported_names(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Absolute names `module` imports anywhere in its source: a submodule of the package where one is named."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            names |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
            if node.level and base not in modules:
                names.add(f"unresolved:{base}")  # a relative import of nothing (a module moved into a subpackage)
    return names


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between the package's modules, every name each module imports)."""
    modules = package_modules()
    imports = {m: imported_names(m, p, modules) for m, p in modules.items()}
    # Every submodule import runs the package's __init__ first; an edge back to it is Python's structure, not a cycle
    # of design (edgezo/__init__ only re-exports edgezo.api on first use).
    edges = {m: {n for n in names if n in modules and n not in (m, PACKAGE)} for m, names in imports.items()}
    return edges, imports


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []  # state: 1 on the current path, 2 done

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    return next((c for node in sorted(edges) if node not in state and (c := visit(node))), None)


def test_no_import_cycle_between_modules():
    edges, _ = import_graph()
    assert {"edgezo.cli", "edgezo.engine", "edgezo.convert.merge"} <= set(edges)  # the walk sees the package
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_every_relative_import_names_a_module_of_the_package():
    _, imports = import_graph()
    assert {m: sorted(n for n in names if n.startswith("unresolved:")) for m, names in imports.items()
            if any(n.startswith("unresolved:") for n in names)} == {}


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def importer_of(module: str) -> str | None:
    """The part of llama_cpp `module` may import: its own entry or its package's."""
    return next((part for name, part in LLAMA_CPP_IMPORTERS.items() if module == name or module.startswith(f"{name}.")), None)


def test_only_the_engine_imports_llama_cpp_and_only_the_torch_extra_imports_torch():
    _, imports = import_graph()
    llama = {m: {n for n in names if n.split(".")[0] == "llama_cpp"} for m, names in imports.items()}
    allowed = {m: {n for n in names if n == importer_of(m) or n.startswith(f"{importer_of(m)}.")} for m, names in llama.items()}
    assert {m: names - allowed[m] for m, names in llama.items() if names - allowed[m]} == {}
    torch = {m for m, names in imports.items() if any(n.split(".")[0] in TORCH_LIBRARIES for n in names)}
    assert torch <= TORCH_EXTRA, sorted(torch - TORCH_EXTRA)
    assert {m for m, names in llama.items() if names} >= {"edgezo.engine.ggml", "edgezo.engine.core", "edgezo.serve"}
    assert importer_of("edgezo.engineering") is None  # a module named like the package is not in it


def test_the_library_does_not_import_the_command_line():
    """edgezo.cli is a layer on the library; only edgezo.api (which runs its commands from Python) may import it."""
    edges, _ = import_graph()
    users = {m for m, targets in edges.items() if any(t == "edgezo.cli" or t.startswith("edgezo.cli.") for t in targets)}
    assert {m for m in users if not m.startswith("edgezo.cli")} == {"edgezo.api"}


# ---- shadowing ------------------------------------------------------------------------------------------------
def importable_names(directory: Path) -> set[str]:
    """What `import NAME` finds in `directory` when it is on sys.path: modules and regular packages. A folder without
    __init__.py (docs/) is only a namespace portion, which an installed package of the same name wins over."""
    return {p.stem for p in directory.glob("*.py")} | {p.name for p in directory.iterdir() if (p / "__init__.py").is_file()}


def shadowed_distributions(directory: Path) -> dict[str, list[str]]:
    """{name: the installed distributions whose top-level name it is} for each name `directory` would shadow."""
    installed = importlib.metadata.packages_distributions()
    return {name: sorted(set(installed[name]) - {PACKAGE}) for name in importable_names(directory)
            if set(installed.get(name, ())) - {PACKAGE}}


def test_the_only_folder_of_the_checkout_on_sys_path_is_its_root():
    """tests/ and bench/ are packages, so pytest and `python -m bench.NAME` put the root there, not the folders."""
    # Not counted: an editable install's path hook (named like a file in the checkout, not a folder) and the
    # interpreter's own folders (a venv made in the checkout, as .ci/run does).
    inside = {Path(p).resolve() for p in sys.path if p and Path(p).is_dir() and Path(p).resolve().is_relative_to(CHECKOUT)
              and not Path(p).resolve().is_relative_to(Path(sys.prefix).resolve())}
    assert inside <= {CHECKOUT}, sorted(map(str, inside - {CHECKOUT}))
    assert {"bench", "tests", PACKAGE} <= importable_names(CHECKOUT)


def test_no_module_of_the_checkout_shadows_an_installed_package():
    assert shadowed_distributions(CHECKOUT) == {}


def test_no_test_or_benchmark_edits_sys_path():
    edits = [f"{path.relative_to(CHECKOUT)}:{node.lineno}" for folder in ("tests", "bench")
             for path in (CHECKOUT / folder).glob("*.py") for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "extend")
             and ast.unparse(node.value) == "sys.path"]
    assert edits == []


def test_the_shadow_finder_finds_a_module_named_like_an_installed_package(tmp_path):
    (tmp_path / "numpy.py").write_text("")
    (tmp_path / "pytest").mkdir()
    (tmp_path / "pytest" / "__init__.py").write_text("")
    (tmp_path / "gguf").mkdir()  # no __init__.py: a namespace portion, which cannot shadow
    assert shadowed_distributions(tmp_path) == {"numpy": ["numpy"], "pytest": ["pytest"]}
