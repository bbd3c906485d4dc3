"""Repo paths and modules that the package's docstrings and comments cite exist.

A docstring that says "tested in tests/x/test_y.py" or "see :mod:`moe_lab.x`" goes stale
when the file is renamed or was never written; these tests catch that.
"""

import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(ROOT.glob("moe_lab/**/*.py")) + sorted(ROOT.glob("benchmarks/*.py"))

# tests/...py, benchmarks/...py, moe_lab/...py, jobs/...yaml, cluster/...yaml (not inside a longer path)
PATH_RE = re.compile(r"(?<![\w./-])((?:tests|benchmarks|moe_lab)/[\w./-]*?\.py|(?:jobs|cluster)/[\w./-]*?\.ya?ml)(?![\w/-])")
MOD_RE = re.compile(r":mod:`~?(\.*[A-Za-z_][\w.]*)`")


def _prose(path: Path):
    """(line, text) of every comment and string literal (docstrings included) in ``path``."""
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            yield tok.start[0], tok.string


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _cited(regex):
    for src in SOURCES:
        for line, text in _prose(src):
            for m in regex.finditer(text):
                yield src, line + text.count("\n", 0, m.start()), m.group(1)


def _module_file_exists(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _absolute_module(src: Path, name: str) -> str:
    """Resolve a relative ``:mod:`.x``` against the package that holds ``src``."""
    if not name.startswith("."):
        return name
    level = len(name) - len(name.lstrip("."))
    package = Path(_rel(src)).parts[:-1]  # the package holding src (also for an __init__.py)
    package = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join((*package, name.lstrip(".")))


def test_the_scan_sees_the_package():
    # guards against a scan that silently finds nothing (a wrong root or regex)
    cited = {p for _, _, p in _cited(PATH_RE)}
    assert len(SOURCES) > 20
    assert "jobs/serve.yaml" in cited and "benchmarks/moe_layer.py" in cited
    assert not PATH_RE.search("see moe_lab.orchestration.serve:app_builder")
    assert PATH_RE.findall("(tests/inference/test_static_decode.py).") == ["tests/inference/test_static_decode.py"]
    assert _module_file_exists("moe_lab.analytics") and _module_file_exists("moe_lab.model.routers")
    assert not _module_file_exists("moe_lab.model.no_such_module")
    assert _absolute_module(ROOT / "moe_lab/orchestration/__init__.py", ".serve") == "moe_lab.orchestration.serve"
    assert _absolute_module(ROOT / "moe_lab/orchestration/serve.py", ".train") == "moe_lab.orchestration.train"


def test_cited_repo_paths_exist():
    missing = [f"{_rel(src)}:{line}: {p}" for src, line, p in _cited(PATH_RE) if not (ROOT / p).is_file()]
    assert not missing, "docstrings/comments cite files that do not exist:\n" + "\n".join(missing)


def test_cited_modules_exist():
    cited = [(src, line, _absolute_module(src, name)) for src, line, name in _cited(MOD_RE)]
    cited = [(src, line, mod) for src, line, mod in cited if mod.split(".")[0] == "moe_lab"]
    if not cited:
        pytest.fail("no :mod: reference found; the scan is broken")
    missing = [f"{_rel(src)}:{line}: {mod}" for src, line, mod in cited if not _module_file_exists(mod)]
    assert not missing, "docstrings cite modules that do not exist:\n" + "\n".join(missing)
