"""GLUE for every recipe: the eight tasks (no WNLI), loading and checking their data, official metrics.

Model-independent parts (`tasks`, `data`, `metrics`) serve BERT classification and T5 alike; `text_to_text`
casts the tasks for T5.
"""

from .data import HUB_DATASET, GlueDataError, check_task_data, load_glue, take
from .metrics import glue_average, task_metrics, task_score
from .tasks import GLUE_TASK_NAMES, GLUE_TASKS, GlueTask, get_task, get_tasks

__all__ = [
    "GLUE_TASKS",
    "GLUE_TASK_NAMES",
    "HUB_DATASET",
    "GlueDataError",
    "GlueTask",
    "check_task_data",
    "get_task",
    "get_tasks",
    "glue_average",
    "load_glue",
    "take",
    "task_metrics",
    "task_score",
]
