"""One data set of paper B's benchmarks with everything the runs need: its tasks, splits, model builder and
training settings (paper B supplement S6.3, scaled to 2 CPU cores), and the registry of data sets by name.

    bench = build_benchmark("multi_digits")            # local, no download
    bench = build_benchmark("multi_mnist", data_dir=...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from hf_condroute import RoutingConfig

from .data import CANVAS, make_multi_digits
from .images import MULTI_SIDE, image_model, multi_task_splits, svhn_splits
from .model import TASKS, MultiGateMoE
from .recsys import RECSYS_TASKS, RecsysData, RecsysMoE, load_books, load_movielens, make_recsys_standin, subsample
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


RECSYS_TW = (0.1, 0.9)  # paper B's first task-weight setting of Table 1 (watched / read, rating)


def recsys_tasks(weights: tuple[float, float] = RECSYS_TW) -> tuple[Task, ...]:
    return (Task("watched", "binary", weights[0]), Task("rating", "regression", weights[1]))


def _recsys_model(data: RecsysData, embed_dim: int, expert_units: int, head_units: int):
    def build(config: RoutingConfig) -> nn.Module:
        return RecsysMoE(
            config,
            data.num_users,
            data.num_items,
            embed_dim,
            expert_units,
            RECSYS_TASKS,
            head_units=head_units,
            output_bias={"rating": data.rating_mean},
        )

    return build


def recsys_standin(data_dir: str | None = None, quick: bool = False) -> Benchmark:
    """Local: data_dir is not used. The latent-factor stand-in of `recsys` (1,000 users, 500 items, 80,000 /
    10,000 / 10,000 pairs; quick: 200 users, 100 items, 4,000 / 500 / 500). Paper B's MovieLens model scaled for
    the CPU: 16 experts, k = 2, but 32-dimensional embeddings, experts of 64 units (dropout 0.5) and heads of 64
    (the paper: 128, 256, 256). 500 steps of batch 512 (3.2 epochs; about 4 s for Top-k on one CPU thread);
    learning rates log-uniform in [2e-3, 2e-2], 40x the paper's [5e-5, 5e-4], which is for 100 epochs: embeddings
    that start at +-0.05 must move in 500 steps (at 3e-3 the stand-in's AUC was 59 %, at 1e-2 79 %)."""
    data = make_recsys_standin(200, 100, (4_000, 500, 500)) if quick else make_recsys_standin()
    return Benchmark(
        name="recsys_standin",
        title="Recsys stand-in",
        tasks=recsys_tasks(),
        splits=data.splits,
        build_model=_recsys_model(data, 32, 64, 64),
        num_experts=16,
        k=2,
        batch_size=512,
        steps=30 if quick else 500,
        eval_every=10 if quick else 100,
        lr_range=(2e-3, 2e-2),
        kind="recommender",
        standin="MovieLens (two tasks, watched and rating): a latent-factor model of 1,000 users in 4 segments and "
        "500 items in 4 genres with segment-specific interactions (hf_condroute.studies.moesart_bench.recsys)",
        description="paper B's multi-task recommender on a local latent-factor stand-in",
    )


def movielens(data_dir: str | None = None, quick: bool = False) -> Benchmark:
    """MovieLens (ml-1m ratings.dat or a ratings.csv) from data_dir, 1:1 sampled negatives, 80 / 10 / 10 %.
    Paper B's model: 128-dimensional embeddings, 16 experts of 256 units, heads of 256, k = 2, batch 512. 3,000
    steps (about one epoch of ml-1m's 1.6M training pairs; the paper: 100 epochs with early stopping), learning
    rates in [1.5e-4, 1.5e-3] (3x the paper's range, for the far shorter training). quick: at most 20,000 / 2,000 /
    2,000 pairs, 30 steps."""
    data = load_movielens(data_dir)
    if quick:
        data = subsample(data, (20_000, 2_000, 2_000))
    return Benchmark(
        name="movielens",
        title="MovieLens",
        tasks=recsys_tasks(),
        splits=data.splits,
        build_model=_recsys_model(data, 128, 256, 256),
        num_experts=16,
        k=2,
        batch_size=512,
        steps=30 if quick else 3_000,
        eval_every=10 if quick else 500,
        lr_range=(1.5e-4, 1.5e-3),
        kind="recommender",
        description="paper B's MovieLens: watched (1:1 sampled negatives) and rating",
    )


def books(data_dir: str | None = None, quick: bool = False) -> Benchmark:
    """Book-Crossing (BX-Book-Ratings.csv) from data_dir: users and books with >= 5 records, read = an explicit
    rating, 70 / 15 / 15 % (the paper's 389,706 / 83,509 / 83,509; see `recsys`). Paper B's model: 64-dimensional
    embeddings, 9 experts of 128 units, heads of 256, k = 4, batch 2048. 1,000 steps (about 5 epochs; the paper:
    100 with early stopping), learning rates in [1.5e-4, 1.5e-3] (3x the paper's). quick: at most 20,000 / 2,000 /
    2,000 rows, 30 steps."""
    data = load_books(data_dir)
    if quick:
        data = subsample(data, (20_000, 2_000, 2_000))
    return Benchmark(
        name="books",
        title="Books",
        tasks=recsys_tasks(),
        splits=data.splits,
        build_model=_recsys_model(data, 64, 128, 256),
        num_experts=9,
        k=4,
        batch_size=2048,
        steps=30 if quick else 1_000,
        eval_every=10 if quick else 100,
        lr_range=(1.5e-4, 1.5e-3),
        kind="recommender",
        description="paper B's Books (Book-Crossing): read (an explicit rating among the records) and rating",
    )


def _multi_image(name: str, title: str, source: str, num_experts: int, k: int):
    def build(data_dir: str | None = None, quick: bool = False) -> Benchmark:
        return Benchmark(
            name=name,
            title=title,
            tasks=tuple(Task(t, "multiclass", 0.5) for t in TASKS),
            splits=multi_task_splits(source, data_dir, quick),
            build_model=lambda config: image_model(config, MULTI_SIDE, TASKS),
            num_experts=num_experts,
            k=k,
            batch_size=512,
            steps=20 if quick else 600,
            eval_every=10 if quick else 100,
            lr_range=(3e-4, 3e-3),
            description=f"paper B's {title}: two 28x28 images shifted by 4 pixels onto 36x36, 100k / 20k / 20k",
        )

    build.__doc__ = (
        f"{title} from data_dir through `datasets` (see `images`). Paper B's model: {num_experts} CNN experts, "
        f"k = {k}, batch 512. 600 steps (about 3 epochs of the 100,000 pairs; the paper: 200 with early stopping; "
        "about 0.9 s a step for 8 experts at k = 4 on one CPU thread), learning rates in [3e-4, 3e-3] (3x the "
        "paper's [1e-4, 1e-3], for the shorter training). quick: 2,000 / 500 / 500 pairs, 20 steps."
    )
    return build


multi_mnist = _multi_image("multi_mnist", "Multi-MNIST", "mnist", 8, 4)
multi_fashion_mnist = _multi_image("multi_fashion_mnist", "Multi-FashionMNIST", "fashion_mnist", 5, 2)


def svhn(data_dir: str | None = None, quick: bool = False) -> Benchmark:
    """SVHN (cropped digits) from data_dir through `datasets`: train 73,257, test 26,032, 50,000 of extra as
    validation (without extra: 10 % of train, see `images`). One task and one gate over 8 CNN experts, k = 2, batch
    512. 600 steps (about 4 epochs; the paper: 250 at a fixed 1e-4), learning rates in [3e-4, 3e-3] for the shorter
    training. quick: 2,000 / 500 / 500 images, 20 steps."""
    splits, val_from = svhn_splits(data_dir, quick)
    return Benchmark(
        name="svhn",
        title="SVHN",
        tasks=(Task("digit", "multiclass", 1.0),),
        splits=splits,
        build_model=lambda config: image_model(config, 32, ("digit",), channels=3),
        num_experts=8,
        k=2,
        batch_size=512,
        steps=20 if quick else 600,
        eval_every=10 if quick else 100,
        lr_range=(3e-4, 3e-3),
        description=f"paper B's SVHN, one gate; validation from {val_from}",
    )


BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "multi_digits": multi_digits,
    "recsys_standin": recsys_standin,
    "movielens": movielens,
    "books": books,
    "multi_mnist": multi_mnist,
    "multi_fashion_mnist": multi_fashion_mnist,
    "svhn": svhn,
}
DEFAULT_BENCHMARKS = ("multi_digits", "recsys_standin")


def build_benchmark(name: str, data_dir: str | None = None, quick: bool = False, steps: int | None = None) -> Benchmark:
    """Every builder takes (data_dir, quick): the folder of a real data set's files (None for local ones), and the
    small sizes the quick run (and CI) uses. steps: another training budget than the data set's (the validation
    loss is still measured every `eval_every` steps)."""
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown data set {name!r}: choose from {', '.join(BENCHMARKS)}.")
    bench = BENCHMARKS[name](data_dir=data_dir, quick=quick)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        bench = replace(bench, steps=steps, eval_every=min(bench.eval_every, steps))
    return bench
