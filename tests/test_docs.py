"""The docs' code runs as written: docs/methods.md's "Adding a method" defines a method and
trains it through the real loop."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(page: Path, section: str) -> list[str]:
    """The ```python blocks of ``section`` (up to the next heading of the same level), in order,
    dedented from list indentation. Blocks inside numbered steps are included."""
    text = page.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end > 0 else None]
    return [re.sub(r"^ {0,3}", "", b, flags=re.M) for b in re.findall(r"```python\n(.*?)```", body, re.S)]


def test_adding_a_method_runs_as_written(capsys):
    blocks = python_blocks(ROOT / "docs" / "methods.md", "Adding a method")
    method, trial = blocks[0], blocks[1]    # the complete method, then the run that tries it
    namespace: dict = {"__name__": "docs_example"}
    cwd = os.getcwd()
    os.chdir(ROOT)                          # the page's paths are relative to the repository
    try:
        exec(compile(method, "docs/methods.md (the method)", "exec"), namespace)
        exec(compile(trial, "docs/methods.md (trying it)", "exec"), namespace)
    finally:
        os.chdir(cwd)
    metrics = namespace["metrics"]
    assert metrics["shrink_weak/calls"] == 2.0 and metrics["epoch"] == 1.0
    assert metrics["shrink_weak/halved"] >= 0
    calls, halved = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert float(calls) == 2.0 and float(halved) == metrics["shrink_weak/halved"]


def test_the_readmes_methods_table_is_the_registrys():
    """One source for the methods table: each method's own ``summary``; the README carries
    ``we-dist methods --markdown`` verbatim."""
    from we_dist.methods.registry import BUILTIN_METHODS, methods_table

    readme = (ROOT / "README.md").read_text()
    table = methods_table()
    assert table in readme
    assert all(f"| `{name}` |" in table for name in BUILTIN_METHODS)


def test_the_readme_fits_on_a_screen_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 110
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), target
