"""Paper B's recommender and real image benchmarks: the latent-factor stand-in, the MovieLens / Book-Crossing /
MNIST / FashionMNIST / SVHN loaders on miniature copies of their published formats, and the recommender MoE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_condroute.block.step import RoutingStep
from hf_condroute.studies.moesart_bench.benchmark import build_benchmark
from hf_condroute.studies.moesart_bench.model import MultiGateMoE, routing_config_for
from hf_condroute.studies.moesart_bench.recsys import RecsysMoE, latent_model, load_books, make_recsys_standin
from hf_condroute.studies.moesart_bench.tasks import total_loss


def pairs(split):
    return list(zip(split.inputs["user"].tolist(), split.inputs["item"].tolist()))


# ------------------------------------------------------------------------------------------------ stand-in


@pytest.fixture(scope="module")
def standin():
    return make_recsys_standin(200, 100, (2_000, 300, 300), seed=0)


def test_standin_is_deterministic_and_shaped(standin):
    again = make_recsys_standin(200, 100, (2_000, 300, 300), seed=0)
    other = make_recsys_standin(200, 100, (2_000, 300, 300), seed=1)
    for s in ("train", "val", "test"):
        a, b = standin.splits[s], again.splits[s]
        assert torch.equal(a.labels, b.labels) and torch.equal(a.mask, b.mask)
        assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in ("user", "item"))
    assert not torch.equal(standin.splits["train"].labels, other.splits["train"].labels)
    assert {s: len(d) for s, d in standin.splits.items()} == {"train": 2_000, "val": 300, "test": 300}
    tr = standin.splits["train"]
    assert tr.labels.shape == (2_000, 2) and tr.mask.shape == (2_000, 2) and tr.inputs["user"].dtype == torch.long
    assert int(tr.inputs["user"].max()) < 200 and int(tr.inputs["item"].max()) < 100


def test_standin_rating_exists_only_for_watched_pairs(standin):
    for split in standin.splits.values():
        watched, rating = split.labels[:, 0], split.labels[:, 1]
        assert split.mask[:, 0].all() and torch.equal(split.mask[:, 1], watched == 1)
        assert set(watched.unique().tolist()) <= {0.0, 1.0}
        assert set(rating[split.mask[:, 1]].unique().tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
        assert (rating[~split.mask[:, 1]] == 0).all()
    tr = standin.splits["train"]
    assert standin.rating_mean == pytest.approx(float(tr.labels[tr.mask[:, 1], 1].mean()))


def test_standin_splits_are_disjoint_pairs(standin):
    sets = {s: set(pairs(d)) for s, d in standin.splits.items()}
    assert sum(len(p) for p in sets.values()) == 2_600  # distinct within each split too
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]


def test_standin_watched_follows_the_latent_sigmoid(standin):
    latent = latent_model(200, 100, seed=0)
    u = torch.cat([d.inputs["user"] for d in standin.splits.values()]).numpy()
    i = torch.cat([d.inputs["item"] for d in standin.splits.values()]).numpy()
    watched = torch.cat([d.labels[:, 0] for d in standin.splits.values()]).numpy()
    p = 1 / (1 + np.exp(-latent.watch_logit(u, i)))
    assert abs(watched.mean() - p.mean()) < 0.03  # 2,600 Bernoulli draws: sd about 0.01
    hi, lo = p > 0.8, p < 0.2
    assert watched[hi].mean() > 0.7 and watched[lo].mean() < 0.3
    m = watched == 1
    rating = torch.cat([d.labels[:, 1] for d in standin.splits.values()]).numpy()
    assert np.corrcoef(latent.rating_mean(u[m], i[m]), rating[m])[0, 1] > 0.6


# ------------------------------------------------------------------------------------------------ recommender files


def check_recsys(bench, records: dict, num_users: int, num_items: int):
    """records: {(user index, item index): rating or 0 (implicit)} of what the file should give."""
    assert bench.kind == "recommender" and [t.name for t in bench.tasks] == ["watched", "rating"]
    assert [t.kind for t in bench.tasks] == ["binary", "regression"] and bench.tasks[0].weight == 0.1
    rows = []
    for split in bench.splits.values():
        for n, pair in enumerate(pairs(split)):
            rows.append((pair, split.labels[n].tolist(), split.mask[n].tolist()))
    assert len({r[0] for r in rows}) == len(rows)  # disjoint splits, no pair twice
    model = bench.build_model(routing_config_for("top_k", bench.num_experts, bench.k))
    assert model.user.num_embeddings == num_users and model.item.num_embeddings == num_items
    return rows


def test_movielens_dat_reindexed_with_one_negative_per_rating(tmp_path):
    ratings = {(10, 3): 5, (10, 7): 3, (20, 7): 4, (20, 11): 1, (30, 3): 2, (40, 11): 4, (40, 3): 3}
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    lines = [f"{u}::{m}::{r}::97830{n}" for n, ((u, m), r) in enumerate(ratings.items())]
    # two more movies, so that every user has at least as many unrated movies as rated ones
    lines += ["50::13::4::978300000", "50::17::2::978300001"]
    ratings.update({(50, 13): 4, (50, 17): 2})
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
    bench = build_benchmark("movielens", data_dir=tmp_path, quick=True)
    uidx = {u: n for n, u in enumerate([10, 20, 30, 40, 50])}
    iidx = {m: n for n, m in enumerate([3, 7, 11, 13, 17])}
    rows = check_recsys(bench, ratings, 5, 5)
    expected = {(uidx[u], iidx[m]): r for (u, m), r in ratings.items()}
    pos = {p: lab for p, lab, mask in rows if lab[0] == 1}
    neg = [(p, lab, mask) for p, lab, mask in rows if lab[0] == 0]
    assert {p: lab[1] for p, lab in pos.items()} == {p: float(r) for p, r in expected.items()}
    assert all(mask == [True, True] for p, lab, mask in rows if lab[0] == 1)
    assert len(neg) == len(expected)  # 1:1
    assert all(mask == [True, False] and lab[1] == 0 and p not in expected for p, lab, mask in neg)
    per_user = {}
    for p, _, _ in neg:
        per_user[p[0]] = per_user.get(p[0], 0) + 1
    assert per_user == {u: sum(p[0] == u for p in expected) for u in per_user}  # same user as each positive
    assert bench.sizes == {"train": 14, "val": 2, "test": 2}  # 80 / 10 / 10 % of the 18 pairs


def test_movielens_csv_half_stars_and_rating_bias(tmp_path):
    text = "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n7,31,4.5,1260759182\n"
    text += "7,1061,4.0,1260759185\n9,1129,0.5,1260759205\n"
    (tmp_path / "ratings.csv").write_text(text)
    bench = build_benchmark("movielens", data_dir=tmp_path, quick=True)
    rows = check_recsys(bench, {}, 3, 4)
    ratings = sorted(lab[1] for _, lab, _ in rows if lab[0] == 1)
    assert ratings == [0.5, 2.5, 3.0, 4.0, 4.5]
    tr = bench.splits["train"]
    model = bench.build_model(routing_config_for("top_k", bench.num_experts, bench.k))
    assert float(model.output_bias[1]) == pytest.approx(float(tr.labels[tr.mask[:, 1], 1].mean()))


def test_book_crossing_filters_reindexes_and_reads_explicit_ratings(tmp_path):
    users = ["11", "12", "13", "14", "15"]
    books = ["0001", "0002", "0003", "0004", "0005", "38\u00e9X"]  # an ISBN with a latin-1 character
    lines = ['"User-ID";"ISBN";"Book-Rating"']
    expected = {}
    for a, u in enumerate(users):
        for b, isbn in enumerate(books):
            r = (a + b) % 11 if (a + b) % 3 else 0  # some implicit (0) records
            lines.append(f'"{u}";"{isbn}";"{r}"')
            expected[(a, b)] = r
    lines += ['"99";"0001";"8"', '"99";"0002";"0"']  # a user with 2 records: filtered
    lines += ['"11";"lonely";"7"']  # a book with 1 record: filtered
    (tmp_path / "BX-Book-Ratings.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode("latin-1"))
    bench = build_benchmark("books", data_dir=tmp_path, quick=True)
    assert (bench.num_experts, bench.k, bench.batch_size) == (9, 4, 2048)
    rows = check_recsys(bench, expected, 5, 6)
    assert len(rows) == 30
    got = {p: (lab, mask) for p, lab, mask in rows}
    for p, r in expected.items():
        lab, mask = got[p]
        assert lab == [float(r > 0), float(r)] and mask == [True, r > 0]
    assert bench.sizes == {"train": 21, "val": 4, "test": 5}  # 70 / 15 / 15 %
    sampled = load_books(tmp_path, negatives="sampled")  # every record a positive, plus 1:1 unobserved pairs:
    labels = torch.cat([d.labels for d in sampled.splits.values()])
    mask = torch.cat([d.mask for d in sampled.splits.values()])
    assert labels.shape[0] == 30 and (labels[:, 0] == 1).all()  # none here, the filtered 5 x 6 grid is full
    assert int(mask[:, 1].sum()) == sum(r > 0 for r in expected.values())


@pytest.mark.parametrize(("name", "file"), [("movielens", "ratings.dat"), ("books", "BX-Book-Ratings.csv")])
def test_missing_files_are_named(tmp_path, name, file):
    with pytest.raises(FileNotFoundError, match=file):
        build_benchmark(name, data_dir=tmp_path)
    with pytest.raises(ValueError, match="data_dir"):
        build_benchmark(name)


# ------------------------------------------------------------------------------------------------ images


def image_dataset(n, side, rgb, seed):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (n, side, side, 3) if rgb else (n, side, side)
    arrays = rng.integers(0, 256, shape, dtype=np.uint8)
    images = [Image.fromarray(a, "RGB" if rgb else "L") for a in arrays]
    labels = rng.integers(0, 10, n).tolist()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features), arrays, labels


def check_pairs(bench, train_arrays, train_labels, test_arrays, test_labels):
    assert [t.name for t in bench.tasks] == ["task1", "task2"]
    for split, (arrays, labels) in {
        "train": (train_arrays, train_labels),
        "val": (train_arrays, train_labels),
        "test": (test_arrays, test_labels),
    }.items():
        data = bench.splits[split]
        assert data.inputs.shape == (len(data), 1, 36, 36) and data.inputs.dtype == torch.uint8
        for n in range(3):
            a, b = data.pool[data.sources[n]].tolist()
            assert a != b
            canvas = np.zeros((36, 36), dtype=np.uint8)
            canvas[:28, :28] = arrays[a]
            canvas[8:, 8:] = np.maximum(canvas[8:, 8:], arrays[b])
            np.testing.assert_array_equal(data.inputs[n, 0].numpy(), canvas)
            assert data.labels[n].tolist() == [labels[a], labels[b]]
    assert not set(bench.splits["train"].pool.tolist()) & set(bench.splits["val"].pool.tolist())


def test_multi_mnist_from_save_to_disk(tmp_path):
    import datasets

    train, tr_arr, tr_lab = image_dataset(40, 28, False, 0)
    test, te_arr, te_lab = image_dataset(20, 28, False, 1)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "mnist"))
    bench = build_benchmark("multi_mnist", data_dir=tmp_path, quick=True)
    assert (bench.num_experts, bench.k, bench.batch_size) == (8, 4, 512)
    assert bench.sizes == {"train": 2_000, "val": 500, "test": 500}
    check_pairs(bench, tr_arr, tr_lab, te_arr, te_lab)
    model = bench.build_model(routing_config_for("top_k", bench.num_experts, bench.k))
    x = bench.splits["train"].inputs[:4]
    out = model(x)
    assert set(out) == {"task1", "task2"} and all(o.shape == (4, 10) for o in out.values())
    model.eval()
    with torch.no_grad():
        ref = MultiGateMoE.forward(model, x.float() / 255.0)  # the plain model on float images
        torch.testing.assert_close(model(x)["task1"], ref["task1"])


def test_multi_fashion_mnist_from_hub_parquet_layout(tmp_path):
    train, tr_arr, tr_lab = image_dataset(30, 28, False, 2)
    test, te_arr, te_lab = image_dataset(12, 28, False, 3)
    folder = tmp_path / "fashion_mnist" / "fashion_mnist"
    folder.mkdir(parents=True)
    train.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    test.to_parquet(str(folder / "test-00000-of-00001.parquet"))
    bench = build_benchmark("multi_fashion_mnist", data_dir=tmp_path, quick=True)
    assert (bench.num_experts, bench.k) == (5, 2)
    check_pairs(bench, tr_arr, tr_lab, te_arr, te_lab)


@pytest.mark.parametrize("with_extra", [True, False])
def test_svhn_splits_validation_from_extra_or_train(tmp_path, with_extra):
    import datasets

    train, tr_arr, tr_lab = image_dataset(30, 32, True, 4)
    test, _, _ = image_dataset(10, 32, True, 5)
    extra, ex_arr, _ = image_dataset(20, 32, True, 6)
    parts = {"train": train, "test": test} | ({"extra": extra} if with_extra else {})
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "svhn"))
    bench = build_benchmark("svhn", data_dir=tmp_path, quick=True)
    assert [t.name for t in bench.tasks] == ["digit"] and (bench.num_experts, bench.k) == (8, 2)
    val_source = ex_arr if with_extra else tr_arr
    assert bench.sizes == ({"train": 30, "val": 20, "test": 10} if with_extra else {"train": 27, "val": 3, "test": 10})
    val = bench.splits["val"].inputs.numpy()
    assert val.shape[1:] == (3, 32, 32)
    src = val_source.transpose(0, 3, 1, 2)
    assert all(any((v == s).all() for s in src) for v in val)
    if not with_extra:
        tr = bench.splits["train"].inputs.numpy()
        assert not any((v == t).all() for v in val for t in tr)  # carved from train, disjoint
    assert bench.splits["train"].labels.shape == (len(bench.splits["train"]), 1)
    model = bench.build_model(routing_config_for("softmax", bench.num_experts, bench.k))
    step = RoutingStep()
    assert model(bench.splits["test"].inputs[:3], step)["digit"].shape == (3, 10)
    assert set(step.records) == {"moe[digit]"}


# ------------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("router", ["top_k", "moesart", "softmax"])
def test_recsys_moe_outputs_per_task_and_each_gate_records(router):
    torch.manual_seed(0)
    config = routing_config_for(router, num_experts=4, k=2)
    model = RecsysMoE(config, 20, 10, 8, 16, head_units=12, output_bias={"rating": 3.5})
    inputs = {"user": torch.randint(0, 20, (6,)), "item": torch.randint(0, 10, (6,))}
    step = RoutingStep()
    out = model(inputs, step)
    assert set(out) == {"watched", "rating"} and all(o.shape == (6,) for o in out.values())
    assert set(step.records) == {"moe[watched]", "moe[rating]"}
    k = 4 if router == "softmax" else 2
    for record in step.records.values():
        assert ((record.decision.experts >= 0).sum(dim=1) <= k).all()
    step.add_to_loss(out["watched"].sum() + out["rating"].sum()).backward()
    assert model.user.weight.grad is not None and all(p.grad is not None for p in model.heads.parameters())
    with torch.no_grad():
        model.heads["rating"][-1].weight.zero_()
        model.heads["rating"][-1].bias.zero_()
    assert torch.allclose(model(inputs)["rating"], torch.full((6,), 3.5))


def test_standin_benchmark_trains_a_step_with_total_loss():
    bench = build_benchmark("recsys_standin", quick=True)
    assert bench.standin and bench.kind == "recommender" and (bench.num_experts, bench.k) == (16, 2)
    assert [t.weight for t in bench.tasks] == [0.1, 0.9]
    torch.manual_seed(0)
    model = bench.build_model(routing_config_for("moesart", bench.num_experts, bench.k))
    batch = bench.splits["train"].take(torch.arange(64))
    step = RoutingStep()
    loss = step.add_to_loss(total_loss(bench.tasks, model(batch.inputs, step), batch))
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) < 5.0  # the rating starts near its mean
    model.eval()
    with torch.no_grad():
        out = model(bench.splits["test"].inputs)
    test = bench.splits["test"]
    assert 0 <= bench.tasks[0].score(out["watched"], test.labels[:, 0]) <= 100
    m = test.mask[:, 1]
    assert bench.tasks[1].score(out["rating"][m], test.labels[m, 1]) > 0
