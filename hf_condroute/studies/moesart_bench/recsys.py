"""Paper B's recommender benchmarks (section 4.1, supplement S6.1-S6.2): two tasks per user-item pair, task 1
"watched / read" (binary) and task 2 the rating (regression, only where a rating exists: the mask), a local
stand-in, loaders of the published MovieLens and Book-Crossing files, and the multi-gate MoE over user and item
embeddings (`RecsysMoE`).

Local stand-in (`make_recsys_standin`, no download): a latent-factor model with heterogeneous segments, so that
experts can specialise. With U users, I items, C = 4 user segments, G = 4 item genres, D = 8 latent dimensions and
one `numpy.random.default_rng(seed)` drawing, in this order:

    segment s_u ~ Uniform{0..C-1} (u < U),   genre g_i ~ Uniform{0..G-1} (i < I)
    centres mu_c ~ N(0, I_D) (c < C),        nu_g ~ N(0, I_D) (g < G)
    p_u = mu_{s_u} + 0.5 eps_u,              q_i = nu_{g_i} + 0.5 eta_i,         eps_u, eta_i ~ N(0, I_D)
    watch biases b_u ~ N(0, 0.5^2), b_i ~ N(0, 0.5^2);  affinity A[c, g] ~ N(0, 1.5^2)
    per-segment interaction W_c, D x D, entries ~ N(0, 1)
    rating biases c_u ~ N(0, 0.4^2), c_i ~ N(0, 0.4^2); affinity B[c, g] ~ N(0, 0.6^2)
    per-segment rating interaction V_c = 0.5 W_c + sqrt(0.75) W'_c, entries of W'_c ~ N(0, 1)

    watch logit  z(u, i) = b_u + b_i + A[s_u, g_i] + 2 tanh(p_u' W_{s_u} q_i / D)
    rating mean  m(u, i) = 3.6 + c_u + c_i + B[s_u, g_i] + tanh(p_u' V_{s_u} q_i / D)

Pairs: sum(sizes) distinct (u, i) drawn uniformly without replacement from the U x I grid by
`default_rng([seed, 1])`, in a random order, the first sizes[0] the training pairs, the next sizes[1] validation,
the last sizes[2] test (so the splits are disjoint pairs). For each pair, with `default_rng([seed, 2])`:
watched ~ Bernoulli(sigmoid(z)), and rating = clip(round(m + N(0, 0.6^2)), 1, 5), kept only for watched pairs
(label 0 and mask False elsewhere). The segments, genres and latent vectors are not inputs: a model sees the ids
only and must learn them in its embeddings. The interaction differs by segment (W_c, A), so a single dense map of
the concatenated embeddings fits it worse than experts that each handle a segment. The rating's noise floor is
about 0.36 + 1/12 (rounding) in MSE.
Defaults: 1,000 users, 500 items, 80,000 / 10,000 / 10,000 pairs (MovieLens' 80 / 10 / 10 %; 160 training pairs
per user on average: with 1,500 users and 800 items, 53, a model learnt little in 500 steps). Test-set scores of the
true model (seed 0): watched AUC 86.7 % from z itself, rating MSE 0.449 from m; user and item biases alone give
AUC 62.5 % and MSE 1.02 (the rating's variance is about 1.02).

Real data (supplement S6.1, after Wang et al. 2020), from the published files in a local folder:
- MovieLens: ml-1m / ml-10m `ratings.dat` ("UserID::MovieID::Rating::Timestamp") or ml-latest(-small) / ml-20m /
  ml-25m `ratings.csv` (header userId,movieId,rating,timestamp). Positives: every rated pair, watched = 1 with its
  rating. Negatives: one per positive (1:1), for the same user an item that user has not rated, drawn uniformly
  among those (distinct, seeded), watched = 0 without a rating (mask False). All pairs shuffled and split
  80 / 10 / 10 % (ml-1m: 1,000,209 ratings -> 2,000,418 pairs -> the paper's ~1.6M / 200k / 200k).
- Books (Book-Crossing, Ziegler et al. 2005): `BX-Book-Ratings.csv` (';'-separated, quoted, latin-1, columns
  "User-ID";"ISBN";"Book-Rating", 0 = an implicit record without a rating). Users and books with at least 5 records
  are kept (one pass over the full counts, as the paper states it; `kcore=True` repeats it until stable). The
  paper's sizes, 389,706 / 83,509 / 83,509 = its 556,724 filtered records split 70 / 15 / 15 %, say no negatives
  were added; its task-1 AUC (56-78 %) and task-2 MSE (2.7 on 1..10) fit reading "read" as "the record has an
  explicit rating" and the rating over those only. That is `negatives="implicit"` (default): every filtered record
  is a row, read = 1 with its rating for Book-Rating 1..10, read = 0 without one for 0. `negatives="sampled"`
  treats every record as a positive and adds 1:1 sampled unobserved pairs as MovieLens does (rating mask on the
  explicit ones), split 80 / 10 / 10 %.
User and item ids are re-indexed to 0..U-1 / 0..I-1 in the order of the sorted original ids (numbers for
MovieLens, ISBN strings for Books), over the whole file after filtering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hf_condroute import MultiGateBlock, RoutingConfig, RoutingInputs, RoutingStep, build_router
from hf_condroute.experts import ModuleBank

from .tasks import Split

RECSYS_TASKS = ("watched", "rating")
SPLITS = ("train", "val", "test")
SEGMENTS, GENRES, LATENT = 4, 4, 8
MOVIELENS_FILES = ("ratings.dat", "ratings.csv")
BOOKS_FILE = "BX-Book-Ratings.csv"


@dataclass
class RecsysData:
    """splits: {"train", "val", "test"} of Split(inputs {"user", "item"} (n,) long, labels (n, 2) = (watched 0/1,
    rating or 0), mask (n, 2): watched always, rating only where it exists). rating_mean: the mean training
    rating (the model's fixed rating bias)."""

    splits: dict[str, Split]
    num_users: int
    num_items: int
    rating_mean: float


# ---------------------------------------------------------------------------------------------------- stand-in


@dataclass
class LatentModel:
    """The stand-in's latent quantities (see the module docstring)."""

    segment: np.ndarray  # (U,)
    genre: np.ndarray  # (I,)
    p: np.ndarray  # (U, D)
    q: np.ndarray  # (I, D)
    b_user: np.ndarray
    b_item: np.ndarray
    affinity: np.ndarray  # A (C, G)
    w: np.ndarray  # (C, D, D)
    c_user: np.ndarray
    c_item: np.ndarray
    rating_affinity: np.ndarray  # B (C, G)
    v: np.ndarray  # (C, D, D)

    def watch_logit(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        s = self.segment[u]
        inter = np.einsum("nd,nde,ne->n", self.p[u], self.w[s], self.q[i]) / LATENT
        return self.b_user[u] + self.b_item[i] + self.affinity[s, self.genre[i]] + 2.0 * np.tanh(inter)

    def rating_mean(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        s = self.segment[u]
        inter = np.einsum("nd,nde,ne->n", self.p[u], self.v[s], self.q[i]) / LATENT
        return 3.6 + self.c_user[u] + self.c_item[i] + self.rating_affinity[s, self.genre[i]] + np.tanh(inter)


def latent_model(num_users: int, num_items: int, seed: int = 0) -> LatentModel:
    rng = np.random.default_rng(seed)
    segment = rng.integers(0, SEGMENTS, num_users)
    genre = rng.integers(0, GENRES, num_items)
    mu = rng.standard_normal((SEGMENTS, LATENT))
    nu = rng.standard_normal((GENRES, LATENT))
    p = mu[segment] + 0.5 * rng.standard_normal((num_users, LATENT))
    q = nu[genre] + 0.5 * rng.standard_normal((num_items, LATENT))
    b_user = 0.5 * rng.standard_normal(num_users)
    b_item = 0.5 * rng.standard_normal(num_items)
    affinity = 1.5 * rng.standard_normal((SEGMENTS, GENRES))
    w = rng.standard_normal((SEGMENTS, LATENT, LATENT))
    c_user = 0.4 * rng.standard_normal(num_users)
    c_item = 0.4 * rng.standard_normal(num_items)
    rating_affinity = 0.6 * rng.standard_normal((SEGMENTS, GENRES))
    v = 0.5 * w + math.sqrt(0.75) * rng.standard_normal((SEGMENTS, LATENT, LATENT))
    return LatentModel(segment, genre, p, q, b_user, b_item, affinity, w, c_user, c_item, rating_affinity, v)


def _split(users, items, watched, rating, has_rating, bounds) -> dict[str, Split]:
    labels = torch.from_numpy(np.stack([watched, np.where(has_rating, rating, 0.0)], axis=1).astype(np.float32))
    mask = torch.from_numpy(np.stack([np.ones_like(has_rating), has_rating], axis=1).astype(bool))
    u, i = torch.from_numpy(users.astype(np.int64)), torch.from_numpy(items.astype(np.int64))
    out = {}
    for split, (a, b) in zip(SPLITS, zip(bounds[:-1], bounds[1:])):
        out[split] = Split({"user": u[a:b], "item": i[a:b]}, labels[a:b], mask[a:b])
    return out


def _data(splits: dict[str, Split], num_users: int, num_items: int) -> RecsysData:
    train = splits["train"]
    m = train.mask[:, 1]
    mean = float(train.labels[m, 1].mean()) if m.any() else 0.0
    return RecsysData(splits, num_users, num_items, mean)


def make_recsys_standin(
    num_users: int = 1_000,
    num_items: int = 500,
    sizes: tuple[int, int, int] = (80_000, 10_000, 10_000),
    seed: int = 0,
) -> RecsysData:
    """The local stand-in of the module docstring."""
    if len(sizes) != 3 or min(sizes) < 1 or sum(sizes) > num_users * num_items:
        raise ValueError(f"sizes must be three positive pair counts within {num_users} x {num_items}, got {sizes}.")
    latent = latent_model(num_users, num_items, seed)
    keys = np.random.default_rng([seed, 1]).choice(num_users * num_items, sum(sizes), replace=False)
    users, items = keys // num_items, keys % num_items
    rng = np.random.default_rng([seed, 2])
    watched = (rng.random(len(keys)) < 1.0 / (1.0 + np.exp(-latent.watch_logit(users, items)))).astype(np.float32)
    rating = np.clip(np.round(latent.rating_mean(users, items) + 0.6 * rng.standard_normal(len(keys))), 1, 5)
    bounds = np.cumsum([0, *sizes])
    return _data(_split(users, items, watched, rating, watched > 0, bounds), num_users, num_items)


# ---------------------------------------------------------------------------------------------------- real data


def _find(data_dir: str | Path | None, names: tuple[str, ...], what: str) -> Path:
    """The first of `names` in data_dir or one of its sub-folders."""
    if data_dir is None:
        raise ValueError(f"{what} needs data_dir: the folder holding {' or '.join(names)}.")
    root = Path(data_dir)
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"{what}: no {' or '.join(names)} in {root} (nor in a sub-folder of it). Put the published file there, "
        f"e.g. ml-1m/ratings.dat or ml-latest-small/ratings.csv for MovieLens, {BOOKS_FILE} for Books."
    )


def _sample_negatives(users: np.ndarray, items: np.ndarray, num_items: int, seed: int) -> tuple:
    """One negative per positive: for the same user, an item the user has no record of, uniform among those and
    distinct from the user's other negatives. Users with more records than unrecorded items get fewer."""
    rng = np.random.default_rng([seed, 3])
    taken = np.unique(users.astype(np.int64) * num_items + items)
    neg_users, neg_keys = users.astype(np.int64), np.empty(0, dtype=np.int64)
    for _ in range(100):
        if len(neg_users) == 0:
            break
        cand = neg_users * num_items + rng.integers(0, num_items, len(neg_users))
        cand, first = np.unique(cand, return_index=True)  # distinct among this round's draws
        ok = ~np.isin(cand, taken, assume_unique=True)
        cand = cand[ok]
        neg_keys = np.concatenate([neg_keys, cand])
        taken = np.union1d(taken, cand)
        keep = np.ones(len(neg_users), dtype=bool)
        keep[first[ok]] = False
        neg_users = neg_users[keep]
    return neg_keys // num_items, neg_keys % num_items


def _reindex(values: np.ndarray) -> tuple[np.ndarray, int]:
    uniq, idx = np.unique(values, return_inverse=True)
    return idx.astype(np.int64), len(uniq)


def _shuffled_splits(users, items, watched, rating, has_rating, fractions, seed) -> dict[str, Split]:
    n = len(users)
    perm = np.random.default_rng([seed, 4]).permutation(n)
    n_train = int(fractions[0] * n)
    n_val = (n - n_train) // 2 if fractions[1] == fractions[2] else int(fractions[1] * n)
    bounds = [0, n_train, n_train + n_val, n]
    return _split(users[perm], items[perm], watched[perm], rating[perm], has_rating[perm], bounds)


def _with_negatives(users, items, ratings, has_rating, num_items, seed) -> tuple:
    neg_u, neg_i = _sample_negatives(users, items, num_items, seed)
    k = len(neg_u)
    return (
        np.concatenate([users, neg_u]),
        np.concatenate([items, neg_i]),
        np.concatenate([np.ones(len(users), np.float32), np.zeros(k, np.float32)]),
        np.concatenate([ratings, np.zeros(k)]),
        np.concatenate([has_rating, np.zeros(k, dtype=bool)]),
    )


def read_movielens(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(original user ids, original movie ids, ratings) of a ratings.dat ("::") or ratings.csv (with header)."""
    import io

    import pandas as pd

    path = Path(path)
    if path.suffix == ".dat":
        text = path.read_text(encoding="latin-1").replace("::", "\t")
        df = pd.read_csv(io.StringIO(text), sep="\t", header=None, names=["user", "item", "rating", "ts"])
    else:
        df = pd.read_csv(path).rename(columns={"userId": "user", "movieId": "item"})
        if not {"user", "item", "rating"} <= set(df.columns):
            raise ValueError(f"{path}: expected the header userId,movieId,rating,timestamp, got {list(df.columns)}.")
    return df["user"].to_numpy(), df["item"].to_numpy(), df["rating"].to_numpy(dtype=np.float64)


def load_movielens(data_dir: str | Path | None, seed: int = 0) -> RecsysData:
    """MovieLens from data_dir (see the module docstring): 1:1 sampled negatives, 80 / 10 / 10 % of the pairs."""
    u_raw, i_raw, ratings = read_movielens(_find(data_dir, MOVIELENS_FILES, "MovieLens"))
    users, num_users = _reindex(u_raw)
    items, num_items = _reindex(i_raw)
    rows = _with_negatives(users, items, ratings, np.ones(len(users), dtype=bool), num_items, seed)
    return _data(_shuffled_splits(*rows, (0.8, 0.1, 0.1), seed), num_users, num_items)


def read_book_crossing(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, ISBNs, Book-Rating 0..10) of BX-Book-Ratings.csv."""
    import pandas as pd

    df = pd.read_csv(path, sep=";", quotechar='"', encoding="latin-1", dtype=str, escapechar="\\", on_bad_lines="skip")
    cols = {"User-ID", "ISBN", "Book-Rating"}
    if not cols <= set(df.columns):
        raise ValueError(f"{path}: expected the columns {sorted(cols)}, got {list(df.columns)}.")
    rating = pd.to_numeric(df["Book-Rating"], errors="coerce")
    ok = rating.notna().to_numpy()
    return df["User-ID"].to_numpy()[ok], df["ISBN"].to_numpy()[ok], rating.to_numpy(dtype=np.float64)[ok]


def filter_min_records(users, items, min_records: int = 5, kcore: bool = False) -> np.ndarray:
    """Which records have a user and an item with at least min_records records each (once, or until stable)."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        _, ui, uc = np.unique(users[keep], return_inverse=True, return_counts=True)
        _, ii, ic = np.unique(items[keep], return_inverse=True, return_counts=True)
        ok = (uc[ui] >= min_records) & (ic[ii] >= min_records)
        if ok.all():
            return keep
        keep[np.flatnonzero(keep)[~ok]] = False
        if not kcore:
            return keep


def load_books(
    data_dir: str | Path | None, seed: int = 0, negatives: str = "implicit", kcore: bool = False
) -> RecsysData:
    """Book-Crossing from data_dir (see the module docstring for `negatives` and the filter)."""
    if negatives not in ("implicit", "sampled"):
        raise ValueError(f"negatives must be 'implicit' or 'sampled', got {negatives!r}.")
    u_raw, i_raw, ratings = read_book_crossing(_find(data_dir, (BOOKS_FILE,), "Books"))
    keep = filter_min_records(u_raw, i_raw, 5, kcore)
    users, num_users = _reindex(u_raw[keep])
    items, num_items = _reindex(i_raw[keep])
    ratings = ratings[keep]
    explicit = ratings > 0
    if negatives == "implicit":
        rows = (users, items, explicit.astype(np.float32), ratings, explicit)
        fractions = (0.7, 0.15, 0.15)
    else:
        rows = _with_negatives(users, items, ratings, explicit, num_items, seed)
        fractions = (0.8, 0.1, 0.1)
    return _data(_shuffled_splits(*rows, fractions, seed), num_users, num_items)


def subsample(data: RecsysData, sizes: tuple[int, int, int], seed: int = 0) -> RecsysData:
    """At most sizes rows of each split (a quick run on real data), chosen at random."""
    splits = {}
    for s, (split, n) in enumerate(zip(SPLITS, sizes)):
        d = data.splits[split]
        idx = torch.from_numpy(np.random.default_rng([seed, 5, s]).permutation(len(d))[:n])
        splits[split] = d.take(idx)
    return RecsysData(splits, data.num_users, data.num_items, data.rating_mean)


# ---------------------------------------------------------------------------------------------------- model


def dense_expert(in_features: int, units: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, units), nn.ReLU(), nn.Dropout(dropout))


class RecsysMoE(nn.Module):
    """Paper B's recommender MoE (supplement S6.2): user and item embeddings, concatenated, feed one gate per task
    (`MultiGateBlock`) over N experts, each a ReLU dense layer of expert_units with dropout; per task a head
    dense(head_units) + ReLU + dense(1). forward({"user": (B,) long, "item": (B,) long}, step) ->
    {task: (B,)}: the logit for a binary task, the prediction for a regression one. output_bias: a fixed number
    added to a task's output (the mean training rating, so that the rating's squared error starts near its
    variance). embed_init: the embeddings start uniform in [-embed_init, embed_init] (Keras' default 0.05; None
    keeps PyTorch's N(0, 1), with which the stand-in learnt markedly slower)."""

    def __init__(
        self,
        config: RoutingConfig,
        num_users: int,
        num_items: int,
        embed_dim: int,
        expert_units: int,
        tasks: tuple[str, ...] = RECSYS_TASKS,
        dropout: float = 0.5,
        head_units: int = 256,
        output_bias: dict[str, float] | None = None,
        embed_init: float | None = 0.05,
    ):
        super().__init__()
        self.user = nn.Embedding(num_users, embed_dim)
        self.item = nn.Embedding(num_items, embed_dim)
        if embed_init is not None:
            for emb in (self.user, self.item):
                nn.init.uniform_(emb.weight, -embed_init, embed_init)
        in_features = 2 * embed_dim
        bank = ModuleBank(
            [dense_expert(in_features, expert_units, dropout) for _ in range(config.num_experts)],
            in_features,
            expert_units,
        )
        gates = {t: build_router(config, in_features, f"moe[{t}]") for t in tasks}
        self.moe = MultiGateBlock(gates, bank, name="moe")
        self.heads = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(expert_units, head_units), nn.ReLU(), nn.Linear(head_units, 1)) for t in tasks}
        )
        unknown = set(output_bias or {}) - set(tasks)
        if unknown:
            raise ValueError(f"output_bias names tasks {sorted(unknown)} that are not among {tasks}.")
        bias = torch.tensor([float((output_bias or {}).get(t, 0.0)) for t in tasks])
        self.register_buffer("output_bias", bias)

    def forward(self, inputs: dict[str, torch.Tensor], step: RoutingStep | None = None) -> dict[str, torch.Tensor]:
        x = torch.cat([self.user(inputs["user"]), self.item(inputs["item"])], dim=-1)
        mixed = self.moe(x, RoutingInputs(step=step))
        return {t: self.heads[t](mixed[t]).squeeze(-1) + self.output_bias[n] for n, t in enumerate(self.heads)}
