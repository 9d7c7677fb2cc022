"""Paper B's multi-task benchmarks (its section 4.1 and 4.3, supplement S3, S4, S6): data sets with their tasks
(`benchmark`, `tasks`; Multi-Digits in `data`), multi-gate MoEs of CNN experts (`model`), training and scoring of
one run (`train`), the tables as rows and the random search (`experiments`), running many jobs (`runner`), the
whole study (`study`) and its report with t-tests and plots (`report`). `recipes/moesart_benchmarks.py` runs it."""

from .benchmark import BENCHMARKS, Benchmark, build_benchmark
from .data import MultiDigits, make_multi_digits
from .model import CNNExpertBank, MultiGateMoE, routing_config_for
from .study import run_study
from .tasks import Split, Task, total_loss
from .train import RunSpec, evaluate, run

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "CNNExpertBank",
    "MultiDigits",
    "MultiGateMoE",
    "RunSpec",
    "Split",
    "Task",
    "build_benchmark",
    "evaluate",
    "make_multi_digits",
    "routing_config_for",
    "run",
    "run_study",
    "total_loss",
]
