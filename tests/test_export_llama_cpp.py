"""A real engine serves the exports: llama.cpp's converter reads a Mixtral and a Qwen2-MoE export (with a real
`tokenizers` BPE tokenizer) into GGUF, and llama.cpp's greedy tokens equal transformers' for the same prompt.

Needs llama.cpp's Python bindings (`pip install llama-cpp-python`, which builds llama.cpp on the CPU in several
minutes) and a llama.cpp source tree for `convert_hf_to_gguf.py` (`LLAMA_CPP_DIR`; the bindings' source distribution
carries one under vendor/llama.cpp) with `sentencepiece` installed, as its converter imports it.

llama.cpp's Qwen2-MoE has no dense layers (its converter maps no `mlp_only_layers` weights) and computes the shared
expert's sigmoid as silu(z) / z (NaN at the zero gate of `shared_expert=True`): these exports use neither."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_condroute
from hf_condroute.studies.tiny_lm import local_texts, tiny_llama, train_bpe_tokenizer

from .export_helpers import routed_ffn

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama.cpp's Python bindings are not installed: pip install llama-cpp-python"
)
SOURCE = Path(os.environ.get("LLAMA_CPP_DIR", "")).expanduser()
if not (SOURCE / "convert_hf_to_gguf.py").is_file():
    pytest.skip(
        "LLAMA_CPP_DIR must name a llama.cpp source tree with convert_hf_to_gguf.py: pip download --no-deps "
        "--no-binary :all: llama-cpp-python, unpack it, and set LLAMA_CPP_DIR=<unpacked>/vendor/llama.cpp",
        allow_module_level=True,
    )
pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports it: pip install sentencepiece")
CONVERT = Path(__file__).with_name("llama_cpp_convert.py")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(local_texts(), vocab_size=320)


@pytest.mark.parametrize(
    "overrides, target",
    [
        (dict(top_k=2), "MixtralForCausalLM"),
        (dict(top_k=2, norm_topk_prob=False), "Qwen2MoeForCausalLM"),
        (dict(top_k=2, norm_topk_prob=False, shared_neurons=16, expert_dim=64), "Qwen2MoeForCausalLM"),
    ],
    ids=["mixtral", "qwen2_moe", "qwen2_moe_shared_neurons"],
)
def test_llama_cpp_greedy_tokens_equal_transformers(tmp_path, tokenizer, overrides, target):
    model = routed_ffn(tiny_llama(tokenizer, hidden_size=64), **overrides)
    # llama.cpp's sigmoid is silu(z) / z, NaN at the shared expert gate's z = 0: shared neurons stay in each expert
    native = hf_condroute.save_native(model, str(tmp_path / "native"), tokenizer=tokenizer, shared_expert=False)
    assert type(native).__name__ == target
    gguf = tmp_path / "model.gguf"
    done = subprocess.run(
        [sys.executable, str(CONVERT), str(SOURCE), str(tmp_path / "native"), str(gguf)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    prompt = tokenizer("The router sends each token to")["input_ids"]
    with torch.no_grad():
        generated = native.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = generated[0, len(prompt) :].tolist()
    if tokenizer.eos_token_id in expected:  # transformers stops after the end token
        expected = expected[: expected.index(tokenizer.eos_token_id)]
    assert expected, "the reference stopped at once: the comparison would be empty"
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, n_threads=1, verbose=False)
    got = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        if token == tokenizer.eos_token_id or len(got) == NEW_TOKENS:
            break
        got.append(token)
    assert got == expected
