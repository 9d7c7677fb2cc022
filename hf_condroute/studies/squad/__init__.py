"""SQuAD v1.1 / v2.0 for extractive question answering: loading and checking the data (`data`), the standard
preprocessing with a stride over long contexts (`features`), answer extraction from start/end logits with an
n-best search, a maximum answer length and v2.0's no-answer threshold (`answers`), and the official exact
match / F1 (`metrics`)."""

from .answers import extract_answers
from .data import SQUAD_VERSIONS, SquadDataError, SquadVersion, check_squad_data, get_squad_version, load_squad
from .features import eval_features, model_inputs, train_features
from .metrics import answer_agreement, exact_match, local_squad_scores, normalize_answer, squad_scores, token_f1

__all__ = [
    "SQUAD_VERSIONS",
    "answer_agreement",
    "SquadDataError",
    "SquadVersion",
    "check_squad_data",
    "eval_features",
    "exact_match",
    "extract_answers",
    "get_squad_version",
    "load_squad",
    "local_squad_scores",
    "model_inputs",
    "normalize_answer",
    "squad_scores",
    "token_f1",
    "train_features",
]
