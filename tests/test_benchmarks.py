"""The benchmark scripts run end to end on tiny shapes and report what their README tables show."""

from __future__ import annotations

import json

from .recipe_loader import load_recipe


def test_layer_benchmark_reports_every_variant(tmp_path, capsys):
    layer = load_recipe("layer", "benchmarks")
    out = tmp_path / "layer.json"
    argv = ["--batch", "4", "--seq", "8", "--d-model", "32", "--adapter-dim", "8", "--reps", "2", "--warmup", "1"]
    payload = layer.main(argv + ["--json", str(out)])
    results = payload["results"]
    assert set(results) == set(layer.variants(32, 8, 4))
    base = results[layer.BASELINE]
    assert base["ratio"] == 1.0 and base["reps"] == 2
    for name, r in results.items():
        assert r["median_ms"] > 0 and r["peak_mb"] > 0 and r["page_faults_per_step"] >= 0, name
    assert json.loads(out.read_text())["results"].keys() == results.keys()
    table = capsys.readouterr().out.split("\n\n")[-1].strip()
    assert table.startswith("| variant | median ms |") and "| page faults |" in table
    assert table.count("\n") == len(results) + 1  # header, rule, one row per variant


def test_end_to_end_benchmark_runs_a_routed_variant_against_the_baseline(capsys):
    e2e = load_recipe("end_to_end", "benchmarks")
    argv = ["--batch", "2", "--source-len", "8", "--target-len", "4", "--num-experts", "2", "--adapter-dim", "8"]
    payload = e2e.main(argv + ["--reps", "1", "--warmup", "0", "--only", "routed top_k N=2 k=1"])
    results = payload["results"]
    assert list(results) == [e2e.BASELINE, "routed top_k N=2 k=1"]
    routed = results["routed top_k N=2 k=1"]
    # 24 blocks of 2 experts: router (BatchNorm + Linear) and bank (down, up, two biases) per block
    assert routed["trainable_params"] > results[e2e.BASELINE]["trainable_params"]
    assert routed["peak_mb"] > 0 and 0 < routed["peak_vs_allowance"] < 2
    assert "| routed top_k N=2 k=1 |" in capsys.readouterr().out


def test_moebert_speed_benchmark_times_routed_ffns_against_the_dense_model():
    speed = load_recipe("moebert_speed", "benchmarks")
    payload = speed.main(["--tiny", "--batch", "2", "--seq", "8", "--reps", "2", "--warmup", "0"])
    results = payload["results"]
    assert list(results) == [
        speed.BASELINE,
        "top_k N=4 k=1 (25% of the FFN)",
        "top_k N=4 k=2 (50% of the FFN)",
        "moesart N=4 k=2 (50% of the FFN)",
    ]
    assert payload["shape"]["d_ff"] == 256 and all(r["median_ms"] > 0 for r in results.values())


TINY_LLAMA = ["--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64", "--vocab", "100", "--r", "2"]


def test_routed_lora_benchmark_trains_every_variant_including_x_lora(capsys):
    bench = load_recipe("routed_lora", "benchmarks")
    argv = TINY_LLAMA + ["--batch", "2", "--seq", "8", "--num-experts", "2", "--top-k", "1"]
    payload = bench.main(argv + ["--reps", "1", "--warmup", "0"])
    results = payload["results"]
    assert list(results) == [
        "PEFT LoRA r=2",
        "routed LoRA top_k N=2 k=1",
        "routed LoRA top_k N=2 k=1, router per layer",
        "PEFT X-LoRA, 2 LoRAs",
    ]
    for name, r in results.items():
        assert r["median_ms"] > 0 and r["peak_mb"] > 0 and r["peak_vs_allowance"] > 0, name
    lora = results["PEFT LoRA r=2"]["trainable_params"]
    assert results["routed LoRA top_k N=2 k=1"]["trainable_params"] > lora
    assert "| PEFT X-LoRA, 2 LoRAs |" in capsys.readouterr().out


def test_routed_lora_benchmark_times_greedy_decoding_per_batch_size():
    bench = load_recipe("routed_lora", "benchmarks")
    argv = TINY_LLAMA + ["--generate", "--gen-batches", "1", "2", "--prompt-len", "4", "--new-tokens", "3"]
    argv += ["--num-experts", "2", "--reps", "1", "--warmup", "0", "--only", "routed LoRA top_k N=2 k=2"]
    payload = bench.main(argv)
    assert set(payload["results"]) == {
        f"{name}, batch {b}" for name in ("PEFT LoRA r=2", "routed LoRA top_k N=2 k=2") for b in (1, 2)
    }
    assert all(r["ms_per_token"] > 0 for r in payload["results"].values())
