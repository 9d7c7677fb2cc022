"""SQuAD's standard preprocessing for extractive question answering with a BERT-like model: question and
context as a pair, only the context truncated, long contexts split into overlapping windows (`stride` tokens
shared by neighbouring windows), and each window's offset mapping to go back from tokens to characters.

Training windows are labelled with the answer's first and last token (`start_positions`, `end_positions`),
or with the [CLS] position where the window does not hold the whole answer (or the question has none, v2.0).
Evaluation windows keep `example_id` and an `offset_mapping` that is None outside the context, for
`hf_condroute.studies.squad.answers.extract_answers`; drop both (`model_inputs`) before feeding the model.
"""

from __future__ import annotations

from datasets import Dataset

EVAL_ONLY_COLUMNS = ("example_id", "offset_mapping")


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"SQuAD preprocessing needs a fast tokenizer (offset mappings), got {type(tokenizer).__name__}. Load it "
            "with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    if tokenizer.padding_side != "right":
        raise ValueError(
            "SQuAD preprocessing puts the question first and truncates the context: use padding_side='right'."
        )


def _windows(tokenizer, batch, max_length: int, stride: int):
    _check_tokenizer(tokenizer)
    if stride >= max_length:
        raise ValueError(f"--doc_stride {stride} must be smaller than --max_seq_length {max_length}.")
    questions = [q.lstrip() for q in batch["question"]]  # some SQuAD questions start with spaces
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - stride
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] >= room:
        raise ValueError(
            f"Question {batch['id'][longest]!r} has {lengths[longest]} tokens, which leaves a window no more context "
            f"than the stride ({stride}) within --max_seq_length {max_length}. Raise --max_seq_length, lower "
            "--doc_stride, or leave out (or shorten) questions that long."
        )
    return tokenizer(
        questions, batch["context"], truncation="only_second", max_length=max_length, stride=stride,
        return_overflowing_tokens=True, return_offsets_mapping=True,
    )  # fmt: skip


def _cls_index(input_ids, tokenizer) -> int:
    return input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0


def _context_range(sequence_ids) -> tuple[int, int]:
    """First and last token index of the context (sequence 1) in a window."""
    first = sequence_ids.index(1)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    return first, last


def train_features(examples: Dataset, tokenizer, max_length: int = 384, stride: int = 128) -> Dataset:
    """Model inputs with `start_positions` / `end_positions`, one row per window (the first gold answer)."""

    def encode(batch):
        enc = _windows(tokenizer, batch, max_length, stride)
        starts, ends = [], []
        for i, offsets in enumerate(enc["offset_mapping"]):
            example = enc["overflow_to_sample_mapping"][i]
            cls = _cls_index(enc["input_ids"][i], tokenizer)
            answers = batch["answers"][example]
            if not answers["answer_start"]:
                starts.append(cls)
                ends.append(cls)
                continue
            first_char = answers["answer_start"][0]
            last_char = first_char + len(answers["text"][0])
            first, last = _context_range(enc.sequence_ids(i))
            if offsets[first][0] > first_char or offsets[last][1] < last_char:
                starts.append(cls)  # the answer is not (wholly) in this window
                ends.append(cls)
                continue
            start = first
            while start <= last and offsets[start][0] <= first_char:
                start += 1
            end = last
            while end >= first and offsets[end][1] >= last_char:
                end -= 1
            starts.append(start - 1)
            ends.append(end + 1)
        enc["start_positions"], enc["end_positions"] = starts, ends
        enc.pop("offset_mapping")
        enc.pop("overflow_to_sample_mapping")
        return enc

    return examples.map(encode, batched=True, remove_columns=examples.column_names, desc="SQuAD training windows")


def eval_features(examples: Dataset, tokenizer, max_length: int = 384, stride: int = 128) -> Dataset:
    """Model inputs plus `example_id` and `offset_mapping` (None outside the context), one row per window."""

    def encode(batch):
        enc = _windows(tokenizer, batch, max_length, stride)
        samples = enc.pop("overflow_to_sample_mapping")
        enc["example_id"] = [batch["id"][s] for s in samples]
        enc["offset_mapping"] = [
            [o if seq == 1 else None for o, seq in zip(offsets, enc.sequence_ids(i))]
            for i, offsets in enumerate(enc["offset_mapping"])
        ]
        return enc

    return examples.map(encode, batched=True, remove_columns=examples.column_names, desc="SQuAD evaluation windows")


def model_inputs(features: Dataset) -> Dataset:
    """The evaluation windows without the columns the model does not take."""
    return features.remove_columns([c for c in EVAL_ONLY_COLUMNS if c in features.column_names])
