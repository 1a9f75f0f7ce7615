import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter):
    """One line with the number of generated (fuzz) cases the run checked, by kind."""
    from tests.fuzz_cases import CASES

    if CASES:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(CASES.items()))
        terminalreporter.write_line(f"fuzz cases: {sum(CASES.values())} ({kinds})")
