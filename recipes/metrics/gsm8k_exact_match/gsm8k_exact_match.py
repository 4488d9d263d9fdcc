"""GSM8K exact match on the final number, as an `evaluate` module (the GSM8K recipe's and benchmarks' metric)."""

import datasets
import evaluate

from .answers import ANSWER_MARK, extract_prediction, extract_reference, is_correct

_DESCRIPTION = """
The fraction of model outputs whose final number equals the reference's. A reference is a GSM8K solution, whose
final answer follows `####`, or that bare number; in an output the final number is the one after its first `####`,
else its last number, read up to where the model starts a new "Question:". Numbers are compared normalised: `$`,
thousands commas and a trailing `.` dropped, `36.0` read as `36`. An output without a number is wrong.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the model's outputs (generated text after the prompt).
    references (`list` of `str`): reference solutions ending in `#### <number>`, or the bare numbers.
Returns:
    exact_match (`float`): in [0, 1].
Examples:
    >>> metric = evaluate.load("recipes/metrics/gsm8k_exact_match")
    >>> metric.compute(predictions=["3 + 4 = 7\\n#### 7", "It is $1,000."], references=["#### 7", "#### 1200"])
    {'exact_match': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Gsm8kExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        correct = [is_correct(extract_prediction(p), _reference_number(r)) for p, r in zip(predictions, references)]
        return {"exact_match": sum(correct) / len(correct) if correct else 0.0}


def _reference_number(reference: str) -> str | None:
    """The final answer of a reference: the number after `####`, or the reference itself when it is a bare number."""
    return extract_reference(reference if ANSWER_MARK in reference else f"{ANSWER_MARK} {reference}")
