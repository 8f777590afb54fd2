from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from personascope.errors import PersonascopeError
from personascope.judges import CachedJudge, ContrastJudge, HFLogprobJudge, NoJudge, make_judge
from personascope.models.loading import Model


def test_none_is_never_cached(tmp_path: Path) -> None:
    assert isinstance(make_judge("none"), NoJudge)
    assert isinstance(make_judge("none", cache=tmp_path / "c.sqlite"), NoJudge)
    assert not (tmp_path / "c.sqlite").exists()


def test_reuses_the_given_model(llama: Model, tmp_path: Path) -> None:
    judge = make_judge(f"contrast:{llama.name}", model=llama, cache=False)
    assert isinstance(judge, ContrastJudge) and judge.model is llama and judge.id == "contrast:tiny-llama"
    hf = make_judge(f"hf:{llama.name}", model=llama, cache=None)
    assert isinstance(hf, HFLogprobJudge) and hf.model is llama
    cached = make_judge(f"contrast:{llama.name}", model=llama, cache=tmp_path / "j.sqlite")
    assert isinstance(cached, CachedJudge) and cached.id == "contrast:tiny-llama"
    assert cached.cache.path == tmp_path / "j.sqlite"


def test_default_cache_lives_in_the_cache_dir(llama: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONASCOPE_CACHE", str(tmp_path))
    judge = make_judge(f"contrast:{llama.name}", model=llama)
    assert isinstance(judge, CachedJudge)
    assert judge.cache.path.name == "judge_cache.sqlite"
    assert judge.cache.path.parent.resolve() == tmp_path.resolve()


@pytest.mark.parametrize("spec", ["", "gpt-4", "contrast", "contrast:", "llm:model", "none:x"])
def test_unknown_spec(spec: str) -> None:
    with pytest.raises(PersonascopeError, match="contrast:MODEL") as info:
        make_judge(spec, cache=False)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("personascope.judges.openai") is None, reason="openai judge not written")
def test_openai_spec() -> None:
    judge = make_judge("openai:some-model", cache=False)
    assert judge.id.startswith("openai")
