"""Running the real ``sluicegate`` CLI in process, as the CLI tests do."""

from __future__ import annotations

from sluicegate._cli import app
from typer.testing import CliRunner

_runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``sluicegate ARGS``."""
    result = _runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def ok(*args: str) -> str:
    """The output of a command that must succeed."""
    code, out, err = run(*args)
    assert code == 0, err
    return out


def fails(*args: str, one_line: bool = True) -> tuple[str, str]:
    """stdout and stderr of a command that must fail with ``error: ...`` (on one line, no traceback,
    unless ``one_line`` is False: a query error adds the query and a caret)."""
    code, out, err = run(*args)
    assert code == 1, (out, err)
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    if one_line:
        assert len(err.strip().splitlines()) == 1, err
    return out, err
