"""Fixtures of the sweep tests that need no Ray: sweep mappings and rows from fake Tune results."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

_JOBS = Path(__file__).resolve().parents[2] / "jobs"
SMOKE = _JOBS / "sweep_smoke.yaml"
DEFAULT_JOB = _JOBS / "default.yaml"
ROUTERS = _JOBS / "sweep_routers.yaml"


@pytest.fixture
def sweep_data(tmp_path):
    """The smoke sweep as a mapping, with another search space (and other fields)."""
    def make(search_space, **fields):
        data = yaml.safe_load(SMOKE.read_text())
        data.update(base_job=str(DEFAULT_JOB), search_space=search_space, output_dir=str(tmp_path), name="t")
        data.update(fields)
        return data

    return make


@pytest.fixture
def inert_sweep(tmp_path):
    """The router sweep and rows from three fake Tune results, one per router: ``(spec, rows, fields)``
    with rows by router type. The expert_choice config carries a coefficient (as a grid point
    could) and the switch config no experts_per_token (as random search draws it)."""
    from moe_lab.tuning import collect_rows, load_sweep

    spec = load_sweep(ROUTERS, [f"output_dir={tmp_path}", "name=t"])
    fields = [d.field for d in spec.dimensions]
    common = {"router_z_loss_coef": 0.001, "capacity_factor": 1.25}
    trials = [  # what Tune hands back: configs as param_space draws them, and the last result
        ({"model": {"router_type": "expert_choice", "load_balancing_loss_coef": 0.01, "experts_per_token": 1,
                    **common}}, 2.5),
        ({"model": {"router_type": "top_k", "load_balancing_loss_coef": 0.02, "experts_per_token": 2, **common}}, 3.0),
        ({"model": {"router_type": "switch", "load_balancing_loss_coef": 0.05, **common}}, 3.5),
    ]
    grid = [SimpleNamespace(config={**c, "training": {"learning_rate": 0.003}}, path=None, error=None,
                            metrics={"trial_id": f"t{i}", "step": 300, "max_steps": 300, "eval_loss": loss})
            for i, (c, loss) in enumerate(trials)]
    rows = {r["model.router_type"]: r for r in collect_rows(spec, grid, {})}
    return spec, rows, fields
