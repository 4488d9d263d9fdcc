"""GSM8K answers: the final number of a reference solution and of a model's output, and whether they match.

The reference is the number after ``####``; in a model's output it is the number after ``####`` if there is one,
else the last number. Both are normalised (``$``, thousands commas, a trailing ``.``, ``36.0`` -> ``36``). Standard
library only, next to the `gsm8k_exact_match` evaluate module that imports it (and travels with it to the Hub).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

ANSWER_MARK = "####"
"""GSM8K solutions end with a line ``#### <final answer>``."""

STOP_MARKERS = ("\nQuestion:", "\n\nQuestion")
"""A base model that was not trained to stop may go on to write the next problem; its answer ends there."""

# A number as GSM8K writes it: an optional sign (not the minus of "10-4"), an optional dollar sign, digits with
# optional thousands commas ("1,234", not the list "1,2,3"), optional decimals.
_NUMBER = re.compile(r"(?<![\d.])[-+]?\$?\s?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def normalize_number(text: str | None) -> str | None:
    """Canonical form of one number as written in a solution, or None if `text` holds no number.

    ``"$1,234.50"`` -> ``"1234.5"``, ``"36.0"`` -> ``"36"``, ``"18."`` -> ``"18"``, ``"-0"`` -> ``"0"``.
    """
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if cleaned.startswith("+"):
        cleaned = cleaned[1:]
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return normalize_number(match.group()) if match else None


def _last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def extract_reference(answer: str) -> str | None:
    """The final answer of a GSM8K reference solution: the number after its ``####`` mark."""
    _, sep, tail = answer.rpartition(ANSWER_MARK)
    return _first_number(tail) if sep else None


def truncate_at_stop(text: str) -> str:
    """Cut a generated answer where the model starts writing a new question."""
    for marker in STOP_MARKERS:
        cut = text.find(marker)
        if cut != -1:
            text = text[:cut]
    return text


def extract_prediction(text: str) -> str | None:
    """The final answer in a model's output: the number after the first ``####`` if any, else the last number."""
    text = truncate_at_stop(text)
    head, sep, tail = text.partition(ANSWER_MARK)
    if sep:
        found = _first_number(tail)
        if found is not None:
            return found
    return _last_number(head)


def is_correct(prediction: str | None, reference: str | None) -> bool:
    """Exact match of two normalised answers; no answer is never correct."""
    return prediction is not None and reference is not None and prediction == reference
