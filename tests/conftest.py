import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_enable_metrics_collection", "0")  # as moe_lab's embedded clusters run
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train gives a worker group 60 s to start, then removes its placement group and fails the
# run with a ControllerError; on this 2-core machine, with the other pytest worker's cluster
# busy, two workers importing torch can take longer (test_streaming_with_ray_data failed so).
# The clusters the tests start inherit this.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ---- running the suite on two processes (make test: pytest -n 2 --dist loadgroup) -----------
# The tests that start Ray clusters form two groups, each run one test after another on one
# xdist worker, so that at most two clusters (one per worker) run at a time and a module's
# shared cluster is never used by two processes; every other test is balanced over both
# workers. (xdist's own ``xdist_group`` marker does not reach the scheduler under pytest
# 9.2, whose node ids are no longer assignable, so the scheduler here groups by path.)
#: test files (relative to the repository) of the first group of Ray tests: training on Ray
RAY_TRAIN_TESTS = (
    "tests/orchestration/test_distributed.py",
    "tests/orchestration/test_orphaned_writer.py",
    "tests/orchestration/test_submit.py",
    "tests/orchestration/test_cluster_sockets.py",
    "tests/test_cli.py::test_real_subprocess_train",  # `moe-lab train` runs on an embedded Ray cluster
)
#: every other test under this folder is in the second group (Serve, Tune)
RAY_TEST_DIR = "tests/orchestration/"


def ray_group(nodeid: str) -> str:
    """The scope of a test: "ray-train", "ray-serve-tune", or the test itself."""
    if nodeid.startswith(RAY_TRAIN_TESTS):
        return "ray-train"
    if nodeid.startswith(RAY_TEST_DIR):
        return "ray-serve-tune"
    return nodeid


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None  # xdist's own scheduler for the other modes
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsInTwoGroups(LoadScopeScheduling):
        """One scope per group of Ray tests (a group shares a worker and runs in turn); every
        other test is a scope of its own (plain load balancing)."""

        def _split_scope(self, nodeid: str) -> str:
            return ray_group(nodeid)

    return RayTestsInTwoGroups(config, log)
