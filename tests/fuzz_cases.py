"""A count of the generated (hypothesis) cases the suite ran, printed at its end by conftest."""

from collections import Counter

CASES: Counter = Counter()


def count(kind: str, n: int = 1) -> None:
    """Record ``n`` generated cases of ``kind`` (e.g. "config", "csv")."""
    CASES[kind] += n
