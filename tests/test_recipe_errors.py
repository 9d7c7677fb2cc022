"""Every recipe refuses a bad value of each numeric flag, a data folder that is not there, and a Hub id it cannot
reach (no network, or HF_HUB_OFFLINE=1) with one paragraph on stderr and exit status 2, before loading a model or
training. All cases run in one offline process (tests/recipe_errors_probe.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOGUS = "hf-condroute-tests/no-such-model"  # a Hub id: offline it cannot load, online it does not exist

# recipe -> [(flag, a bad value)]: every numeric flag of the recipe
NUMERIC = {
    "dae_syn": [("--seeds", "-3"), ("--steps", "0"), ("--lr", "-1"), ("--workers", "0")],
    "quickstart": [("--steps", "-3"), ("--seed", "-1"), ("--threads", "0")],
    "res_dom": [
        ("--seeds", "-3"),
        ("--steps", "0"),
        ("--lr", "-0.1"),
        ("--batch-size", "0"),
        ("--adapter-dim", "0"),
        ("--image-size", "0"),
        ("--tag-supervision-coef", "-1"),
        ("--overlap", "-1"),
        ("--overlap", "1.5"),
        ("--max-digits", "0"),
        ("--pretrain-steps", "0"),
        ("--probe-steps", "-1"),
        ("--test-fraction", "0"),
        ("--test-fraction", "1.5"),
        ("--max-samples", "0"),
        ("--threads", "0"),
    ],
    "moesart_benchmarks": [
        ("--seeds", "-3"),
        ("--trials", "1"),
        ("--steps", "0"),
        ("--workers", "0"),
        ("--threads", "0"),
    ],
    "real_text": [
        (flag, "0")
        for flag in (
            "--seeds",
            "--steps",
            "--batch-size",
            "--adapted-layers",
            "--rank",
            "--max-review-tokens",
            "--train",
            "--val",
            "--test",
            "--workers",
        )
    ]
    + [("--lr", "-1"), ("--tag-supervision-coef", "-1")],
    "moe_from_dense": [
        (flag, "-1")
        for flag in (
            "--num_experts",
            "--top_k",
            "--shared_neurons",
            "--hidden_size",
            "--layers",
            "--vocab_size",
            "--block_size",
            "--dense_steps",
            "--distill_steps",
            "--batch_size",
            "--learning_rate",
            "--router_aux_loss_coef",
            "--seed",
        )
    ],
    "glue": [
        (flag, "-3")
        for flag in (
            "--num_experts",
            "--top_k",
            "--adapter_dim",
            "--router_init_std",
            "--router_aux_loss_coef",
            "--router_z_loss_coef",
            "--tag_supervision_fraction",
            "--tag_supervision_coef",
            "--max_train_samples_per_task",
            "--max_eval_samples_per_task",
            "--max_source_length",
            "--seed",
            "--learning_rate",
            "--num_train_epochs",
            "--max_steps",
            "--warmup_steps",
            "--per_device_train_batch_size",
            "--per_device_eval_batch_size",
            "--gradient_accumulation_steps",
            "--weight_decay",
        )
    ],
    "moebert": [
        (flag, "-3")
        for flag in (
            "--num_experts",
            "--top_k",
            "--expert_dim",
            "--shared_neurons",
            "--trimmed_lasso_coef",
            "--router_aux_loss_coef",
            "--distill_coef",
            "--importance_batches",
            "--fidelity_batches",
            "--max_train_samples",
            "--max_eval_samples",
            "--max_seq_length",
            "--doc_stride",
            "--seed",
            "--learning_rate",
            "--num_train_epochs",
            "--per_device_train_batch_size",
            "--gradient_accumulation_steps",
        )
    ],
}
REQUIRED = {"moebert": ["--task", "rte", "--model_name_or_path", BOGUS]}


def output(name: str, folder: str) -> list[str]:
    dashed = ("dae_syn", "res_dom", "moesart_benchmarks", "real_text")
    return ["--output-dir" if name in dashed else "--output_dir", folder]


def cases(tmp: str) -> dict[str, tuple[str, list[str], str]]:
    """{case id: (recipe, argv, a phrase the one paragraph must hold)}"""
    t5 = os.path.join(tmp, "t5")  # a local T5 config: the GLUE data is what cannot load
    glue = os.path.join(tmp, "glue")  # local GLUE data: the model is what cannot load
    out = {}
    for name, flags in NUMERIC.items():
        for flag, value in flags:
            argv = [*REQUIRED.get(name, []), flag, value, *output(name, os.path.join(tmp, "out"))]
            out[f"{name} {flag} {value}"] = (name, argv, flag.lstrip("-"))  # TrainingArguments: no dashes
    hub = {
        "glue model": ("glue", ["--model_name_or_path", BOGUS, "--data_dir", glue], "--model_name_or_path"),
        "glue data": ("glue", ["--model_name_or_path", t5], "--data_dir"),
        "moebert model": ("moebert", ["--model_name_or_path", BOGUS, "--task", "rte"], "--model_name_or_path"),
        "res_dom model": (
            "res_dom",
            ["--model_name_or_path", BOGUS, "--dataset", "owner/images"],
            "--model_name_or_path",
        ),
        "moesart_benchmarks data": ("moesart_benchmarks", ["--dataset", "multi_mnist", "--quick"], "--data_dir"),
        "moesart_benchmarks missing data_dir": (
            "moesart_benchmarks",
            ["--dataset", "multi_mnist", "--data_dir", os.path.join(tmp, "nonexistent")],
            "is not a folder",
        ),
    }
    for key, (name, argv, phrase) in hub.items():
        out[key] = (name, [*argv, *output(name, os.path.join(tmp, "out"))], phrase)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from transformers import T5Config

    from tests.glue_fixtures import save_tiny_glue

    tmp = str(tmp_path_factory.mktemp("recipe_errors"))
    save_tiny_glue(os.path.join(tmp, "glue"), train_rows=2, eval_rows=2)
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64).save_pretrained(
        os.path.join(tmp, "t5")
    )
    table = cases(tmp)
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    probe = [sys.executable, os.path.join(ROOT, "tests", "recipe_errors_probe.py")]
    payload = json.dumps([[name, argv] for name, argv, _ in table.values()])
    done = subprocess.run([*probe, payload], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {key: (table[key][2], got) for key, got in zip(table, json.loads(done.stdout.splitlines()[-1]))}


@pytest.mark.parametrize("case", list(cases("TMP")))
def test_each_bad_flag_and_unreachable_hub_id_gets_one_paragraph_and_exit_2(results, case):
    phrase, got = results[case]
    stderr = got["stderr"]
    assert got["code"] == 2, stderr[-3000:]
    assert "Traceback" not in stderr and phrase in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    # one paragraph: ours ("<recipe>.py: error: ...", wrapped) or argparse's (its usage line, then the error)
    assert sum("error:" in line for line in lines) == 1, stderr
    if case.split()[1] in ("model", "data"):
        assert "Could not load" in stderr and "HF_HUB_OFFLINE" in stderr, stderr


def _argparse_numeric_flags(path: str) -> dict[str, str]:
    """{flag: its type's source} for every `add_argument` of a recipe whose type is a number."""
    import ast

    flags = {}
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args:
            kind = next((k.value for k in node.keywords if k.arg == "type"), None)
            if kind is not None and isinstance(node.args[0], ast.Constant):
                source = ast.unparse(kind)
                if source in ("int", "float") or source.startswith("at_least"):
                    flags[node.args[0].value] = source
    return flags


@pytest.mark.parametrize(
    "recipe", sorted(p[:-3] for p in os.listdir(os.path.join(ROOT, "recipes")) if p.endswith(".py"))
)
def test_every_numeric_flag_of_every_recipe_is_bounded_and_tested(recipe):
    """A new recipe or flag cannot slip past the table above: each argparse number has a bound (or fixed choices, or
    a check after parsing that the table's case proves) and a bad-value case here."""
    flags = _argparse_numeric_flags(os.path.join(ROOT, "recipes", f"{recipe}.py"))
    tested = {flag for flag, _ in NUMERIC.get(recipe, [])}
    untested = sorted(set(flags) - tested - {"--image-size"})  # dae_syn's --image-size has choices=(32, 64)
    assert not untested, f"recipes/{recipe}.py: numeric flags without a bad-value case in NUMERIC: {untested}"
