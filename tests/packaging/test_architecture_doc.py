"""docs/architecture.md stays true to the code (issue 30, item 7): every dotted name under
`lightning_grpo.` that it writes in backticks imports (module, then attributes), and every
repository path it names (`lightning_grpo/...`, `callbacks/...`, `configs/...`, `tests/...`,
`bench/...`, `docs/...`) exists; the four "how to add" recipes are there, numbered, and name
what they ask for by such checked names."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
PATH_ROOTS = ("lightning_grpo/", "callbacks/", "datamodules/", "configs/", "tests/", "bench/", "docs/", "tools/")
#: Folders of the package the doc names without the `lightning_grpo/` prefix ("policies/registry.py").
PACKAGE_FOLDERS = tuple(f"{p.name}/" for p in (ROOT / "lightning_grpo").iterdir() if p.is_dir() and p.name != "__pycache__")
RECIPES = ("an objective", "a family", "a world", "a reward")


def code_spans(text: str) -> list[str]:
    """The contents of every `...` span (fenced blocks excluded)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def dotted_names(spans: list[str]) -> set[str]:
    """`lightning_grpo.x.y` names in the spans (a call's arguments and a trailing `()` dropped)."""
    names = set()
    for span in spans:
        for match in re.finditer(r"\blightning_grpo(?:\.[A-Za-z_][A-Za-z0-9_]*)+", span):
            names.add(match.group(0))
    return names


def paths(spans: list[str]) -> set[str]:
    """Repository paths in the spans, without placeholders (`<name>`) or globs."""
    found = set()
    for span in spans:
        for token in re.findall(r"[A-Za-z0-9_./{},*<>-]+", span):
            token = token.rstrip(".,:")
            if re.search(r"[<>*{}]", token):
                continue
            if token.startswith(PATH_ROOTS):
                found.add(token)
            elif token.startswith(PACKAGE_FOLDERS):
                found.add(f"lightning_grpo/{token}")
    return found


def resolves(dotted: str) -> bool:
    """Whether `dotted` is a module, or a module's attribute (chain)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def recipe(text: str, what: str) -> str:
    """The body of the recipe "### How to add <what>" (up to the next heading)."""
    match = re.search(rf"^### How to add {re.escape(what)}\n(.*?)(?=^#)", text + "\n#", flags=re.M | re.S)
    assert match, f"docs/architecture.md has no recipe 'How to add {what}'"
    return match.group(1)


def test_every_dotted_name_in_the_doc_resolves():
    names = dotted_names(code_spans(DOC.read_text()))
    assert len(names) > 30  # the doc does name the code
    missing = sorted(name for name in names if not resolves(name))
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"


def test_every_path_in_the_doc_exists():
    found = paths(code_spans(DOC.read_text()))
    assert len(found) > 30
    missing = sorted(p for p in found if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


@pytest.mark.parametrize("what", RECIPES)
def test_each_recipe_is_numbered_and_names_checked_code(what):
    body = recipe(DOC.read_text(), what)
    steps = re.findall(r"^(\d+)\. ", body, flags=re.M)
    assert steps and steps == [str(i) for i in range(1, len(steps) + 1)], f"{what}: steps {steps}"
    assert len(steps) <= 7, f"{what}: a short recipe, {len(steps)} steps"
    spans = code_spans(body)
    assert dotted_names(spans) or paths(spans), f"{what}: names no code"
