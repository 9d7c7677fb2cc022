"""Running many (data set, setup, seed) jobs: in this process (workers=1) or in a pool of worker processes (each
single-threaded, the data sets built once per process), every finished job appended to a JSON-lines log so an
interrupted study resumes where it stopped (a job is redone only if its data set's settings changed)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context

import torch

from .benchmark import Benchmark, build_benchmark
from .train import RunSpec, run


@dataclass(frozen=True)
class Job:
    bench: str
    spec: RunSpec
    seed: int

    def key(self, fingerprint: dict) -> str:
        return json.dumps(
            {"bench": self.bench, "spec": asdict(self.spec), "seed": self.seed, "settings": fingerprint[self.bench]},
            sort_keys=True,
        )


def fingerprint(bench: Benchmark) -> dict:
    """What a cached result depends on besides its job."""
    keys = ("sizes", "steps", "batch_size", "eval_every", "num_experts", "k")
    return {k: getattr(bench, k) for k in keys} | {"tasks": [asdict(t) for t in bench.tasks]}


_BENCHES: dict[str, Benchmark] = {}


def _init_worker(names: tuple[str, ...], data_dir: str | None, quick: bool, threads: int, steps: int | None) -> None:
    torch.set_num_threads(threads)
    for n in names:
        _BENCHES[n] = build_benchmark(n, data_dir=data_dir, quick=quick, steps=steps)


def _run_job(job: Job) -> dict:
    start = time.perf_counter()
    result = run(_BENCHES[job.bench], job.spec, job.seed)
    return {"scores": result.scores, "curve": result.curve, "seconds": time.perf_counter() - start}


class Runner:
    """runner.run(jobs) -> {job: {"scores": ..., "seconds": ..., "curve": ...}}, reading and extending the log."""

    def __init__(
        self,
        benches: dict[str, Benchmark],
        data_dir,
        quick: bool,
        workers: int,
        threads: int,
        log: str,
        steps: int | None = None,
    ):
        self.benches, self.data_dir, self.quick, self.steps = benches, data_dir, quick, steps
        self.workers, self.threads, self.log = workers, threads, log
        self.fingerprint = {n: fingerprint(b) for n, b in benches.items()}
        self.done: dict[str, dict] = {}
        self.reused = self.ran = 0  # jobs taken from an earlier invocation's log / run by this one
        if os.path.exists(log):
            with open(log) as f:
                for line in f:
                    if line.strip():
                        record = json.loads(line)
                        self.done[record["key"]] = record["result"]

    def _record(self, key: str, result: dict) -> None:
        self.done[key] = result
        with open(self.log, "a") as f:
            f.write(json.dumps({"key": key, "result": result}) + "\n")

    def run(self, jobs: Iterable[Job], what: str = "runs") -> dict[Job, dict]:
        jobs = list(dict.fromkeys(jobs))
        todo = [j for j in jobs if j.key(self.fingerprint) not in self.done]
        self.reused, self.ran = self.reused + len(jobs) - len(todo), self.ran + len(todo)
        print(f"{what}: {len(jobs)} jobs, {len(jobs) - len(todo)} already in {self.log}", flush=True)
        start = time.perf_counter()

        def progress(n: int, job: Job, result: dict) -> None:
            elapsed = time.perf_counter() - start
            print(
                f"  [{n}/{len(todo)}] {job.bench} {job.spec.router} seed {job.seed}: test loss "
                f"{result['scores']['loss']:.4f} ({result['seconds']:.1f} s; {elapsed / 60:.1f} min so far)",
                flush=True,
            )

        if self.workers == 1 or len(todo) <= 1:
            previous = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            _BENCHES.update(self.benches)
            try:
                for n, job in enumerate(todo, 1):
                    result = _run_job(job)
                    self._record(job.key(self.fingerprint), result)
                    progress(n, job, result)
            finally:
                torch.set_num_threads(previous)
        elif todo:
            names = tuple(self.benches)
            with ProcessPoolExecutor(
                self.workers,
                mp_context=get_context("spawn"),
                initializer=_init_worker,
                initargs=(names, self.data_dir, self.quick, self.threads, self.steps),
            ) as pool:
                futures = {pool.submit(_run_job, job): job for job in todo}
                for n, future in enumerate(as_completed(futures), 1):
                    job = futures[future]
                    result = future.result()
                    self._record(job.key(self.fingerprint), result)
                    progress(n, job, result)
        sys.stdout.flush()
        return {j: self.done[j.key(self.fingerprint)] for j in jobs}
