"""A small causal LM and its data from local text only (no download): a byte-level BPE tokenizer trained with
`tokenizers` (GPT-2's pre-tokenizer, so llama.cpp reads it as a `gpt-2` vocabulary), a Llama config of a given
size, and fixed-length blocks of token ids for language-model training. Used by `recipes/moe_from_dense.py` and the
llama.cpp export test."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")


def local_texts(paths: list[str] | None = None) -> list[str]:
    """Paragraphs of the given text files; default: the Markdown documents of this source checkout (README,
    CONTRIBUTING, CHANGELOG), a few hundred kilobytes of English."""
    if paths is None:
        root = Path(__file__).resolve().parents[2]
        paths = [str(p) for p in (root / "README.md", root / "CONTRIBUTING.md", root / "CHANGELOG.md") if p.is_file()]
    if not paths:
        raise FileNotFoundError(
            "No local text: the Markdown documents of the source checkout are missing. Pass text files (--text_file)."
        )
    texts = []
    for path in paths:
        texts += [p.strip() for p in re.split(r"\n\s*\n", Path(path).read_text(encoding="utf-8")) if p.strip()]
    return texts


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer and decoder) trained on `texts`; <|endoftext|> is its
    bos/eos token, <pad> its padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=eos, eos_token=eos, pad_token=pad)


def tiny_llama(tokenizer, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama for `tokenizer`: 4 heads (2 key/value heads), an FFN 4x wide."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def lm_blocks(tokenizer, texts: list[str], block_size: int = 64) -> list[dict[str, list[int]]]:
    """The texts as one stream (eos between them) cut into rows of `block_size` token ids, labels = inputs."""
    ids = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    rows = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    if not rows:
        raise ValueError(f"The text has {len(ids)} tokens, fewer than one block of {block_size}: give more text.")
    return [{"input_ids": r, "labels": list(r)} for r in rows]
