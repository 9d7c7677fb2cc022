"""DAE-Syn (paper A section 3): the images, the autoencoder built from core routed blocks, training with every
router, tag supervision, subnet init, the outputs, and the `--quick` study end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hf_condroute.block.step import RoutingStep
from hf_condroute.studies.dae_syn.data import FACTORS, NUM_VALUES, DAESynData, make_dataset, render_image
from hf_condroute.studies.dae_syn.model import DAEConfig, DiscreteAutoencoder, routing_configs
from hf_condroute.studies.dae_syn.report import write_outputs
from hf_condroute.studies.dae_syn.study import (
    HEURISTIC_ROUTERS,
    LEARNED_ROUTERS,
    Row,
    TrainSettings,
    build_model,
    default_rows,
    evaluate,
    per_image_loss,
    pretrain_for_init,
    routing_for,
    run_row,
    summarize,
    supervised_tags,
    train,
)

from .recipe_loader import load_recipe

TINY = DAEConfig(widths=(4, 8, 8, 8), feature_dim=16, embed_dim=8)
ALL_ROUTERS = HEURISTIC_ROUTERS + LEARNED_ROUTERS


@pytest.fixture(scope="module")
def data() -> DAESynData:
    return make_dataset(32)


def subset(data: DAESynData, n: int) -> DAESynData:
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n]
    return DAESynData(images=data.images[idx], tags=data.tags[idx])


@torch.no_grad()
def batch_loss(model: DiscreteAutoencoder, data: DAESynData) -> float:
    """Mean per-image loss with batch statistics (running BatchNorm statistics need more than a few steps)."""
    model.train()
    out = model(data.images, tags=data.tags, keys=torch.arange(len(data)))
    return float(per_image_loss(out, data.images).mean())


# ----- data ------------------------------------------------------------------------------------------
def test_dataset_has_every_combination_once_and_all_images_differ(data):
    assert data.images.shape == (4096, 3, 32, 32) and data.images.dtype == torch.float32
    assert 0.0 <= float(data.images.min()) and float(data.images.max()) <= 1.0
    assert data.tags.shape == (4096, len(FACTORS))
    assert len({tuple(t) for t in data.tags.tolist()}) == NUM_VALUES ** len(FACTORS)
    flat = data.images.flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == 4096


def test_dataset_is_deterministic_and_factors_show_in_pixels(data):
    assert torch.equal(make_dataset(32).images, data.images)
    # the background factor is the colour of a corner pixel far from every letter position; the letter colour occurs
    i = int(((data.tags == torch.tensor([2, 0, 5, 3])).all(1)).nonzero())
    img = (data.images[i] * 255).round().permute(1, 2, 0).reshape(-1, 3)
    from hf_condroute.studies.dae_syn.data import BACKGROUND, FOREGROUND

    assert tuple(img[0].int().tolist()) == BACKGROUND[3]
    assert (img == torch.tensor(FOREGROUND[5], dtype=img.dtype)).all(1).any()


def test_64_pixel_images_and_bad_factor_values():
    assert render_image(0, 0, 0, 0, image_size=64).size == (64, 64)
    with pytest.raises(ValueError, match="position must be in 0..7"):
        render_image(0, 8, 0, 0)


# ----- model -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_model_shapes_and_core_blocks(router):
    model = DiscreteAutoencoder(routing_configs(router, top_k=2 if router == "moesart" else 1), TINY)
    x, tags = torch.rand(6, 3, 32, 32), torch.randint(0, 8, (6, 4))
    step = RoutingStep()
    out = model(x, tags=tags, keys=torch.arange(6), step=step)
    assert out.shape == x.shape
    assert list(step.records) == list(FACTORS)
    experts = 1 if router == "monolithic" else 8
    for record in step.records.values():
        assert record.decision.probs.shape == (6, experts)
    if router == "tag":  # block i routes by factor i
        for i, record in enumerate(step.records.values()):
            assert torch.equal(record.decision.experts[:, 0], tags[:, i])


def test_model_64_pixels_and_clear_errors():
    model = DiscreteAutoencoder(routing_configs("top_k"), DAEConfig(image_size=64, widths=(4, 8, 8, 8)))
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*4"):
        DAEConfig(image_size=40)
    configs = routing_configs("top_k")
    configs[2], configs[3] = configs[3], configs[2]
    with pytest.raises(ValueError, match="tag_group=2"):
        DiscreteAutoencoder(configs, TINY)


def test_hash_routing_is_a_fixed_expert_per_image_and_block():
    model = build_model(Row("hash"), TrainSettings(model=TINY), seed=0)
    keys = torch.arange(40)
    first, second = RoutingStep(), RoutingStep()
    model(torch.rand(40, 3, 32, 32), keys=keys, step=first)
    model(torch.rand(40, 3, 32, 32), keys=keys, step=second)
    choices = [r.decision.experts[:, 0] for r in first.records.values()]
    assert all(torch.equal(a, b.decision.experts[:, 0]) for a, b in zip(choices, second.records.values()))
    assert not torch.equal(choices[0], choices[1])  # blocks hash independently
    assert len(torch.unique(choices[0])) > 4


# ----- training ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_every_router_trains(router, data):
    small = subset(data, 128)
    settings = TrainSettings(steps=12, lr=3e-3, warmup_ratio=0.0, model=TINY)
    row = Row(router)
    model = build_model(row, settings, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = batch_loss(model, small)
    train(model, small, settings, seed=0, tags=small.tags if router == "tag" else None)
    assert batch_loss(model, small) < 0.8 * before
    for name, value in model.state_dict().items():
        if name.endswith(("proj.weight", "embeddings")) or name.startswith("decoder.0."):
            assert not torch.equal(value, start[name]), f"{name} did not train"
    assert any(n.endswith("router.network.proj.weight") for n in start) == (router in LEARNED_ROUTERS)


def test_st_gumbel_anneals_to_its_floor_within_the_run():
    settings = TrainSettings(steps=1000)
    rate = routing_for(Row("st_gumbel"), settings, 0)[0].gumbel_anneal_rate
    assert 10.0 * math.exp(-rate * 0.3 * settings.steps) == pytest.approx(0.5, rel=0.02)


def test_supervised_tags_keep_a_fixed_subset_per_seed(data):
    for percent, count in ((1, 41), (10, 410), (100, 4096)):
        tags = supervised_tags(data.tags, percent, seed=0)
        known = (tags != -100).all(1)
        assert int(known.sum()) == count
        assert bool(((tags == -100).all(1) | known).all())  # an image keeps all four tags or none
        assert torch.equal(tags[known], data.tags[known])
    assert torch.equal(supervised_tags(data.tags, 10, 0), supervised_tags(data.tags, 10, 0))
    assert not torch.equal(supervised_tags(data.tags, 10, 0), supervised_tags(data.tags, 10, 1))


def test_tag_supervision_teaches_the_routers_the_factors(data):
    """With every image supervised, the routers learn factors from the pixels, the easy ones first (background
    colour, then position) far above chance (1/8); without supervision the loss term is absent."""
    settings = TrainSettings(steps=200, lr=3e-3, warmup_ratio=0.0, tag_supervision_coef=1.0)
    model = build_model(Row("top_k", supervision_percent=100), settings, seed=0)
    train(model, data, settings, seed=0, tags=supervised_tags(data.tags, 100, 0))
    model.eval()
    step = RoutingStep()
    with torch.no_grad():
        model(data.images, step=step)
    accuracy = [
        float((record.decision.experts[:, 0] == data.tags[:, i]).float().mean())
        for i, record in enumerate(step.records.values())
    ]
    # chance is 0.125; position reaches 0.26-0.35 after 200 steps depending on the CPU's kernels
    assert accuracy[3] > 0.9 and accuracy[1] > 0.2, accuracy

    model.train()
    step = RoutingStep()
    model(data.images[:64], tags=supervised_tags(data.tags, 100, 0)[:64], step=step)
    assert "tag_supervision" in step.compute_loss_values()
    plain = build_model(Row("top_k"), settings, seed=0)
    step = RoutingStep()
    plain(data.images[:64], step=step)
    assert "tag_supervision" not in step.compute_loss_values()


def test_subnet_init_starts_from_the_tag_models_experts_and_decoder(data):
    small = subset(data, 128)
    settings = TrainSettings(steps=5, model=TINY)
    pretrained = pretrain_for_init(0, small, settings)
    assert pretrained and all(k.startswith("decoder.") or ".experts." in k for k in pretrained)
    assert {f"blocks.{i}.experts.embeddings" for i in range(4)} <= set(pretrained)
    row = Row("st_gumbel", subnet_init=True)
    model = build_model(row, settings, seed=0)
    model.load_state_dict(pretrained, strict=False)
    fresh = build_model(Row("st_gumbel"), settings, seed=0)
    for name, value in model.state_dict().items():
        if name in pretrained:
            assert torch.equal(value, pretrained[name])
        else:  # routers and encoder start fresh
            assert torch.equal(value, fresh.state_dict()[name])
    scores, carried = run_row(row, 0, small, settings, pretrained=pretrained)
    assert carried is None and math.isfinite(scores["loss"])
    with pytest.raises(ValueError, match="pretrained="):
        run_row(row, 0, small, settings)


def test_tag_routing_scores_focus_and_cover_one_and_monolithic_does_not(data):
    settings = TrainSettings(model=TINY)
    tag = evaluate(build_model(Row("tag"), settings, 0), data)
    assert tag["focus"] == pytest.approx(1.0) and tag["cover"] == pytest.approx(1.0)
    mono = evaluate(build_model(Row("monolithic"), settings, 0), data)
    # one subnetwork per block, active for every image: F1 with any tag is 2 * 512 / (512 + 4096)
    assert mono["focus"] == pytest.approx(2 * 512 / (512 + 4096))


# ----- rows, summaries and outputs ----------------------------------------------------------------------
def test_rows_and_names():
    names = [r.name for r in default_rows()]
    assert len(names) == 10 + 3 * 7 + 7 == len(set(names))
    assert {"tag", "hash", "monolithic", "top_k", "moesart", "top_k+sup10", "reinforce+sup1", "st_gumbel+init"} <= set(
        names
    )
    assert Row.parse("top_k+sup10") == Row("top_k", supervision_percent=10)
    assert Row.parse("reinforce+init") == Row("reinforce", subnet_init=True)
    with pytest.raises(ValueError, match="learned routers"):
        Row.parse("hash+sup10")
    with pytest.raises(ValueError, match="Unknown DAE-Syn router"):
        Row.parse("softmaxx")
    with pytest.raises(ValueError, match="Cannot read row"):
        Row.parse("top_k+foo")


def test_summarize_mean_and_standard_error():
    s = summarize([{"loss": 1.0, "focus": 0.5, "cover": 1.0}, {"loss": 3.0, "focus": 0.7, "cover": 0.0}])
    assert s == {"loss": 2.0, "loss_sem": pytest.approx(1.0), "focus": pytest.approx(0.6), "cover": 0.5, "seeds": 2}
    assert summarize([{"loss": 1.0, "focus": 1.0, "cover": 1.0}])["loss_sem"] is None


def test_outputs(tmp_path):
    summary = {
        name: {"loss": 10.0 + i, "loss_sem": 0.5, "focus": 0.5, "cover": 0.6, "seeds": 3}
        for i, name in enumerate(r.name for r in default_rows())
    }
    written = write_outputs(summary, TrainSettings(), 2, 60.0, str(tmp_path), "dae_syn")
    assert sorted(Path(p).name for p in written) == ["dae_syn.json", "dae_syn.md", "dae_syn.png"]
    assert json.loads((tmp_path / "dae_syn.json").read_text()) == summary
    table = (tmp_path / "dae_syn.md").read_text()
    assert "| hash | 11.0 ± 0.5 | 0.50 | 0.60 | 3 | 1587.2 |" in table
    assert "| top_k+init |" in table and "| 0.2 |" in table


def test_quick_study_end_to_end(tmp_path):
    """The CI smoke test: `recipes/dae_syn.py --quick` runs every row and writes the outputs."""
    recipe = load_recipe("dae_syn")
    summary = recipe.main(["--quick", "--output-dir", str(tmp_path), "--no-progress"])
    saved = json.loads((tmp_path / "dae_syn_quick.json").read_text())
    assert saved == summary and list(saved) == [r.name for r in default_rows()]
    for name, row in saved.items():
        assert set(row) == {"loss", "loss_sem", "focus", "cover", "seeds"} and row["seeds"] == 1
        assert math.isfinite(row["loss"]) and 0 <= row["focus"] <= 1 and 0 <= row["cover"] <= 1, name
    assert saved["tag"]["focus"] == pytest.approx(1.0)
    assert (tmp_path / "dae_syn_quick.png").exists() and not (tmp_path / "dae_syn.json").exists()
