"""What an unmodified training script leaves (trainer.save_model(), checkpoints) becomes a compact adapter with
`loradrop compact`, and every count of kept modules and LoRA parameters agrees (issue 13)."""

import json
import re

import pytest
import torch
from helpers import SHARING, TokenDataset, tiny_bert, tiny_llama, tiny_llama_base, training_args
from peft import PeftModel
from transformers import Trainer

from hub_export import PlanError, load_compact, read_compact
from hub_export.cli import main as loradrop
from hub_export.compact import MANIFEST_FILE
from hub_export.model_card import CARD_FILE
from loradrop_trainer import LoraDropCallback
from loradrop_trainer.report import PLAN_FILE


def _script(tmp_path, model, **config):
    """An ordinary Trainer script with the callback added: train, then `trainer.save_model()`."""
    callback = LoraDropCallback(alpha=0.25, **{**SHARING, **config})
    args = training_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=12)
    task = "classify" if type(model.base_model.model).__name__.startswith("Bert") else "causal"
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(task=task), callbacks=[callback])
    trainer.train()
    trainer.save_model()
    return trainer, callback, tmp_path / "out"


def _logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("mode", ["share", "drop"])
def test_save_model_output_compacts_and_loads_with_the_trained_logits(tmp_path, mode):
    trainer, callback, out = _script(tmp_path, tiny_llama(), mode=mode)
    assert loradrop(["compact", str(out), str(tmp_path / "compact")]) == 0
    inputs = {"input_ids": torch.randint(1, 90, (2, 12))}
    trained = _logits(trainer.model, inputs)
    compact = load_compact(tiny_llama_base(), tmp_path / "compact")
    torch.testing.assert_close(_logits(compact, inputs), trained, rtol=0, atol=0)
    plain = PeftModel.from_pretrained(tiny_llama_base(), str(out))
    torch.testing.assert_close(_logits(plain, inputs), trained, rtol=0, atol=0)
    adapter = read_compact(tmp_path / "compact")
    assert adapter.plan == callback.plan
    assert adapter.stored_params == callback.lora_params_after < adapter.plain_params == callback.lora_params_before


def test_a_checkpoint_compacts_with_the_plan_it_holds(tmp_path):
    _, callback, out = _script(tmp_path, tiny_llama())
    assert loradrop(["compact", str(out / "checkpoint-8"), str(tmp_path / "compact")]) == 0
    assert read_compact(tmp_path / "compact").plan == callback.plan


def test_a_checkpoint_from_before_the_switch_is_refused_naming_the_module(tmp_path, capsys):
    _, callback, out = _script(tmp_path, tiny_llama())
    before = out / "checkpoint-2"
    assert not (before / PLAN_FILE).exists()
    code = loradrop(["compact", str(before), str(tmp_path / "compact"), "--plan", str(out / PLAN_FILE)])
    assert code == 1
    error = capsys.readouterr().err
    members = [name for group in callback.plan.shared.values() for name in group[1:]]
    assert "differs from" in error and "before the switch" in error
    assert any(f"{name}.lora_" in error for name in members), "the error names a module that should share"
    assert not (tmp_path / "compact").exists()
    from hub_export import compact_peft_adapter

    with pytest.raises(PlanError, match="differs from"):
        compact_peft_adapter(before, tmp_path / "compact", plan=out / PLAN_FILE)


def test_counts_agree_across_log_plan_file_card_and_inspect(tmp_path, capsys):
    trainer, callback, out = _script(tmp_path, tiny_bert())  # SEQ_CLS: the classifier is saved as modules_to_save
    before, after = callback.lora_params_before, callback.lora_params_after
    logged = next(h for h in trainer.state.log_history if "loradrop/lora_params" in h)
    assert logged["loradrop/lora_params"] == after and logged["loradrop/kept_modules"] == len(callback.plan.kept)
    written = json.loads((out / PLAN_FILE).read_text())
    assert (written["lora_params_before"], written["lora_params_after"]) == (before, after)
    assert loradrop(["compact", str(out), str(tmp_path / "compact")]) == 0
    capsys.readouterr()
    assert loradrop(["inspect", str(tmp_path / "compact")]) == 0
    shown = capsys.readouterr().out
    assert f"LoRA parameters {before:,} -> {after:,}" in shown
    assert f"{len(callback.plan.kept)}/{len(callback.plan.kinds)} modules keep their own LoRA" in shown
    assert re.search(r"plus [\d,]+ parameters of modules trained in full", shown)
    card = (tmp_path / "compact" / CARD_FILE).read_text()
    assert f"| plain PEFT adapter | {before:,} |" in card and f"| this compact adapter | {after:,} |" in card
    manifest = json.loads((tmp_path / "compact" / MANIFEST_FILE).read_text())
    assert manifest["plan"]["lora_params_after"] == after
