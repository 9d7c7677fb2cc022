"""What the package knows about each transformers architecture, in one table (as `peft/utils/constants.py` keeps
PEFT's default targets): where routed adapters go by default, where the feed-forward network (FFN) lives, which
config attribute holds the hidden size, and whether the model is a causal LM.

An architecture not in the table still works when the user names `target_modules` (and, for the routed FFN, the
`ffn_*` fields)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FFNLayout:
    """Paths, from the module that holds an FFN, of its pieces. The FFN computes
    out_proj(dropout(act(in_proj(x)))), or out_proj(dropout(act(gate(x)) * up(x))) when gated.

    entry: the module that receives the FFN's input and that the routed FFN replaces; whatever it outputs must
        reach `out_proj` untouched (BERT's `intermediate` outputs act(dense(x)), which `output.dense` reads).
    in_proj: the input projection, or (gate, up) for a gated FFN: act(gate(x)) * up(x).
    out_proj: the output projection.
    activation: path of the activation module (or function attribute), or a name in transformers' `ACT2FN`.
    dropout: path of the dropout on the intermediate activations, if any.
    """

    entry: str
    in_proj: tuple[str, ...]
    out_proj: str
    activation: str
    dropout: str | None = None


@dataclass(frozen=True)
class Architecture:
    # routed adapters after self-attention and after the FFN (paper A), or a regex on module names (PEFT fullmatches it)
    adapter_targets: tuple[str, ...] | str
    ffn_layouts: tuple[FFNLayout, ...] = ()  # candidates, the first whose pieces exist wins (T5: gated, else plain)
    hidden_size_attr: str = "hidden_size"  # the config attribute of the model's width
    causal: bool = False  # a causal LM: per-example routing would pool over future tokens
    cross_attention_kv: tuple[str, ...] = ()  # decoder Linears that read the encoder's output (cross-attention k, v)


_BERT_FFN = (FFNLayout("intermediate", ("intermediate.dense",), "output.dense", "intermediate.intermediate_act_fn"),)
_T5_FFN = (
    FFNLayout(
        "DenseReluDense",
        ("DenseReluDense.wi_0", "DenseReluDense.wi_1"),
        "DenseReluDense.wo",
        "DenseReluDense.act",
        "DenseReluDense.dropout",
    ),
    FFNLayout(
        "DenseReluDense", ("DenseReluDense.wi",), "DenseReluDense.wo", "DenseReluDense.act", "DenseReluDense.dropout"
    ),
)
_LLAMA_FFN = (FFNLayout("mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "mlp.act_fn"),)

_BERT = Architecture(("attention.output.dense", "output.dense"), _BERT_FFN)
# not after cross-attention: `o` alone would also match EncDecAttention.o
_T5 = Architecture(
    ("SelfAttention.o", "DenseReluDense.wo"),
    _T5_FFN,
    hidden_size_attr="d_model",
    cross_attention_kv=("EncDecAttention.k", "EncDecAttention.v"),
)
_BART = Architecture(
    ("self_attn.out_proj", "fc2"),
    hidden_size_attr="d_model",
    cross_attention_kv=("encoder_attn.k_proj", "encoder_attn.v_proj"),
)
_LLAMA = Architecture(("self_attn.o_proj", "mlp.down_proj"), _LLAMA_FFN, causal=True)

ARCHITECTURES: dict[str, Architecture] = {
    "t5": _T5,
    "mt5": _T5,
    "umt5": _T5,
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "distilbert": Architecture(("attention.out_lin", "ffn.lin2"), hidden_size_attr="dim"),
    "bart": _BART,
    "mbart": _BART,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    # conv adapters after every residual block (ResNetBasicLayer / ResNetBottleNeckLayer), routed on the spatial mean
    "resnet": Architecture(r".*encoder\.stages\.\d+\.layers\.\d+"),
}

# the views PEFT and the routed FFN read: default `target_modules` per model type, and FFN layouts
ROUTED_ADAPTER_TARGET_MODULES: dict[str, list[str] | str] = {
    k: a.adapter_targets if isinstance(a.adapter_targets, str) else list(a.adapter_targets)
    for k, a in ARCHITECTURES.items()
}
FFN_LAYOUTS: dict[str, tuple[FFNLayout, ...]] = {k: a.ffn_layouts for k, a in ARCHITECTURES.items() if a.ffn_layouts}
ROUTED_FFN_TARGET_MODULES: dict[str, list[str]] = {
    model_type: sorted({layout.entry for layout in layouts}) for model_type, layouts in FFN_LAYOUTS.items()
}


def architecture_of(model: nn.Module) -> Architecture | None:
    config = getattr(model, "config", None)
    return ARCHITECTURES.get(getattr(config, "model_type", None) or "")


def reads_encoder_output(model: nn.Module, module_name: str) -> bool:
    """Whether a decoder Linear's input is the encoder's output (cross-attention keys and values): its tokens are the
    encoder's, so a router on that input uses the encoder's mask."""
    arch = architecture_of(model)
    return arch is not None and any(module_name.endswith("." + n) for n in arch.cross_attention_kv)


def hidden_size(config) -> int | None:
    """The model's width from its config: the table's attribute, else the usual names."""
    known = ARCHITECTURES.get(getattr(config, "model_type", None) or "")
    names = ((known.hidden_size_attr,) if known else ()) + ("hidden_size", "d_model", "dim")
    return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder-only model with a language-modelling head (its labels are shifted; it generates)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    return "CausalLM" in name or "LMHead" in name
