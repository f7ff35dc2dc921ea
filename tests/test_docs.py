"""The documentation stays true to the code (issue 31): docs/commands.md is what the parser gives, every relative
link of README.md and docs/*.md reaches a file (and a heading, where it names one), and every `edgezo COMMAND` and
`make TARGET` the README names exists."""
import re
from pathlib import Path

import pytest

from edgezo.cli import docs
from edgezo.cli.parser import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(([^()\s]+)\)")  # [text](target), ![alt](image)


def prose(text: str) -> str:
    """Markdown without fenced code blocks and code spans: what GitHub renders as links and headings."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def code(text: str) -> list[str]:
    """The fenced blocks and code spans of a page."""
    return FENCE.findall(text) + [m.group(2) for m in CODE_SPAN.finditer(FENCE.sub("", text))]


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file: the heading's text in lower case, punctuation
    (backticks included) dropped, spaces to hyphens; -1, -2 ... on repeats."""
    slugs, seen = set(), {}
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", FENCE.sub("", path.read_text()), re.M):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        slugs.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return slugs


def relative_links() -> list[tuple[Path, str]]:
    return [(page, target) for page in PAGES for target in LINK.findall(prose(page.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not checked here


@pytest.mark.parametrize("page, target", relative_links(), ids=lambda x: x.name if isinstance(x, Path) else x)
def test_every_relative_link_reaches_a_file_and_heading(page, target):
    path_part, _, anchor = target.partition("#")
    path = (page.parent / path_part).resolve() if path_part else page
    assert path.exists(), f"{page.relative_to(ROOT)}: {target} points to a missing file"
    if anchor:
        assert path.suffix == ".md", f"{page.relative_to(ROOT)}: {target}: an anchor into a file that is not Markdown"
        assert anchor in anchors(path), f"{page.relative_to(ROOT)}: {target}: no heading with that anchor"


def test_the_anchor_rule_follows_github():
    page = ROOT / "docs" / "capacity.md"
    assert "the-papers-experiment-against-the-strongest-bp-qwen25-coder-05b-bp-vs-15b-mezo" in anchors(page)
    assert "edgezo-finetune" in anchors(ROOT / "docs" / "commands.md")  # a heading in backticks


def test_the_readme_names_only_real_commands_and_make_targets():
    text = (ROOT / "README.md").read_text()
    snippets = "\n".join(code(text))
    commands = set(re.findall(r"(?:^|[\s$(])edgezo ([a-z][a-z0-9-]*)", snippets, re.M))
    targets = set(re.findall(r"(?:^|[\s(])make ([a-z][a-z0-9-]*)", snippets, re.M))
    assert {"finetune", "eval", "doctor"} <= commands and {"demo", "test"} <= targets  # the patterns find them
    assert commands <= set(docs.subcommands(build_parser())), "not commands of edgezo"
    makefile = (ROOT / "Makefile").read_text()
    assert targets <= set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.M)), "not targets of the Makefile"


def test_every_page_in_docs_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for page, target in relative_links()
              if page.name == "README.md"}
    assert {p for p in PAGES[1:] if p.resolve() not in linked} == set()


def test_the_commands_doc_is_what_the_parser_gives():
    text = (ROOT / "docs" / "commands.md").read_text()
    assert docs.replace_block(text, docs.commands_markdown(build_parser())) == text, (
        "docs/commands.md is stale: run python -m edgezo.cli.docs --write")


@pytest.mark.parametrize("command", list(docs.subcommands(build_parser())))
def test_every_flag_of_every_command_is_in_the_commands_doc(command):
    text = (ROOT / "docs" / "commands.md").read_text()
    section = text.split(f"### `edgezo {command}`\n", 1)
    assert len(section) == 2, f"docs/commands.md has no section for edgezo {command}"
    section = section[1].split("\n### ", 1)[0]
    sub, _ = docs.subcommands(build_parser())[command]
    flags = [s for _, actions in docs.shown_groups(sub) for a in actions for s in a.option_strings]
    assert [f for f in flags if f"`{f}`" not in section] == []


def test_the_generator_documents_help_defaults_and_choices():
    import argparse

    parser = argparse.ArgumentParser(prog="tool", description="A tool.")
    sub = parser.add_subparsers(dest="command").add_parser("run", help="run | it")
    sub.add_argument("--steps", type=int, default=400, help="steps [%(default)s]")
    sub.add_argument("--mode", choices=["a", "b"], default="a", help="which mode (%(default)s first)")
    sub.add_argument("--fast", action="store_true", help="go fast")
    sub.add_argument("--sizes", default=[1, 16], help="batch sizes")
    sub.add_argument("--hidden", help=argparse.SUPPRESS)
    block = docs.commands_markdown(parser)
    assert "| [`tool run`](#tool-run) | run \\| it |" in block  # a pipe in help text is escaped
    assert "| `--steps` STEPS | `400` | steps |" in block  # the default in its column, not repeated in the help
    assert "| `--mode` `{a,b}` | `a` | which mode (a first) |" in block
    assert "| `--fast` | off | go fast |" in block and "--hidden" not in block
    assert "| `--sizes` SIZES | `1,16` | batch sizes |" in block  # a list default as the comma-separated flag value


def test_the_generator_rewrites_only_its_block_and_check_detects_drift(tmp_path):
    page = tmp_path / "commands.md"
    page.write_text(f"# Commands\n\nby hand\n\n{docs.BEGIN}\nold\n{docs.END}\n\nafter\n")
    assert docs.main(["--doc", str(page), "--check"]) == 1 and "old" in page.read_text()
    assert docs.main(["--doc", str(page), "--write"]) == 0
    text = page.read_text()
    assert text.startswith("# Commands\n\nby hand\n\n") and text.endswith(f"{docs.END}\n\nafter\n")
    assert "### `edgezo finetune`" in text and docs.main(["--doc", str(page), "--check"]) == 0
    page.write_text("no markers")
    assert docs.main(["--doc", str(page), "--check"]) == 1
