"""The check every bad-input test makes: the CLI fails with one clear line on stderr."""

from __future__ import annotations

from dalle.cli import main


def fails_with_one_line(argv: list[str], capsys, *fragments: str) -> str:
    """Run the CLI; assert a non-zero status and one stderr line holding every fragment."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0, f"expected a failure for {argv}, got status 0"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err and "internal error" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    print("stderr:", lines[0])  # shown with pytest -s, to review the wording
    return lines[0]
