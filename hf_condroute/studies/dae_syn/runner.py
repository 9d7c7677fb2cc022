"""Run rows x seeds, in worker processes, with one progress bar counting training steps.

Rows run in `workers` processes (`recipes/dae_syn.py` defaults to min(2, CPU count); one worker runs in this
process), each with max(1, CPU count // workers) torch threads. Each subnet-init row waits for its seed's tag
row (its first phase) and is queued as soon as that finishes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

import torch
from tqdm.auto import tqdm

from ..pool import InProcess
from .data import DAESynData, make_dataset
from .study import Row, TrainSettings, run_row

_counter = None  # steps done, shared by the worker processes
_listener = None  # in-process runs: called after each count, to move the progress bar
_datasets: dict[int, DAESynData] = {}


def _dataset(image_size: int) -> DAESynData:
    if image_size not in _datasets:
        _datasets[image_size] = make_dataset(image_size)
    return _datasets[image_size]


def _init_worker(counter, threads: int) -> None:
    global _counter
    _counter = counter
    torch.set_num_threads(threads)


def _count(n: int) -> None:
    with _counter.get_lock():
        _counter.value += n
    if _listener is not None:
        _listener()


def _run(row: Row, seed: int, settings: TrainSettings, pretrained):
    return run_row(row, seed, _dataset(settings.model.image_size), settings, pretrained, on_steps=_count)


def run_study(
    rows: list[Row], seeds: int, settings: TrainSettings, workers: int = 1, progress: bool = True
) -> dict[str, list[dict[str, float]]]:
    """Scores of every row for seeds 0..seeds-1: {row name: [scores of seed 0, seed 1, ...]}."""
    if seeds < 1 or workers < 1:
        raise ValueError(f"Need seeds >= 1 and workers >= 1, got seeds={seeds}, workers={workers}.")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"Rows repeat: {names}. Give each row once.")
    has_tag = any(r.name == "tag" for r in rows)
    init_rows = [r for r in rows if r.subnet_init]
    first = [(r, s) for s in range(seeds) for r in rows if not r.subnet_init]
    if init_rows and not has_tag:  # a tag pretraining that is not reported as a row
        first += [(Row("tag"), s) for s in range(seeds)]
    first.sort(key=lambda task: task[0].router != "tag")  # tag first, so init rows queue early
    total = settings.steps * (len(first) + len(init_rows) * seeds)

    global _listener
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    results: dict[str, dict[int, dict]] = {name: {} for name in names}
    bar = tqdm(total=total, unit="step", desc="DAE-Syn", disable=not progress, smoothing=0.05)
    shown = 0

    def refresh() -> None:
        nonlocal shown
        done = counter.value
        bar.update(done - shown)
        shown = done

    if workers == 1:
        previous_threads = torch.get_num_threads()
        _init_worker(counter, threads)
        _listener = refresh
        executor = InProcess()
    else:
        executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(counter, threads))

    try:
        futures: dict[Future, tuple[Row, int]] = {}

        def submit(row: Row, seed: int, pretrained: dict | None = None) -> None:
            futures[executor.submit(_run, row, seed, settings, pretrained)] = (row, seed)
            refresh()

        for row, seed in first:
            submit(row, seed)
        while futures:
            done, _ = wait(list(futures), timeout=1.0, return_when=FIRST_COMPLETED)
            refresh()
            for future in done:
                row, seed = futures.pop(future)
                scores, carried = future.result()
                if row.name in results:
                    results[row.name][seed] = scores
                    bar.set_postfix_str(f"{row.name} seed {seed}: loss {scores['loss']:.1f}")
                for init_row in init_rows if carried is not None else []:
                    submit(init_row, seed, carried)
    finally:
        executor.shutdown(cancel_futures=True)  # after a failed row, do not wait for the queued ones
        if workers == 1:
            _listener = None
            torch.set_num_threads(previous_threads)
        refresh()
        bar.close()
    return {name: [results[name][s] for s in range(seeds)] for name in names}
