"""Print the routing statistics of a saved adapter and draw its heatmaps.

    python -m hf_condroute.report CHECKPOINT_DIR            # tables on stdout, heatmaps into CHECKPOINT_DIR
    python -m hf_condroute.report CHECKPOINT_DIR --out figs  # heatmaps elsewhere
    python -m hf_condroute.report CHECKPOINT_DIR --split train

CHECKPOINT_DIR is a folder written by `save_pretrained` or a Trainer checkpoint (it holds routing_stats.json,
for non-default adapters in a subfolder per adapter).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .hub import ROUTING_STATS_NAME, load_routing_stats, preferred_split, write_heatmaps
from .plots import short_block_name


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width table; numbers right-aligned."""
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row):
        return "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def report(folder: str, out: str | None = None, split: str | None = None, plots: bool = True) -> str:
    """The text report of a saved folder; draws the heatmaps into `out` (default: beside each adapter)."""
    records = load_routing_stats(folder)
    if not records:
        checkpoints = sorted(
            Path(folder).glob("checkpoint-*"),
            key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
        )
        hint = f" It has Trainer checkpoints: pass one, e.g. {checkpoints[-1]}." if checkpoints else ""
        raise FileNotFoundError(
            f"No {ROUTING_STATS_NAME} in {folder} or its adapter subfolders: save a model with routed adapters there "
            f"(`model.save_pretrained`) after `import hf_condroute`.{hint}"
        )
    parts = []
    for name, record in records.items():
        config = record.get("routing_config", {})
        parts.append(
            f"Adapter {name!r}: {record.get('peft_type')} router={config.get('router')} "
            f"num_experts={config.get('num_experts')} top_k={config.get('top_k')} "
            f"granularity={config.get('routing_granularity')} blocks={len(record.get('routed_blocks', []))}"
        )
        chosen = split or preferred_split(record)
        splits = record.get("splits") or {}
        if chosen is None:
            parts.append("  no routing statistics were recorded before saving\n")
            continue
        if chosen not in splits:
            raise ValueError(
                f"Adapter {name!r} has statistics for {sorted(splits)}, not {chosen!r}: pick one of those."
            )
        stats = splits[chosen]
        step = stats.get("global_step")
        parts.append(
            f"  split={chosen} examples={stats.get('examples')}" + (f" step={step}" if step is not None else "")
        )
        summary = stats.get("summary", {})
        parts.append(format_table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in summary.items()]))
        rows = [
            [
                f"b{i}",
                short_block_name(block),
                b.get("router") or "",
                " ".join(f"{x:.2f}" for x in b["load"]),
                f"{b['load_entropy']:.3f}",
                f"{b['max_share']:.3f}",
                f"{b['experts_used']:.2f}",
            ]
            for i, (block, b) in enumerate(stats.get("blocks", {}).items())
        ]
        parts.append(format_table(["#", "block", "router", "load per expert", "entropy", "max share", "used"], rows))
        if plots:
            folder_out = out or os.path.join(folder, record["_relative_dir"])
            if out and len(records) > 1:
                folder_out = os.path.join(out, name)
            os.makedirs(folder_out, exist_ok=True)
            drawn = write_heatmaps(record, folder_out, chosen)
            parts.append("heatmaps: " + ", ".join(os.path.join(folder_out, f) for f in drawn.values()))
        parts.append("")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_condroute.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint_dir", help="folder written by save_pretrained, or a Trainer checkpoint")
    parser.add_argument("--out", default=None, help="where to write the heatmaps (default: beside each adapter)")
    parser.add_argument("--split", default=None, help="statistics to show: eval, train, ... (default: eval if known)")
    parser.add_argument("--no-plots", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    try:
        print(report(args.checkpoint_dir, args.out, args.split, plots=not args.no_plots))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
