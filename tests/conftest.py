import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_enable_metrics_collection", "0")  # as moe_lab's embedded clusters run
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ---- running the suite on two processes (make test: pytest -n 2 --dist loadgroup) -----------
# Tests that start a Ray cluster run one after another on one xdist worker, so that two
# clusters never compete for this machine's cores and ports; every other test is balanced
# over both workers. (xdist's own ``xdist_group`` marker does not reach the scheduler under
# pytest 9.2, whose node ids are no longer assignable, so the scheduler here groups by path.)
#: test files and folders, relative to the repository, whose tests start Ray clusters
RAY_TEST_PATHS = ("tests/orchestration/",)


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None  # xdist's own scheduler for the other modes
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsTogether(LoadScopeScheduling):
        """One scope for every Ray test (so they share a worker and run in turn); every other
        test is a scope of its own (plain load balancing)."""

        def _split_scope(self, nodeid: str) -> str:
            return "ray" if nodeid.startswith(RAY_TEST_PATHS) else nodeid

    return RayTestsTogether(config, log)
