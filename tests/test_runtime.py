"""plait.runtime: the progress bar is drawn on a terminal only."""

import io
import sys

import pytest

from plait.runtime import progress_bar


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("tty,enabled,drawn", [(True, True, True), (False, True, False), (True, False, False)])
def test_progress_bar_draws_only_on_a_terminal_when_enabled(monkeypatch, tty, enabled, drawn):
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress_bar(5, enabled, desc="run")
    for _ in range(5):
        bar.update()
    bar.close()
    written = stream.getvalue()
    assert ("\r" in written and "5/5" in written) if drawn else written == ""
