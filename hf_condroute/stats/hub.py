"""Routing statistics and a model card that travel with a saved adapter, to disk and to the Hub.

`save_pretrained` of a model with routed adapters (and so every Trainer checkpoint and `push_to_hub`) writes,
beside each adapter's weights:

- `routing_stats.json`: the router configuration, the routed blocks, and the latest statistics kept on the
  model per split (`RoutingStatsCallback`, or `compute_routing_stats` for a custom loop): per-block load,
  entropy, Focus/Cover and the tag/subnetwork alignment matrix when tags were seen;
- `routing_load.png` and `routing_alignment.png`: heatmaps of those;

and renders the routing part of `README.md` from `model_cards/routed_model_card.md`. The generated part sits
between two HTML comments: a later save replaces only that part, and text a user wrote around it is kept.

How it hooks in: PEFT has no save hook for tuners, so `tuners.peft_patches` (run on `import hf_condroute`)
wraps three `PeftModel` methods with the functions of this module, each a no-op for models without routed adapters:
`save_pretrained` (writes the files above once PEFT has saved), `create_or_update_model_card` (Trainer's
`create_model_card` and `push_to_hub` call it after writing their own README) and `_upload_modified_files`
(transformers' `push_to_hub` replaces README.md with the Hub's card just before uploading: the routing section
is put back into that card).
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import jinja2
from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from ..routers.config import RoutingConfig
from .adapter_files import check_adapter_weights
from .store import get_routing_stats, routed_blocks

ROUTING_STATS_NAME = "routing_stats.json"
FORMAT = "hf_condroute/routing_stats"
FORMAT_VERSION = 1
CARD_START = "<!-- hf_condroute: routing card start (generated on save; edits between these markers are replaced) -->"
CARD_END = "<!-- hf_condroute: routing card end -->"
CARD_TAGS = ("hf_condroute", "routed-adapter", "conditional-computation", "mixture-of-experts")
DEFAULT_TEMPLATE = "routed_model_card.md"
_AUTO_CLASSES = {
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}


# ----- routing_stats.json ------------------------------------------------------------------------------
def _finite(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _routing_adapters(model: nn.Module) -> list[str]:
    configs = getattr(model, "peft_config", {}) or {}
    return [name for name, cfg in configs.items() if isinstance(cfg, RoutingConfig)]


def routing_stats_dict(model: nn.Module, adapter_name: str = "default") -> dict:
    """What `routing_stats.json` holds for one adapter."""
    config = model.peft_config[adapter_name]
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    task_type = getattr(config.task_type, "value", config.task_type)
    splits = get_routing_stats(model, adapter_name)
    return _finite(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "adapter_name": adapter_name,
            "peft_type": peft_type,
            "task_type": task_type,
            "base_model": config.base_model_name_or_path,
            "routing_config": config.routing_kwargs(),
            "routed_blocks": list(routed_blocks(model, adapter_name)),
            "splits": {name: stats.to_dict() for name, stats in splits.items()},
        }
    )


def preferred_split(record: dict) -> str | None:
    """The split a card and heatmaps show: evaluation if known, else training."""
    splits = record.get("splits") or {}
    for name in ("eval", *sorted(s for s in splits if s.startswith("eval")), "train", *sorted(splits)):
        if name in splits:
            return name
    return None


def write_heatmaps(record: dict, folder: str, split: str | None = None) -> dict[str, str]:
    """Draw the heatmaps of a routing_stats record (of `split`, default `preferred_split`) into `folder`;
    {kind: file name}. The alignment comes from another split when `split` has none."""
    from . import plots  # matplotlib only when drawing

    split = split or preferred_split(record)
    if split is None:
        return {}
    stats = record["splits"][split]
    out = {}
    if stats.get("blocks"):
        plots.plot_expert_load(
            stats["blocks"], os.path.join(folder, plots.LOAD_PNG), f"Expert load per block ({split})"
        )
        out["load"] = plots.LOAD_PNG
    aligned = next(
        (record["splits"][s] for s in (split, *record["splits"]) if record["splits"][s].get("alignment")), None
    )
    if aligned is not None:
        plots.plot_alignment(
            aligned["alignment"],
            aligned["tag_labels"],
            aligned["subnetwork_labels"],
            os.path.join(folder, plots.ALIGNMENT_PNG),
            f"Tag / subnetwork alignment ({aligned['split']})",
        )
        out["alignment"] = plots.ALIGNMENT_PNG
    return out


def adapter_dir(save_directory: str, adapter_name: str) -> str:
    """Where PEFT saves an adapter: the folder itself for "default", else a subfolder named after it."""
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


def save_routing_stats(
    model: nn.Module, save_directory: str, adapter_names: Sequence[str] | None = None, model_card: bool = True
) -> list[str]:
    """Write routing_stats.json and its heatmaps beside each routed adapter, then the model card.

    `save_pretrained` calls it; call it yourself to refresh a folder after `compute_routing_stats`. Refuses a folder
    whose adapter weights are empty (`check_adapter_weights`). Returns the paths of the routing_stats.json files."""
    names = [n for n in (adapter_names or _routing_adapters(model)) if n in _routing_adapters(model)]
    paths = []
    for name in names:
        folder = adapter_dir(save_directory, name)
        check_adapter_weights(folder)
        os.makedirs(folder, exist_ok=True)
        record = routing_stats_dict(model, name)
        record["heatmaps"] = write_heatmaps(record, folder)
        path = os.path.join(folder, ROUTING_STATS_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        paths.append(path)
    if model_card and paths:
        update_model_card(save_directory)
    return paths


def load_routing_stats(folder: str) -> dict[str, dict]:
    """{adapter name: routing_stats record} of a saved folder (the folder itself and its adapter subfolders)."""
    found = {}
    root = Path(folder)
    candidates = [root / ROUTING_STATS_NAME] + sorted(root.glob(f"*/{ROUTING_STATS_NAME}"))
    for path in candidates:
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("format") != FORMAT:
            raise ValueError(f"{path} is not an hf_condroute routing_stats.json (format {record.get('format')!r}).")
        if record.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {record['format_version']}, newer than this hf_condroute reads "
                f"({FORMAT_VERSION}): upgrade hf_condroute."
            )
        nested = path.parent != root
        if nested and record.get("adapter_name") != path.parent.name:
            continue  # another saved model inside this folder, not one of its adapters
        record["_relative_dir"] = path.parent.name if nested else ""
        found[record.get("adapter_name", "default")] = record
    return found


# ----- model card --------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_SUMMARY_LABELS = {
    "focus": "Focus (paper A, 4.2)",
    "cover": "Cover (paper A, 4.2)",
    "load_entropy": "Mean normalised load entropy (1 = balanced)",
    "max_share": "Largest share of one expert, worst block",
    "experts_used": "Fraction of experts used, worst block",
    "router_entropy": "Mean normalised router entropy per row",
    "flip_rate": "Decisions changed since the previous evaluation",
}


def _adapter_view(name: str, record: dict) -> dict:
    from .plots import short_block_name

    config = record.get("routing_config", {})
    prefix = f"{record['_relative_dir']}/" if record.get("_relative_dir") else ""
    coefs = [
        (k, config[k])
        for k in (
            "router_aux_loss_coef",
            "router_z_loss_coef",
            "tag_supervision_coef",
            "trimmed_lasso_coef",
            "router_jitter_noise",
        )
        if config.get(k)
    ]
    view = {
        "name": name,
        "peft_type": record.get("peft_type"),
        "config": config,
        "granularity_noun": "token" if config.get("routing_granularity") == "token" else "example",
        "num_blocks": len(record.get("routed_blocks", [])),
        "loss_coefficients": coefs,
        "tag_mapping": config.get("tag_to_expert") or config.get("tag_to_expert_pattern"),
        "stats_file": prefix + ROUTING_STATS_NAME,
        "stats": None,
    }
    split = preferred_split(record)
    if split is None:
        return view
    stats = record["splits"][split]
    summary = stats.get("summary", {})
    rows = [(label, _fmt(summary[key])) for key, label in _SUMMARY_LABELS.items() if key in summary]
    rows += [
        (f"Mean auxiliary loss `{k[5:]}` per step", _fmt(v, 4)) for k, v in summary.items() if k.startswith("loss_")
    ]
    heatmaps = record.get("heatmaps", {})
    view.update(
        stats=stats,
        summary_rows=rows,
        focus_cover_note=(
            'Focus and Cover summarise the F1 score between "tag i present" and "subnetwork j active" over the '
            "examples: Focus is the mean over subnetworks (experts of every block) of the best tag, Cover the mean "
            "over tags of the best subnetwork. Both are 1 when each subnetwork serves one tag and each tag has one."
            if "focus" in summary
            else ""
        ),
        block_rows=[
            {
                "name": short_block_name(block),
                "router": b.get("router") or "",
                "load": " / ".join(f"{x:.2f}" for x in b["load"]),
                "entropy": _fmt(b["load_entropy"]),
                "max_share": _fmt(b["max_share"]),
                "used": _fmt(b["experts_used"], 2),
            }
            for block, b in stats.get("blocks", {}).items()
        ],
        load_png=prefix + heatmaps["load"] if "load" in heatmaps else None,
        alignment_png=prefix + heatmaps["alignment"] if "alignment" in heatmaps else None,
    )
    return view


def _versions() -> list[tuple[str, str]]:
    import peft
    import torch
    import transformers

    return [
        ("hf_condroute", version("hf-condroute")),
        ("PEFT", peft.__version__),
        ("Transformers", transformers.__version__),
        ("PyTorch", torch.__version__),
    ]


def template_path(name: str = DEFAULT_TEMPLATE) -> Path:
    """A template shipped in `model_cards/`: beside the package in a source tree, under <prefix>/share in a wheel."""
    candidates = [
        Path(__file__).resolve().parents[2] / "model_cards" / name,
        Path(sys.prefix) / "share" / "hf_condroute" / "model_cards" / name,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Model card template {name} is missing (looked in {', '.join(str(c.parent) for c in candidates)}): "
        "reinstall hf_condroute, or pass `template=` a path of your own."
    )


def render_model_card(folder: str, template: str | None = None, repo_hint: str | None = None, **context) -> str:
    """The routing part of the model card of a saved folder, from its routing_stats.json files (markdown,
    between the generated-section markers). `context`: more variables for a template of one's own (the native
    export's card)."""
    records = load_routing_stats(folder)
    if not records:
        raise FileNotFoundError(f"No {ROUTING_STATS_NAME} in {folder} or its adapter subfolders: save the model first.")
    adapters = [_adapter_view(name, record) for name, record in records.items()]
    first = next(iter(records.values()))
    path = Path(template) if template is not None else template_path()
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent)), keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    body = env.get_template(path.name).render(
        title=f"Routed adapter: {first.get('routing_config', {}).get('router', 'routed')} routing"
        + (f" on {first['base_model']}" if first.get("base_model") else ""),
        base_model=first.get("base_model"),
        adapters=adapters,
        auto_class=_AUTO_CLASSES.get(first.get("task_type") or "", "AutoPeftModel"),
        repo_hint=repo_hint or "<this repository or folder>",
        uses_tags=any(a["config"].get("router") == "tag" or a["config"].get("tag_supervision_coef") for a in adapters),
        versions=_versions(),
        **context,
    )
    return f"{CARD_START}\n{body.strip()}\n{CARD_END}"


def _boilerplate_lines() -> set[str]:
    return {line.strip() for line in ModelCard.from_template(ModelCardData()).text.splitlines()}


def _is_boilerplate(text: str) -> bool:
    """True when a card body holds nothing a person wrote: huggingface_hub's default template, as PEFT and
    transformers' push_to_hub create it (possibly with their framework-version and description lines)."""
    known = _boilerplate_lines()
    for line in text.splitlines():
        s = line.strip()
        if not s or s in known or s == "### Framework versions" or s.startswith("- PEFT "):
            continue
        if "model card has been automatically generated" in s:
            continue
        return False
    return True


def update_model_card(folder: str, template: str | None = None, library_name: str = "peft", **context) -> str | None:
    """Put the routing section into `folder`/README.md (creating it if needed); None if the folder has no
    routing_stats.json. A previous routing section is replaced, a default template body replaced, and any
    other text kept, with the section appended. `library_name` is the card's (a native export's is
    "transformers"); `context` goes to the template."""
    records = load_routing_stats(folder)
    if not records:
        return None
    if template is None:
        try:
            template = str(template_path())
        except FileNotFoundError as e:  # never fail a save over the card: the statistics are written already
            warnings.warn(f"{e} The model card was not updated.", stacklevel=2)
            return None
    section = render_model_card(folder, template, **context)
    path = os.path.join(folder, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard("---\n---\n")
    text = card.text
    generated = _is_boilerplate(text)
    if CARD_START in text and CARD_END in text:
        start, end = text.index(CARD_START), text.index(CARD_END) + len(CARD_END)
        text = text[:start] + section + text[end:]
    elif generated:
        text = section + "\n"
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    card.text = text
    data = card.data
    if not data.get("library_name") or generated:
        data.library_name = library_name  # transformers' push_to_hub card says "transformers": a PEFT adapter's is peft
    base = next((r.get("base_model") for r in records.values() if r.get("base_model")), None)
    if base and not data.get("base_model"):
        data.base_model = base
    if not data.get("base_model"):
        # a base model built from a config has no name: PEFT then writes `base_model: ''` and a tag
        # 'base_model:adapter:' with nothing after it, metadata the Hub cannot resolve
        data.base_model = None
    tags = set(data.tags or []) | set(CARD_TAGS)
    data.tags = sorted(t for t in tags if not t.endswith(":"))
    card.save(path)
    return path


def has_routing(model) -> bool:
    """Whether the PEFT model has routed adapters (the save and card hooks do nothing otherwise)."""
    return bool(_routing_adapters(model))
