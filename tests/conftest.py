import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs the suite in 2 worker processes (pyproject's addopts), one per core: each
    # uses one thread for torch, OpenMP and BLAS. Set before numpy and torch load their thread pools;
    # two workers' spinning OpenBLAS threads made a scikit-learn fit (tests/evaluate/test_task_baselines.py)
    # 30 times slower. Subprocesses inherit it.
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_name] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


# Modules whose tests share an expensive module-scoped fixture (a training run, the emoji tasks, the
# kill -9 campaign) or spawn 2-process jobs: under xdist each runs whole in one worker, so that its
# fixture is built once and no two of the 2-process jobs run at the same time.
WHOLE_MODULES = frozenset({
    "tests/data/test_emoji.py", "tests/data/test_tasks.py", "tests/evaluate/test_run.py",
    "tests/evaluate/test_task_baselines.py", "tests/test_distributed.py", "tests/test_finetune.py",
    "tests/training/test_interrupt.py",
})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` (pyproject's addopts): every test is a unit of work of its own, except the
    tests of a module of WHOLE_MODULES, which form one. (xdist's own loadgroup reads the
    ``xdist_group`` mark through the test's node id, which pytest 9.2 no longer lets it change:
    pytest-dev/pytest-xdist#1386.) Those modules are handed out first (xdist's loadscope order: units with more tests first)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class WholeModules(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            module = nodeid.split("::", 1)[0]
            return module if scope == nodeid and module in WHOLE_MODULES else scope

    return WholeModules(config, log)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_sessionfinish(session):
    """In an xdist worker: hand this worker's fuzz case counts to the controller (``workeroutput``)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        from tests.fuzz_cases import CASES

        workeroutput["fuzz_cases"] = dict(CASES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """In the xdist controller: add a finished worker's fuzz case counts to the total."""
    from tests.fuzz_cases import CASES

    CASES.update(getattr(node, "workeroutput", {}).get("fuzz_cases", {}))


def pytest_terminal_summary(terminalreporter):
    """One line with the number of generated (fuzz) cases the run checked, by kind (under xdist, the
    sum of the workers' counts)."""
    from tests.fuzz_cases import CASES

    if CASES:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(CASES.items()))
        terminalreporter.write_line(f"fuzz cases: {sum(CASES.values())} ({kinds})")
