"""The rows of the real-text study and the PEFT config each one trains.

Every trained row adapts the same modules: the three MLP projections (gate, up, down) of the top decoder layers,
with the same trainable-parameter budget for its LoRA experts: PEFT's LoRA of rank R (default 16); routed rows
split it into experts of rank R / N. Per-token rows have 4 experts of rank 4 (k=1 or 2 of them per token); per-
example rows have one expert per source (2 of rank 8), as paper A gives one subnetwork per tag. Routers add their
own few parameters (a BatchNorm and a Linear per routed block); `monolithic` uses one expert (paper A's one
subnetwork), so half the budget. X-LoRA trains only its scaling classifier over the tag row's two LoRAs (frozen),
so it depends on that row.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig

from hf_condroute import RoutedLoraConfig

MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
MLP_GROUP = r"layers\.\d+\.mlp"  # MixLoRA: one router per layer's MLP (on gate_proj's input: the FFN's input)
TOKEN_EXPERTS = 4


@dataclass(frozen=True)
class Row:
    name: str
    method: str  # "none" (zero-shot), "lora", "routed", "xlora"
    router: str | None = None
    granularity: str = "example"
    top_k: int = 1
    sharing: str | None = None
    supervision_percent: int = 0  # training examples whose source supervises the routers, in percent
    aux_loss_coef: float = 0.0

    @property
    def learned(self) -> bool:
        """Whether the routing is learned (Focus/Cover against the source are reported for these)."""
        return self.method == "xlora" or (self.method == "routed" and self.router not in ("tag", "hash", "monolithic"))

    @property
    def family(self) -> str:
        """Which learning rate the row uses: the one chosen on the validation split for LoRA, or for routed LoRA."""
        return "routed" if self.method == "routed" else "lora"

    @property
    def needs_tag_row(self) -> bool:
        return self.method == "xlora"


ROWS = (
    Row("zero-shot", "none"),
    Row("LoRA", "lora"),
    Row("token top_k k=1", "routed", "top_k", "token", 1),
    Row("token top_k k=2", "routed", "top_k", "token", 2),
    Row("MixLoRA k=2", "routed", "top_k", "token", 2, sharing=MLP_GROUP, aux_loss_coef=0.01),
    Row("tag", "routed", "tag"),
    Row("hash", "routed", "hash"),
    Row("monolithic", "routed", "monolithic"),
    Row("top_k", "routed", "top_k"),
    Row("smear", "routed", "smear"),
    Row("top_k+sup10", "routed", "top_k", supervision_percent=10),
    Row("X-LoRA", "xlora"),
)
ROW_NAMES = tuple(r.name for r in ROWS)
TUNED_ROWS = ("LoRA", "top_k")  # the learning rate of each family is chosen on these rows' validation accuracy


def get_rows(names: list[str] | None) -> list[Row]:
    """The rows of these names, in the study's order (None: every row)."""
    if names is None:
        return list(ROWS)
    unknown = [n for n in names if n not in ROW_NAMES]
    if unknown:
        raise ValueError(f"Unknown row(s) {unknown}: choose from {', '.join(repr(n) for n in ROW_NAMES)}.")
    return [r for r in ROWS if r.name in names]


def peft_config(row: Row, rank: int, num_sources: int, seed: int, supervision_coef: float):
    """The PEFT config of a LoRA or routed row, for the truncated top model (every layer of it is adapted)."""
    if row.method == "lora":
        return LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(MLP_TARGETS),
            task_type="CAUSAL_LM",
        )  # fmt: skip
    if row.method != "routed":
        raise ValueError(f"Row {row.name!r} has no single PEFT config (method {row.method!r}).")
    experts = TOKEN_EXPERTS if row.granularity == "token" else num_sources
    if rank % experts:
        raise ValueError(f"rank={rank} must split evenly into {experts} experts for row {row.name!r}: use a multiple.")
    r = rank // experts
    return RoutedLoraConfig(
        r=r, lora_alpha=2 * r, num_experts=1 if row.router == "monolithic" else experts, router=row.router,
        top_k=row.top_k, routing_granularity=row.granularity, router_sharing=row.sharing,
        router_aux_loss_coef=row.aux_loss_coef, hash_seed=seed,
        tag_supervision_coef=supervision_coef if row.supervision_percent else 0.0,
        target_modules=list(MLP_TARGETS), task_type="CAUSAL_LM",
    )  # fmt: skip
