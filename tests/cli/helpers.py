from __future__ import annotations

from pathlib import Path

import pytest

from personascope.cli import main
from personascope.testing import tiny_model


def run(argv: list[str]) -> int:
    """Run the CLI in-process; the exit code (0 when it returns normally)."""
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def one_line_error(capsys: pytest.CaptureFixture[str], code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and needle in err, err
    assert "\n" not in err and "Traceback" not in err


def save_tiny(path: Path, family: str = "llama") -> Path:
    m = tiny_model(family)
    m.hf_model.save_pretrained(path)
    m.tokenizer.save_pretrained(path)
    return path
