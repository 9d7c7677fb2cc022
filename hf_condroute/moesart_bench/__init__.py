"""Paper B's multi-task image benchmark (its section 4.1, Table 1; supplement S6) on local data: Multi-Digits
(`data`), a multi-gate MoE of small CNN experts (`model`), its training and scoring (`train`) and the table with
the one-sided t-test of MOESART against the best other sparse router (`report`). `recipes/moesart_benchmarks.py`
runs it."""

from .data import MultiDigits, make_multi_digits
from .model import CNNExpertBank, MultiGateMoE, routing_config_for
from .report import markdown_table, summarize, ttest_moesart, write_outputs
from .train import TrainSettings, evaluate, run_router, train

__all__ = [
    "CNNExpertBank",
    "MultiDigits",
    "MultiGateMoE",
    "TrainSettings",
    "evaluate",
    "make_multi_digits",
    "markdown_table",
    "routing_config_for",
    "run_router",
    "summarize",
    "train",
    "ttest_moesart",
    "write_outputs",
]
