"""The README's Python snippets run as pasted (in order, one namespace, in a fresh folder), so the docs cannot rot.

The last snippet is the full extraction + sweep on the bundled model (the `make demo` job, about ten minutes on two
cores): here its imports and configs are checked, and the job itself runs in `make demo`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FULL_PIPELINE = "extract(ExtractConfig("


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_the_snippets_we_expect() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 4
    assert sum(FULL_PIPELINE in b for b in blocks) == 1 and FULL_PIPELINE in blocks[-1]
    for block in blocks:
        compile(block, "README.md", "exec")  # every snippet is valid Python


@pytest.mark.slow
def test_readme_snippets_run_as_pasted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundled) -> None:  # type: ignore[no-untyped-def]
    import personascope as ps

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ps, "load_model", lambda *a, **k: bundled)  # the same bundled model, loaded once per session
    namespace: dict[str, Any] = {}
    blocks = python_blocks()
    for block in blocks[:-1]:
        exec(compile(block, "README.md", "exec"), namespace)
    scores = namespace["scores"]
    assert scores.shape == (1, bundled.num_layers + 1)
    assert (tmp_path / "cheerful.safetensors").is_file() and (tmp_path / "runs" / "ft-cheerful").is_dir()
    assert bool(scores[0, 0].isnan()) and bool(scores[0, 1:].isfinite().all())  # zero at layer 0: NaN there
    # the full pipeline: its imports and configs, not the ten-minute job (that is `make demo`)
    head = "\n".join(line for line in blocks[-1].splitlines() if line.startswith("from "))
    exec(compile(head, "README.md", "exec"), namespace)
    assert namespace["ExtractConfig"](trait="evil").resolved().n_pairs == 5
