import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from hf_condroute import RoutedAdapterConfig, RoutingStatsCallback, compute_routing_stats
from hf_condroute.stats.hub import (
    CARD_END,
    CARD_START,
    ROUTING_STATS_NAME,
    load_routing_stats,
    routing_stats_dict,
    save_routing_stats,
)

from .analytics_helpers import collate, tagged_seq2seq, tiny_bert_model, tiny_t5, tiny_t5_model
from .conftest import make_bert

SAVED = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    ROUTING_STATS_NAME,
    "routing_load.png",
    "routing_alignment.png",
}


@pytest.fixture(scope="module")
def tagged_model():
    model = tiny_t5_model(router="tag", num_experts=2)
    loader = torch.utils.data.DataLoader(tagged_seq2seq(8), batch_size=4, collate_fn=collate)
    compute_routing_stats(model, loader, tags_per_group=2, tag_names=["copy", "shift"])
    return model


def read_card(folder) -> ModelCard:
    return ModelCard.load(os.path.join(folder, "README.md"))


def test_save_pretrained_writes_stats_heatmaps_and_card(tagged_model, tmp_path):
    tagged_model.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == SAVED
    record = json.loads((tmp_path / ROUTING_STATS_NAME).read_text())
    expected = routing_stats_dict(tagged_model, "default")
    expected["heatmaps"] = {"load": "routing_load.png", "alignment": "routing_alignment.png"}
    assert record == expected
    assert record["routing_config"]["router"] == "tag" and record["routing_config"]["num_experts"] == 2
    assert record["peft_type"] == "ROUTED_ADAPTER" and len(record["routed_blocks"]) == 4
    stats = record["splits"]["eval"]
    assert stats["focus"] == 1.0 and stats["cover"] == 1.0
    assert stats["tag_labels"] == ["copy", "shift"]
    assert stats["alignment"][0] == [1.0, 0.0] * 4
    assert all(b["counts"] == [4.0, 4.0] and b["load_entropy"] == 1.0 for b in stats["blocks"].values())
    for png in ("routing_load.png", "routing_alignment.png"):
        with Image.open(tmp_path / png) as image:
            assert image.format == "PNG" and image.width > 100
    card = read_card(tmp_path)
    assert card.data.library_name == "peft"
    assert {"hf_condroute", "routed-adapter", "mixture-of-experts"} <= set(card.data.tags)
    # the tiny T5 is built from a config, so it has no name: no empty base_model metadata for the Hub to reject
    assert card.data.base_model is None and not any(t.endswith(":") for t in card.data.tags)
    assert "base_model" not in (tmp_path / "README.md").read_text().split("---")[1]
    text = card.text
    assert text.count(CARD_START) == 1 and text.count(CARD_END) == 1
    assert "| Router | `tag` |" in text and "| Focus (paper A, 4.2) | 1.000 |" in text
    assert "![Expert load per block](routing_load.png)" in text
    assert "![Tag / subnetwork alignment](routing_alignment.png)" in text
    assert "[More Information Needed]" not in text  # PEFT's empty template was replaced


def test_saved_folder_loads_back(tagged_model, tmp_path):
    tagged_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_t5(), tmp_path)
    assert loaded.peft_config["default"].router == "tag"
    for name, param in tagged_model.state_dict().items():
        if "routed_adapter" in name:
            assert torch.equal(loaded.state_dict()[name], param), name


def test_resave_replaces_only_the_generated_section(tagged_model, tmp_path):
    tagged_model.save_pretrained(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace(CARD_START, "My own notes.\n\n" + CARD_START) + "\nMore notes.\n")
    tagged_model.save_pretrained(tmp_path)
    text = readme.read_text()
    assert text.count(CARD_START) == 1 and "My own notes." in text and "More notes." in text


def test_existing_user_readme_is_kept(tagged_model, tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nTrained on my data.\n")
    tagged_model.save_pretrained(tmp_path)
    card = read_card(tmp_path)
    assert card.data.license == "mit"
    assert card.text.startswith("# My adapter\n\nTrained on my data.")
    assert CARD_START in card.text


def test_without_statistics_the_card_says_how_to_get_them(tmp_path):
    model = tiny_bert_model()
    model.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        ROUTING_STATS_NAME,
    }
    record = json.loads((tmp_path / ROUTING_STATS_NAME).read_text())
    assert record["splits"] == {} and record["heatmaps"] == {}
    assert "compute_routing_stats(model, dataloader)" in read_card(tmp_path).text


def test_every_routed_adapter_gets_its_own_stats(tmp_path):
    model = tiny_bert_model()
    model.add_adapter("second", RoutedAdapterConfig(num_experts=2, adapter_dim=4, router="hash", task_type="SEQ_CLS"))
    ids = torch.tensor([[2, 3, 4], [5, 6, 7]])
    compute_routing_stats(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    model.save_pretrained(tmp_path)
    assert {"second", ROUTING_STATS_NAME, "routing_load.png"} <= set(os.listdir(tmp_path))
    assert ROUTING_STATS_NAME in os.listdir(tmp_path / "second")
    records = load_routing_stats(str(tmp_path))
    assert set(records) == {"default", "second"}
    assert records["second"]["routing_config"]["router"] == "hash" and records["second"]["splits"] == {}
    text = read_card(tmp_path).text
    assert "Adapter `default`" in text and "Adapter `second`" in text and "`second/routing_stats.json`" in text
    model.save_pretrained(tmp_path / "only", selected_adapters=["second"])
    assert not (tmp_path / "only" / ROUTING_STATS_NAME).exists()
    assert (tmp_path / "only" / "second" / ROUTING_STATS_NAME).exists()


def test_other_peft_models_are_untouched(tmp_path):
    lora = get_peft_model(make_bert(), LoraConfig(r=2, target_modules=["query"]))
    lora.save_pretrained(tmp_path)
    assert ROUTING_STATS_NAME not in os.listdir(tmp_path)
    assert CARD_START not in (tmp_path / "README.md").read_text()


def test_trainer_checkpoint_and_trainer_model_card(tmp_path):
    model = tiny_t5_model(router="tag")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=2,
        save_strategy="steps",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=tagged_seq2seq(8), data_collator=collate)
    RoutingStatsCallback().attach(trainer)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    record = json.loads((checkpoint / ROUTING_STATS_NAME).read_text())
    assert record["splits"]["train"]["global_step"] == 2
    assert (checkpoint / "routing_load.png").exists() and CARD_START in (checkpoint / "README.md").read_text()
    trainer.save_model()
    trainer.create_model_card(model_name="tiny-routed")  # Trainer writes its own card, then PEFT updates it
    text = (tmp_path / "README.md").read_text()
    assert "tiny-routed" in text and "Training hyperparameters" in text
    assert text.count(CARD_START) == 1


def _fake_hub(existing_card=None):
    """HfApi mocked at the huggingface_hub boundary; each commit's files are read while they exist."""
    api = mock.create_autospec(HfApi, instance=True)
    api.create_repo.side_effect = lambda repo_id, **kw: mock.Mock(repo_id=repo_id)
    commits = []

    def create_commit(repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return mock.Mock(commit_url="https://hub.invalid/commit")

    api.create_commit.side_effect = create_commit
    original_load = ModelCard.load.__func__

    def load(cls, repo_id_or_path, *args, **kwargs):
        if os.path.exists(repo_id_or_path):
            return original_load(cls, repo_id_or_path, *args, **kwargs)
        if existing_card is None:
            raise EntryNotFoundError("no README.md in the repository")
        return ModelCard(existing_card)

    return api, commits, mock.patch.object(ModelCard, "load", classmethod(load))


def test_push_to_hub_uploads_everything(tagged_model, tmp_path):
    api, commits, card_patch = _fake_hub()
    with mock.patch("transformers.utils.hub.hf_api", return_value=api), card_patch:
        tagged_model.push_to_hub("me/tiny-routed", tags=["my-tag"])
    api.create_repo.assert_called_once()
    assert len(commits) == 1 and commits[0]["repo_id"] == "me/tiny-routed"
    files = commits[0]["files"]
    assert set(files) == SAVED
    tagged_model.save_pretrained(tmp_path)
    for name in SAVED - {"README.md"}:
        assert files[name] == (tmp_path / name).read_bytes(), name
    card = ModelCard(files["README.md"].decode())
    assert {"my-tag", "hf_condroute", "routed-adapter"} <= set(card.data.tags)
    assert card.data.library_name == "peft"
    assert card.text.count(CARD_START) == 1 and "| Cover (paper A, 4.2) | 1.000 |" in card.text
    assert "pushed on the Hub" not in card.text  # transformers' empty card was replaced
    assert "AutoPeftModelForSeq2SeqLM" in card.text


def test_push_to_hub_keeps_the_hub_card_text(tagged_model):
    hub_card = "---\nlicense: apache-2.0\nlibrary_name: peft\n---\n# Our adapter\n\nWritten by hand.\n"
    api, commits, card_patch = _fake_hub(existing_card=hub_card)
    with mock.patch("transformers.utils.hub.hf_api", return_value=api), card_patch:
        tagged_model.push_to_hub("me/tiny-routed")
    card = ModelCard(commits[0]["files"]["README.md"].decode())
    assert card.text.startswith("# Our adapter\n\nWritten by hand.")
    assert card.data.license == "apache-2.0" and CARD_START in card.text


def test_a_missing_template_never_fails_a_save(tagged_model, tmp_path, monkeypatch):
    from hf_condroute.stats import hub

    def missing():
        raise FileNotFoundError("Model card template routed_model_card.md is missing.")

    monkeypatch.setattr(hub, "template_path", missing)
    with pytest.warns(UserWarning, match="model card was not updated"):
        tagged_model.save_pretrained(tmp_path)
    assert (tmp_path / ROUTING_STATS_NAME).exists() and (tmp_path / "adapter_model.safetensors").exists()
    assert CARD_START not in (tmp_path / "README.md").read_text()


def test_statistics_and_card_refuse_a_folder_with_an_empty_adapter(tagged_model, tmp_path):
    # what PeftModel.save_pretrained wrote under DeepSpeed ZeRO-3 before 0.3.0: every tensor with 0 elements
    save_file({"experts.up_weight": torch.empty(0)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"holds 1 tensors with 0 elements of 1 .*DeepSpeed ZeRO-3 partitioned"):
        save_routing_stats(tagged_model, str(tmp_path))
    assert os.listdir(tmp_path) == ["adapter_model.safetensors"]
