"""Paper A's Res-Dom on the CPU: the six digit domains, the DomainNet loaders, the cached backbone, the rows, and
recipes/res_dom.py end to end (the CI smoke test, smaller than --quick)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from transformers import ResNetConfig, ResNetForImageClassification

from hf_condroute.studies.res_dom.data import DOMAINS, make_splits
from hf_condroute.studies.res_dom.loaders import load_domain_dataset, load_image_folder
from hf_condroute.studies.res_dom.model import BackboneSettings, load_or_pretrain_backbone
from hf_condroute.studies.res_dom.study import Row, default_rows, summarize, supervised_tags

from .recipe_loader import ROOT, load_recipe


@pytest.fixture(scope="module")
def splits():
    return make_splits(image_size=16, max_digits=240)


def test_splits_are_disjoint_and_every_domain_holds_every_training_digit(splits):
    assert len(splits.pretrain) == 80 and len(splits.train) == 6 * 128 and len(splits.test) == 6 * 32
    for data in (splits.train, splits.test):
        assert torch.bincount(data.domains).tolist() == [len(data) // 6] * 6
        assert data.pixel_values.shape[1:] == (3, 16, 16)
        assert 0 <= float(data.pixel_values.min()) and float(data.pixel_values.max()) <= 1
    assert set(splits.pretrain.domains.tolist()) == {0}  # pretraining: real domain only


def _domain_accuracy(overlap: float) -> float:
    """A logistic regression reading the domain from the pixels of unseen digits."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    s = make_splits(image_size=16, max_digits=300, overlap=overlap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 300 iterations separate the domains well enough
        clf = LogisticRegression(max_iter=300).fit(s.train.pixel_values.flatten(1).numpy(), s.train.domains.numpy())
    return float(clf.score(s.test.pixel_values.flatten(1).numpy(), s.test.domains.numpy()))


def test_domains_are_distinct_but_overlap():
    blended, separate = _domain_accuracy(0.55), _domain_accuracy(0.0)
    assert 1 / len(DOMAINS) + 0.2 < blended < 1.0  # far above chance, not perfect
    assert blended < separate  # the blending is what makes the domain ambiguous


def test_data_is_deterministic_and_bad_sizes_are_refused():
    a, b = make_splits(16, max_digits=60), make_splits(16, max_digits=60)
    assert torch.equal(a.train.pixel_values, b.train.pixel_values)
    with pytest.raises(ValueError, match="image_size must be at least 16"):
        make_splits(8)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\]"):
        make_splits(16, overlap=1.5, max_digits=60)


def _write_folder(root, domains=("clipart", "sketch"), classes=("cat", "dog", "zebra")) -> dict:
    """root/domain/class/*.jpg with a distinct colour per (domain, class); 'zebra' only in the last domain."""
    expected = {}
    for di, d in enumerate(domains):
        for ci, c in enumerate(classes):
            if c == "zebra" and di < len(domains) - 1:
                continue
            os.makedirs(root / d / c)
            for k in range(2):
                colour = (40 * di + 10 * k, 80 * ci, 200)
                PILImage.new("RGB", (12, 10), colour).save(root / d / c / f"{k}.jpg", quality=100)
                expected[(d, c, k)] = colour
    (root / "README.txt").write_text("not a domain")
    return expected


def test_image_folder_yields_domain_and_class_labels(tmp_path):
    expected = _write_folder(tmp_path)
    data = load_image_folder(str(tmp_path), image_size=8)
    assert data.domain_names == ("clipart", "sketch") and data.class_names == ("cat", "dog", "zebra")
    assert len(data) == 10 and data.pixel_values.shape == (10, 3, 8, 8)
    pairs = list(zip(data.domains.tolist(), data.labels.tolist()))
    assert pairs.count((0, 2)) == 0 and pairs.count((1, 2)) == 2 and pairs.count((0, 0)) == 2
    # the pixels of each image are its own colour (JPEG is close, not exact)
    for i, (d, c) in enumerate(pairs):
        k = pairs[:i].count((d, c))
        colour = expected[(data.domain_names[d], data.class_names[c], k)]
        assert np.allclose(data.pixel_values[i].mean(dim=(1, 2)).numpy() * 255, colour, atol=6)


def test_image_folder_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="<domain>/<class>/"):
        load_image_folder(str(tmp_path / "missing"))
    (tmp_path / "only" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least two domains"):
        load_image_folder(str(tmp_path))


def test_datasets_loader_reads_a_saved_domainnet(tmp_path):
    images = [PILImage.new("RGB", (6, 6), (i * 30, 0, 0)) for i in range(4)]
    features = Features({"image": Image(), "label": ClassLabel(names=["apple", "bee"]), "domain": Value("string")})
    ds = Dataset.from_dict({"image": images, "label": [0, 1, 1, 0], "domain": ["real", "sketch", "real", "clipart"]},
                           features=features)  # fmt: skip
    DatasetDict(train=ds, test=ds.select([0, 1])).save_to_disk(str(tmp_path / "dn"))
    data = load_domain_dataset(str(tmp_path / "dn"), "train", image_size=4)
    assert data.domain_names == ("clipart", "real", "sketch") and data.domains.tolist() == [1, 2, 1, 0]
    assert data.class_names == ("apple", "bee") and data.labels.tolist() == [0, 1, 1, 0]
    assert data.pixel_values.shape == (4, 3, 4, 4)
    with pytest.raises(ValueError, match="--domain_column"):
        load_domain_dataset(str(tmp_path / "dn"), "train", domain_column="style")


def test_backbone_is_pretrained_once_then_loaded_from_the_cache(splits, tmp_path):
    settings = BackboneSettings(pretrain_steps=2)
    path, trained = load_or_pretrain_backbone(splits.pretrain, settings, str(tmp_path))
    again, trained_again = load_or_pretrain_backbone(splits.pretrain, settings, str(tmp_path))
    assert trained and not trained_again and again == path
    model = ResNetForImageClassification.from_pretrained(path)
    assert model.config.depths == [2, 2, 2, 2] and model.config.hidden_sizes == [16, 32, 64, 128]
    assert model.config.layer_type == "basic"
    other, _ = load_or_pretrain_backbone(splits.pretrain, BackboneSettings(pretrain_steps=3), str(tmp_path))
    assert other != path  # other settings, another backbone


def test_rows_names_and_errors():
    names = [r.name for r in default_rows()]
    assert names[:9] == [
        "tag",
        "hash",
        "monolithic",
        "top_k",
        "st_gumbel",
        "reinforce",
        "moesart",
        "dselect_k",
        "smear",
    ]
    assert len(names) == 9 + 6 * 3 + 6 and "smear+sup1" in names and "reinforce+init" in names
    assert Row.parse("top_k+sup10") == Row("top_k", supervision_percent=10)
    with pytest.raises(ValueError, match="learned routers"):
        Row.parse("hash+sup10")
    with pytest.raises(ValueError, match="Unknown Res-Dom router"):
        Row.parse("lottery")
    with pytest.raises(ValueError, match="Cannot read row"):
        Row.parse("top_k+warm")


def test_supervised_tags_keep_a_fixed_subset_per_seed():
    domains = torch.arange(200) % 6
    t = supervised_tags(domains, 10, seed=0)
    assert int((t != -100).sum()) == 20 and torch.equal(t[t != -100], domains[t != -100])
    assert torch.equal(t, supervised_tags(domains, 10, seed=0)) and not torch.equal(t, supervised_tags(domains, 10, 1))


def test_summarize_mean_and_standard_error():
    one = {"accuracy": 60.0, "domain_accuracy": {"a": 50.0}, "focus": 0.5, "cover": 1.0, "load": {"b": [1.0, 0.0]}}
    two = {"accuracy": 64.0, "domain_accuracy": {"a": 70.0}, "focus": 1.0, "cover": 1.0, "load": {"b": [0.0, 1.0]}}
    s = summarize([one, two])
    assert s["accuracy"] == 62.0 and s["accuracy_sem"] == pytest.approx(2.0) and s["domain_accuracy"] == {"a": 60.0}
    assert s["load"] == {"b": [0.5, 0.5]} and s["focus"] == 0.75 and s["seeds"] == 2


def test_study_end_to_end_smaller_than_quick(tmp_path):
    """The CI smoke test: recipes/res_dom.py with --quick-like settings, smaller; writes the outputs."""
    recipe = load_recipe("res_dom")
    argv = ["--max-digits", "150", "--image-size", "16", "--steps", "3", "--pretrain-steps", "3", "--probe-steps", "3",
            "--batch-size", "16", "--seeds", "2", "--routing", "tag", "--routing", "hash", "--routing", "top_k+sup100",
            "--routing", "reinforce+init", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path),
            "--no-progress"]  # fmt: skip
    result = recipe.main(argv)
    rows = result["rows"]
    assert list(rows) == ["tag", "hash", "top_k+sup100", "reinforce+init"]
    assert rows["tag"]["focus"] == 1.0 and rows["tag"]["cover"] == 1.0  # tag routing: one expert per domain
    assert rows["hash"]["focus"] < 1.0
    for row in rows.values():
        assert row["seeds"] == 2 and row["accuracy_sem"] is not None and 0 <= row["accuracy"] <= 100
        assert set(row["domain_accuracy"]) == set(DOMAINS) and len(row["load"]) == 8  # the 8 residual blocks
        assert all(len(load) == 6 and abs(sum(load) - 1) < 1e-6 for load in row["load"].values())
    assert 100 / 6 <= result["meta"]["domain_accuracy"] <= 100
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"res_dom_custom.{ext}").stat().st_size > 0
    saved = json.loads((tmp_path / "res_dom_custom.json").read_text())
    assert saved["rows"]["tag"]["focus"] == 1.0
    assert "| tag |" in (tmp_path / "res_dom_custom.md").read_text()


def _folder_and_backbone(tmp_path) -> list[str]:
    """Three domains in an image folder and a saved tiny ResNet: the recipe's flags that use them."""
    _write_folder(tmp_path / "dn", domains=("clipart", "quickdraw", "sketch"))
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)
    ResNetForImageClassification(config).save_pretrained(tmp_path / "resnet")
    return ["--dataset", str(tmp_path / "dn"), "--model_name_or_path", str(tmp_path / "resnet")]


def test_recipe_on_an_image_folder_with_a_given_backbone(tmp_path):
    """The Hub path without the Hub: --dataset an image folder, --model_name_or_path a saved ResNet."""
    recipe = load_recipe("res_dom")
    result = recipe.main([*_folder_and_backbone(tmp_path),
                          "--image-size", "16", "--steps", "2", "--probe-steps", "2", "--batch-size", "4",
                          "--seeds", "1", "--test-fraction", "0.5", "--routing", "tag", "--routing", "top_k",
                          "--output-dir", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    tag = result["rows"]["tag"]
    assert set(tag["domain_accuracy"]) == {"clipart", "quickdraw", "sketch"}
    assert all(len(load) == 3 for load in tag["load"].values()) and len(tag["load"]) == 2  # 3 domains, 2 blocks
    assert tag["focus"] == 1.0 and tag["cover"] == 1.0


def test_recipe_detaches_router_inputs_and_scales_supervision_on_request(tmp_path):
    """--detach-router-input sets router_detach_input on every block; --tag-supervision-coef weighs the +sup rows."""
    recipe = load_recipe("res_dom")
    result = recipe.main([*_folder_and_backbone(tmp_path),
                          "--image-size", "16", "--steps", "2", "--probe-steps", "1", "--batch-size", "4",
                          "--seeds", "1", "--test-fraction", "0.5", "--routing", "top_k+sup10",
                          "--detach-router-input", "--tag-supervision-coef", "0.1",
                          "--output-dir", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    text = result["meta"]["settings_text"]
    assert "tag supervision coefficient 0.1 per block; detached router inputs" in text
    assert (tmp_path / "out" / "res_dom_custom.json").exists()
    # the flag travels as a RoutedAdapterConfig field to every block's router
    from hf_condroute.studies.res_dom.model import AdapterSettings, routed_model

    settings = AdapterSettings(num_experts=3, extra={"router_detach_input": True})
    model = routed_model(str(tmp_path / "resnet"), 5, "top_k", settings, seed=0)
    routers = [m for m in model.modules() if type(m).__name__ == "TopKRouter"]
    assert routers and all(r.config.router_detach_input for r in routers)


def test_bad_flags_are_refused_before_any_training(tmp_path):
    recipe = load_recipe("res_dom")
    with pytest.raises(ValueError, match="--dataset needs --model_name_or_path"):
        recipe.main(["--dataset", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse's exit 2: tests/test_recipe_errors.py checks each numeric flag
        recipe.main(["--steps", "0"])
    with pytest.raises(FileNotFoundError, match="<domain>/<class>/"):
        recipe.main(["--dataset", str(tmp_path / "missing"), "--model_name_or_path", "x"])


def test_bad_flags_exit_with_one_clear_line():
    run = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "res_dom.py"), "--routing", "hash+sup10"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "learned routers" in run.stderr and "Traceback" not in run.stderr
