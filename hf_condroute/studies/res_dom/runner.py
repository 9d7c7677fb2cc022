"""Run rows x seeds in this process, one after another (the CPU's threads go to torch), with a progress bar.

Each seed's tag row runs first and is saved to a temporary folder, so that seed's subnet-init rows can start from
its experts and classifier (paper A 4.3); when the rows hold init rows but no tag row, the tag run is trained for
them without being reported.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

from tqdm.auto import tqdm

from .data import ResDomData
from .study import Row, TrainSettings, run_row


def run_study(
    rows: list[Row],
    seeds: int,
    train: ResDomData,
    test: ResDomData,
    backbone: str,
    settings: TrainSettings,
    progress: bool = True,
    on_result: Callable[[str, int, dict, float], None] | None = None,
) -> dict[str, list[dict]]:
    """Scores of every row for seeds 0..seeds-1: {row name: [scores of seed 0, seed 1, ...]}."""
    if seeds < 1:
        raise ValueError(f"Need seeds >= 1, got {seeds}.")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"Rows repeat: {names}. Give each row once.")
    needs_tag = any(r.subnet_init for r in rows)
    plain = [r for r in rows if not r.subnet_init]
    if needs_tag and "tag" not in names:
        plain.insert(0, Row("tag"))  # trained for the init rows, not reported
    plain.sort(key=lambda r: r.router != "tag")
    tasks = [(r, s) for s in range(seeds) for r in plain] + [
        (r, s) for s in range(seeds) for r in rows if r.subnet_init
    ]
    results: dict[str, dict[int, dict]] = {name: {} for name in names}
    with tempfile.TemporaryDirectory(prefix="res_dom_tag_") as tag_dir:
        bar = tqdm(tasks, unit="run", desc="Res-Dom", disable=not progress)
        for row, seed in bar:
            start = time.perf_counter()
            saved = f"{tag_dir}/seed{seed}"
            scores = run_row(
                row, seed, train, test, backbone, settings,
                init_from=saved if row.subnet_init else None,
                save_to=saved if row.name == "tag" and needs_tag else None,
            )  # fmt: skip
            if row.name in results:
                results[row.name][seed] = scores
            bar.set_postfix_str(f"{row.name} seed {seed}: {scores['accuracy']:.1f}%")
            if on_result is not None:
                on_result(row.name, seed, scores, time.perf_counter() - start)
    return {name: [results[name][s] for s in range(seeds)] for name in names}
