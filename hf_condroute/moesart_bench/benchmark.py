"""One data set of paper B's benchmarks with everything the runs need: its tasks, splits, model builder and
training settings (paper B supplement S6.3, scaled to 2 CPU cores), and the registry of data sets by name.

    bench = build_benchmark("multi_digits")            # local, no download
    bench = build_benchmark("multi_mnist", data_dir=...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..routing_config import RoutingConfig
from .data import CANVAS, make_multi_digits
from .model import TASKS, MultiGateMoE
from .tasks import Split, Task


@dataclass
class Benchmark:
    """name: the registry key; title: how tables name it; build_model(config) -> a module with
    forward(inputs, step) -> {task name: output}. standin: None for real data, else what the data stands in for
    (every table that uses it says so). lr_range: the random search's log-uniform Adam learning rates."""

    name: str
    title: str
    tasks: tuple[Task, ...]
    splits: dict[str, Split]
    build_model: Callable[[RoutingConfig], nn.Module]
    num_experts: int
    k: int
    batch_size: int
    steps: int
    eval_every: int
    lr_range: tuple[float, float]
    kind: str = "image"  # "image" or "recommender": which tables apply
    standin: str | None = None
    description: str = ""
    sizes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        missing = {"train", "val", "test"} - set(self.splits)
        if missing:
            raise ValueError(f"Benchmark {self.name}: splits {sorted(missing)} are missing.")
        self.sizes = {s: len(d) for s, d in self.splits.items()}


def multi_digits(data_dir: str | None = None, quick: bool = False) -> Benchmark:
    """Local: data_dir is not used. quick: 1,000 / 300 / 300 pairs, 30 steps of batch 64 (the default: 10,000 /
    2,000 / 2,000 pairs, the paper's 5:1:1, and 300 steps of batch 128, about 4 epochs)."""
    sizes = (1_000, 300, 300) if quick else (10_000, 2_000, 2_000)
    splits = {s: Split(d.images, d.labels.float()) for s, d in make_multi_digits(sizes).items()}
    return Benchmark(
        name="multi_digits",
        title="Multi-Digits",
        tasks=tuple(Task(t, "multiclass", 0.5) for t in TASKS),
        splits=splits,
        build_model=lambda config: MultiGateMoE(config, CANVAS),
        num_experts=8,
        k=2,
        batch_size=64 if quick else 128,
        steps=30 if quick else 300,
        eval_every=10 if quick else 50,
        lr_range=(3e-4, 3e-3),
        standin="Multi-MNIST: two of scikit-learn's real 8x8 handwritten digits (enlarged 2x) overlaid on 20x20",
        description="paper B's Multi-MNIST construction on scikit-learn's bundled digits",
    )


BENCHMARKS: dict[str, Callable[..., Benchmark]] = {"multi_digits": multi_digits}
DEFAULT_BENCHMARKS = ("multi_digits",)


def build_benchmark(name: str, data_dir: str | None = None, quick: bool = False) -> Benchmark:
    """Every builder takes (data_dir, quick): the folder of a real data set's files (None for local ones), and the
    small sizes the quick run (and CI) uses."""
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown data set {name!r}: choose from {', '.join(BENCHMARKS)}.")
    return BENCHMARKS[name](data_dir=data_dir, quick=quick)
