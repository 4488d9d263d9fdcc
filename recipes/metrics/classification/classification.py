"""Accuracy and macro-F1 of class predictions, in one `evaluate` module (the quickstart's and benchmarks' metric)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy (the fraction of predictions equal to their reference) and macro-F1 (the unweighted mean over classes of
each class's F1 = 2 TP / (2 TP + FP + FN)), over the classes that occur in the predictions or the references, as
scikit-learn's `f1_score(average="macro")` computes it; a class without any true or predicted example has F1 0.
Macro-F1 tells a classifier that favours the larger class apart from one that does not, which accuracy alone hides.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
Returns:
    accuracy (`float`): in [0, 1].
    macro_f1 (`float`): in [0, 1].
Examples:
    >>> metric = evaluate.load("recipes/metrics/classification")
    >>> metric.compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 1])
    {'accuracy': 0.75, 'macro_f1': 0.7333333333333334}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        predicted, true = np.asarray(predictions), np.asarray(references)
        f1 = []
        for label in np.union1d(predicted, true):
            hits = np.sum((predicted == label) & (true == label))
            f1.append(2 * hits / (np.sum(predicted == label) + np.sum(true == label)))
        return {"accuracy": float(np.mean(predicted == true)), "macro_f1": float(np.mean(f1))}
