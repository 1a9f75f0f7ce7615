"""The command line's exit codes: 0 ok, 2 a user error in one line, 1 a bug (with its traceback)."""

import pytest

from plait import cli


def _run(capsys, argv):
    capsys.readouterr()
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_a_user_error_is_one_line_and_exit_code_2(capsys, tmp_path):
    code, err = _run(capsys, ["report", str(tmp_path / "missing")])
    assert code == cli.EXIT_USER_ERROR == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plait: error: ") and "missing" in lines[0]


def test_a_bug_is_exit_code_1_with_its_traceback(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("an internal invariant failed")

    monkeypatch.setattr(cli, "_report", broken)
    code, err = _run(capsys, ["report", "somewhere"])
    assert code == cli.EXIT_BUG == 1
    assert "Traceback" in err and "RuntimeError: an internal invariant failed" in err
    assert err.strip().splitlines()[-1].startswith("plait: internal error")


def test_command_line_syntax_errors_exit_2():
    with pytest.raises(SystemExit) as caught:
        cli.main(["train"])  # no config
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        cli.main(["eval", "model.safetensors", "--bogus"])
    assert caught.value.code == 2
