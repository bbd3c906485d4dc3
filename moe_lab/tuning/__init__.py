"""Hyper-parameter sweeps over job fields (router type, loss coefficients, ...) on Ray Tune.

    from moe_lab.tuning import load_sweep, run_sweep, resume_sweep
    result = run_sweep("jobs/sweep_routers.yaml", ["num_samples=1", "training.max_steps=100"])
    result.best["eval_loss"], result.best_job_path          # best.yaml: `moe-lab train best.yaml`
    resume_sweep("outputs/sweeps/sweep_routers-20250101-120000")   # after an interruption

Command line: ``moe-lab sweep SWEEP.yaml [--set key=value ...]`` and
``moe-lab sweep --resume DIR``.

A sweep spec (YAML) names a base job and a search space over any job field::

    base_job: default.yaml            # relative to the sweep file, then the CWD; or "default"
    overrides: [training.max_steps=300, model.hidden_size=64]      # applied to the base job
    search_space:
      model.router_type: {grid: [top_k, switch, expert_choice]}
      model.load_balancing_loss_coef: {loguniform: [0.001, 0.1]}
      model.experts_per_token: {choice: [1, 2]}     # also: uniform [lo, hi], randint [lo, hi]
    variants:                         # optional: recipes, each one grid point (x the search space's grid)
      micro_batch: {}                 # the base job as it is
      global_batch: {model.load_balancing_scope: global_batch}
      bias: {model.load_balancing_loss_coef: 0.0, model.router_bias_update_rate: 0.001}
    report: balancing                 # optional: balancing_study.png/.csv comparing the variants
    num_samples: 2                    # random/grid: repeats of the grid; optuna: trials
    search: random                    # random | grid | optuna (pip install moe-lab[optuna])
    scheduler: {type: asha, metric: eval_loss, grace_period: 100, reduction_factor: 2}
    stop_on_routing_collapse: {dead_expert_fraction: 0.5, after_step: 100}

The spec is validated once, before Ray starts: unknown fields, unknown distributions, empty
choices, ``low > high``, ``loguniform`` bounds <= 0 and values the base job rejects raise
:class:`~moe_lab.errors.ConfigError` naming the field; a variant with an unknown field, a
field that is also searched, or a job that does not validate raises it naming the variant
and the field.

Variants. Each variant is a bundle of job overrides (a recipe) and one grid point: every
variant runs the search space's grid (``num_samples`` times), or once when there is no
search space (with optuna, the variant is a categorical suggested first). A trial's job is
the base job, then its variant's overrides, then its searched values, then the inert rules
below (so a variant that sets ``router_type: expert_choice`` makes the balancing coefficient
inert for its trials alone). The variant is a column of the table and ``results.csv``, is
named in ``best.yaml``, and groups ``router_comparison.png``; ``report: balancing`` adds the
balancing study (:mod:`.report`).

Fields without effect. Some fields do nothing under some routers; :data:`INERT_FIELDS`
declares them, once, as data (for example ``model.load_balancing_loss_coef`` under
``expert_choice`` with ``drop_tokens``: each expert picks exactly C tokens, so the balancing
loss is constant, 1, with zero gradient). No trial is spent on such a setting:

- grid values (``grid``, or every ``choice`` with ``search: grid``): :func:`grid_points`
  leaves the inert field out of the grid points it has no effect on and drops the
  duplicates that leaves (router_type x load_balancing_loss_coef runs one expert_choice
  trial per value of the other fields, not one per coefficient);
- drawn values (random search): a field that a rule may make inert
  (:func:`drawn_inert_rules`) is drawn per trial only when the rule does not apply to the
  trial's values; otherwise the trial gets the rule's value (``tune.sample_from``);
- ``search: optuna`` uses a define-by-run space that suggests the condition fields first
  and skips the inert ones.

Whatever the config, :func:`trial_job` runs an inert field with the base job's value (or
the rule's fixed value: a switch trial runs with ``experts_per_token=1``, recorded as an
adjustment when the base job has another). The results (``results.csv``, the printed
table, ``best.yaml``) show the field as ``n/a`` (:data:`NOT_APPLICABLE`) for those trials,
with the reason (the ``inert`` column, the table's legend, a ``best.yaml`` comment). Any
other sampled combination the job rejects makes that trial fail fast; its error is in the
table and the sweep goes on.

The package never imports Ray (a test checks it in a subprocess):

- :mod:`.spec`: :class:`SweepSpec`, search-space parsing, :func:`load_sweep`;
- :mod:`.trials`: job fields, :data:`INERT_FIELDS`, :func:`grid_points`, :func:`trial_job`,
  and what a trial reports (:data:`REPORTED_METRICS`, :class:`TrialResult`);
- :mod:`.plan`: what each trial asks Ray for and how many run at once (:func:`plan_trials`);
- :mod:`.results`: rows, ``results.csv``, ``best.yaml``, the sweep directory;
- :mod:`.report`: ``router_comparison.png``, the printed table and the balancing study.

The Ray Tune parts (the Tuner, the trial function, reporting to Tune) are in
:mod:`moe_lab.orchestration.tune`, and so are :func:`run_sweep` and :func:`resume_sweep`:
this package hands them out on first use (``from moe_lab.tuning import run_sweep`` imports
that module, and Ray; ``import moe_lab.tuning`` does not).
"""

from __future__ import annotations

from typing import Any, List

from .plan import TrialPlan, plan_trials
from .report import (
    ROUTER_ORDER,
    ROUTER_PLOT,
    STUDY_CSV,
    STUDY_PLOT,
    TABLE_METRICS,
    TrialCurves,
    balancing_summary,
    inert_legend,
    plot_balancing_study,
    plot_router_comparison,
    print_balancing_table,
    print_results_table,
    read_trial_curves,
    variant_legend,
    write_balancing_study,
    write_outputs,
)
from .results import (
    BEST_JOB,
    METRIC_COLUMNS,
    RESULTS_CSV,
    SWEEP_FILE,
    SweepResult,
    collect_rows,
    is_interrupted,
    new_sweep_directory,
    open_sweep_directory,
    pick_best,
    routing_collapsed,
    write_best_job,
    write_results_csv,
)
from .spec import (
    DISTRIBUTIONS,
    RoutingCollapseSpec,
    SchedulerSpec,
    SearchDim,
    SweepSpec,
    TrialResources,
    apply_sweep_overrides,
    check_search_available,
    load_sweep,
    parse_search_space,
    parse_variants,
)
from .trials import (
    INERT_FIELDS,
    JOB_SECTIONS,
    NOT_APPLICABLE,
    REPORTED_METRICS,
    VARIANT,
    InertRule,
    TrialResult,
    base_values,
    check_inert_rules,
    describe_trial,
    drawn_inert_rules,
    flatten_params,
    grid_points,
    inert_rules,
    job_values,
    split_variant,
    train_metrics,
    trial_job,
    variant_overrides,
)

#: public names that live in moe_lab.orchestration.tune (Ray), imported on first use
_FROM_ORCHESTRATION = ("run_sweep", "resume_sweep")


def __getattr__(name: str) -> Any:
    """PEP 562: ``run_sweep`` / ``resume_sweep`` from :mod:`moe_lab.orchestration.tune`,
    imported (with Ray) on first use; the only import of it from this package."""
    if name in _FROM_ORCHESTRATION:
        from ..orchestration import tune

        value = getattr(tune, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_FROM_ORCHESTRATION))


__all__ = [
    "BEST_JOB",
    "DISTRIBUTIONS",
    "INERT_FIELDS",
    "JOB_SECTIONS",
    "METRIC_COLUMNS",
    "NOT_APPLICABLE",
    "REPORTED_METRICS",
    "RESULTS_CSV",
    "ROUTER_ORDER",
    "ROUTER_PLOT",
    "STUDY_CSV",
    "STUDY_PLOT",
    "SWEEP_FILE",
    "TABLE_METRICS",
    "VARIANT",
    "InertRule",
    "RoutingCollapseSpec",
    "SchedulerSpec",
    "SearchDim",
    "SweepResult",
    "SweepSpec",
    "TrialPlan",
    "TrialResources",
    "TrialCurves",
    "TrialResult",
    "apply_sweep_overrides",
    "balancing_summary",
    "base_values",
    "check_inert_rules",
    "check_search_available",
    "collect_rows",
    "describe_trial",
    "drawn_inert_rules",
    "flatten_params",
    "grid_points",
    "inert_legend",
    "inert_rules",
    "is_interrupted",
    "job_values",
    "load_sweep",
    "new_sweep_directory",
    "open_sweep_directory",
    "parse_search_space",
    "parse_variants",
    "pick_best",
    "plan_trials",
    "plot_balancing_study",
    "plot_router_comparison",
    "print_balancing_table",
    "print_results_table",
    "read_trial_curves",
    "resume_sweep",
    "routing_collapsed",
    "run_sweep",
    "split_variant",
    "train_metrics",
    "trial_job",
    "variant_legend",
    "variant_overrides",
    "write_balancing_study",
    "write_best_job",
    "write_outputs",
    "write_results_csv",
]
