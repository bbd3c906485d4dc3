"""moe_lab.tuning needs no Ray: a whole sweep's bookkeeping runs in a fresh interpreter
without importing it, and no module of the package imports it (an AST scan). The one way up
to the Ray code is the lazy ``run_sweep`` / ``resume_sweep`` re-export."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "moe_lab" / "tuning"


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_spec_grid_and_every_output_without_ray(tmp_path):
    code = f"""
import sys
from types import SimpleNamespace
from pathlib import Path
import moe_lab.tuning as T

out = Path({str(tmp_path)!r})
spec = T.SweepSpec(base_job="default", overrides=["training.max_steps=10", "training.eval_steps=5"],
                   search_space={{"model.router_type": {{"grid": ["top_k", "switch", "expert_choice"]}},
                                  "training.learning_rate": {{"loguniform": [0.001, 0.01]}}}},
                   name="s", output_dir=str(out))
spec = T.load_sweep(spec)
points = T.grid_points(spec)
assert [p["model.router_type"] for p in points["model"]] == ["top_k", "switch", "expert_choice"], points
assert spec.num_trials == 3
grid = [SimpleNamespace(config={{"model": p_model, "training": {{"learning_rate": 0.002}}}}, path=None, error=None,
                        metrics={{"trial_id": f"t{{i}}", "step": 10, "max_steps": 10, "eval_loss": 3.0 - i}})
        for i, p_model in enumerate({{"router_type": p["model.router_type"]}} for p in points["model"])]
rows = T.collect_rows(spec, grid, {{}})
result = T.write_outputs(spec, out, rows, elapsed=1.0, verbose=1)     # csv, best.yaml, plot, table
assert result.best["trial_id"] == "t2" and result.best_job_path.is_file() and result.plot_path.is_file()
assert result.results_csv.read_text().count("\\n") == 4
bad = [m for m in sys.modules if m == "ray" or m.startswith("ray.")]
assert not bad, bad[:5]
assert "moe_lab.orchestration.tune" not in sys.modules
print("tuned without ray")
"""
    stdout = _run(code)
    assert "tuned without ray" in stdout and "best first (eval_loss, min)" in stdout


def test_run_sweep_is_re_exported_lazily():
    code = """
import sys
import moe_lab.tuning
assert "moe_lab.orchestration.tune" not in sys.modules and "ray" not in sys.modules
assert "run_sweep" in dir(moe_lab.tuning) and "resume_sweep" in moe_lab.tuning.__all__
from moe_lab.tuning import resume_sweep, run_sweep
import moe_lab.orchestration.tune as tune
assert run_sweep is tune.run_sweep and resume_sweep is tune.resume_sweep
try:
    moe_lab.tuning.no_such_name
except AttributeError as exc:
    print("no such name:", exc)
"""
    assert "no such name: module 'moe_lab.tuning' has no attribute 'no_such_name'" in _run(code)


def _imports(path: Path):
    """``(module, enclosing function or None)`` of every import statement in ``path``;
    relative imports are resolved against moe_lab.tuning."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inside = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                yield from ((a.name, function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = ["moe_lab", "tuning"][: 2 - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                yield from ((f"{module}.{a.name}" if module else a.name, function) for a in child.names)
            yield from visit(child, inside)

    yield from visit(tree, None)


def test_no_module_of_the_package_imports_ray():
    files = sorted(PACKAGE.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "spec.py", "results.py", "report.py"}
    for path in files:
        imports = list(_imports(path))
        assert imports, path  # the scan sees the imports
        for module, function in imports:
            assert module != "ray" and not module.startswith("ray."), (path.name, module)
            if module.startswith("moe_lab.orchestration"):  # the lazy re-export, and nothing else
                assert (path.name, function, module) == ("__init__.py", "__getattr__", "moe_lab.orchestration.tune"), \
                    (path.name, function, module)


def test_the_scan_resolves_relative_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import ray.tune\nfrom ..orchestration import tune\ndef f():\n    from .spec import SweepSpec\n")
    assert list(_imports(probe)) == [("ray.tune", None), ("moe_lab.orchestration.tune", None),
                                     ("moe_lab.tuning.spec.SweepSpec", "f")]


def test_cli_rejects_a_bad_sweep_without_importing_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_job: default\nsearch_space:\n  model.routr_type: {choice: [top_k]}\n")
    code = f"""
import sys
from typer.testing import CliRunner
from moe_lab.cli import app
for args in (["sweep", {str(bad)!r}], ["sweep", "--resume", {str(tmp_path)!r}]):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    print(res.output)
assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")]
"""
    stdout = _run(code)
    assert "routr_type" in stdout and "not a sweep directory" in stdout
