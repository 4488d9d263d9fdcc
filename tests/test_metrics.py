"""recipes/metrics: the recipes' evaluate modules load by path, offline, and score as the recipes need."""

from __future__ import annotations

import pytest

from recipes.metrics import load_metric


def test_classification_gives_accuracy_and_macro_f1_without_the_hub(hub):
    metric = load_metric("classification")
    # class 0: 1 of 2 found, 1 predicted (F1 2/3); class 1: 2 of 2 found, 3 predicted (F1 4/5)
    scores = metric.compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 1])
    assert scores == pytest.approx({"accuracy": 0.75, "macro_f1": (2 / 3 + 4 / 5) / 2})
    # a classifier that always answers the larger class: accuracy looks fine, macro-F1 does not
    majority = metric.compute(predictions=[1, 1, 1, 1], references=[0, 1, 1, 1])
    assert majority == pytest.approx({"accuracy": 0.75, "macro_f1": (0 + 6 / 7) / 2})
    assert hub.requests == [], "a metric loaded by path never reaches the Hub"


def test_gsm8k_exact_match_compares_final_numbers(hub):
    metric = load_metric("gsm8k_exact_match")
    outputs = [
        "She has 3 + 4 = 7 apples.\n#### 7",  # the number after ####
        "It costs $1,200.00 in all.",  # else the last number, normalised
        "#### 5\nQuestion: next problem 6",  # cut where the model starts a new question
        "no number at all",
    ]
    references = ["... so 7 apples.\n#### 7", "#### 1200", "5", "#### 0"]
    assert metric.compute(predictions=outputs, references=references) == {"exact_match": 0.75}
    assert hub.requests == []
