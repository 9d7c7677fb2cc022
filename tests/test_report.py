import runpy
import sys
import warnings

import pytest
import torch

from hf_condroute import compute_routing_stats
from hf_condroute.stats.report import format_table, main

from .analytics_helpers import collate, tagged_seq2seq, tiny_t5_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    model = tiny_t5_model(router="tag", num_experts=2)
    loader = torch.utils.data.DataLoader(tagged_seq2seq(8), batch_size=4, collate_fn=collate)
    compute_routing_stats(model, loader, tags_per_group=2)
    model.save_pretrained(folder)
    for png in ("routing_load.png", "routing_alignment.png"):
        (folder / png).unlink()
    return folder


def test_report_prints_tables_and_draws_heatmaps(saved, capsys):
    assert main([str(saved)]) == 0
    out = capsys.readouterr().out
    assert "Adapter 'default': ROUTED_ADAPTER router=tag num_experts=2 top_k=1" in out
    assert "split=eval examples=8" in out
    lines = out.splitlines()
    assert any(line.split() == ["focus", "1.0000"] for line in lines)
    assert any(line.split() == ["cover", "1.0000"] for line in lines)
    row = next(line for line in lines if line.startswith("b0 "))
    assert row.split() == [
        "b0",
        "encoder.block.0.layer.0.SelfAttention.o",
        "tag",
        "0.50",
        "0.50",
        "1.000",
        "0.500",
        "1.00",
    ]
    assert (saved / "routing_load.png").exists() and (saved / "routing_alignment.png").exists()


def test_report_out_dir_split_and_no_plots(saved, tmp_path, capsys):
    assert main([str(saved), "--out", str(tmp_path / "figs")]) == 0
    assert {p.name for p in (tmp_path / "figs").iterdir()} == {"routing_load.png", "routing_alignment.png"}
    assert main([str(saved), "--split", "train", "--no-plots"]) == 1
    assert "not 'train'" in capsys.readouterr().err


def test_report_errors_name_the_fix(tmp_path, capsys):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-10").mkdir()
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "No routing_stats.json" in err and "checkpoint-10" in err


def test_module_entry_point(saved, monkeypatch, capsys):
    # what `python -m hf_condroute.report DIR` runs, in this process (a fresh interpreter costs seconds)
    monkeypatch.setattr(sys, "argv", ["hf_condroute.report", str(saved), "--no-plots"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:
        # runpy warns when an earlier test imported hf_condroute.report already; a fresh `python -m` does not
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module("hf_condroute.report", run_name="__main__")
    assert exit_info.value.code == 0
    assert "router=tag" in capsys.readouterr().out


def test_format_table_aligns_numbers_right():
    table = format_table(["name", "value"], [["a", "1.5"], ["long name", "10.25"]])
    assert table.splitlines() == ["name       value", "---------  -----", "a            1.5", "long name  10.25"]
