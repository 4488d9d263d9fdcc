"""What an unmodified training script leaves (trainer.save_model(), checkpoints) becomes a compact adapter with
`loradrop compact`, and every count of kept modules and LoRA parameters agrees (issue 13); an adapter saved before the
switch is refused in mode "drop" as in mode "share" (issue 21, item 2)."""

import json
import re

import pytest
import torch
from helpers import (
    EARLIEST_IS_BEST,
    LLAMA_TARGETS,
    SHARING,
    EarliestIsBest,
    TokenDataset,
    one_line_error,
    tiny_bert,
    tiny_llama,
    tiny_llama_base,
    training_args,
)
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import Trainer

from hub_export import PlanError, compact_peft_adapter, load_compact, read_compact
from hub_export.cli import main as loradrop
from hub_export.compact import MANIFEST_FILE
from hub_export.format import CARD_FILE
from loradrop_trainer import LoraDropCallback
from loradrop_trainer.report import PLAN_FILE, kept_line


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
    with pytest.raises(PlanError, match="differs from"):
        compact_peft_adapter(before, tmp_path / "compact", plan=out / PLAN_FILE)


def test_21_2_a_checkpoint_from_before_the_switch_is_refused_in_drop_mode(tmp_path, capsys):
    """`--plan` of a drop-mode run on its checkpoint from before the switch: the dropped modules' saved B is not zero
    yet (the switch zeroes it), so dropping them would change what the adapter computes. Refused through the CLI and
    the Python API, naming a dropped module, and nothing is written."""
    _, callback, out = _script(tmp_path, tiny_llama(), mode="drop")
    before = out / "checkpoint-2"
    assert callback.plan.mode == "drop" and callback.plan.dropped and callback.plan.step > 2
    assert not (before / PLAN_FILE).exists()
    code = loradrop(["compact", str(before), str(tmp_path / "compact"), "--plan", str(out / PLAN_FILE)])
    assert code == 1
    error = one_line_error(capsys)
    assert "is not zero" in error and "before the switch" in error and "checkpoint saved after the switch" in error
    named = re.search(r"'([^']+)\.lora_B\.weight' is not zero", error)
    assert named and named[1] in callback.plan.dropped, "the error names a module the plan drops"
    assert not (tmp_path / "compact").exists()
    with pytest.raises(PlanError, match=r"mode 'drop'.*lora_B\.weight' is not zero"):
        compact_peft_adapter(before, tmp_path / "compact", plan=out / PLAN_FILE)
    assert not (tmp_path / "compact").exists()
    # The same run's checkpoint after the switch, with the same plan, compacts.
    assert loradrop(["compact", str(out / "checkpoint-8"), str(tmp_path / "compact")]) == 0


def test_21_2_load_best_model_at_end_then_save_model_then_compact_is_refused_in_drop_mode(tmp_path, capsys):
    """The README's flow with the best checkpoint from before the switch: `save_model()` writes that checkpoint's plain
    LoRA next to the run's drop-mode plan file, and `loradrop compact OUTPUT_DIR` must not drop modules from it."""
    callback = LoraDropCallback(alpha=0.5, **{**SHARING, "mode": "drop"})  # switch at step 6 of 12
    args = training_args(
        tmp_path,
        max_steps=12,
        save_strategy="steps",
        save_steps=2,
        **EARLIEST_IS_BEST,
    )
    trainer = Trainer(
        model=tiny_llama(),
        args=args,
        train_dataset=TokenDataset(n=40),
        eval_dataset=TokenDataset(n=8, seed=9),
        callbacks=[callback, EarliestIsBest()],
    )
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert trainer.state.best_global_step < callback.plan.step and (out / PLAN_FILE).is_file()
    assert loradrop(["compact", str(out), str(tmp_path / "compact")]) == 1
    assert "is not zero" in one_line_error(capsys)
    with pytest.raises(PlanError, match="saved before the switch"):
        compact_peft_adapter(out, tmp_path / "compact")
    assert not (tmp_path / "compact").exists()


def test_21_15_compact_of_a_directory_with_two_adapters_names_them_and_the_call_that_works(tmp_path, capsys):
    """Issue 21, item 15: a run that trained a second adapter saves it in OUTPUT_DIR/<name>/ (PEFT's layout), next to
    its plan and the 'default' adapter at the top; `loradrop compact OUTPUT_DIR` compared the wrong adapter with the
    plan and blamed "saved before the switch", while the right call exits 0."""
    model = tiny_llama()
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM"))
    model.set_adapter("other")
    callback = LoraDropCallback(alpha=0.25, adapter_name="other", **SHARING)
    trainer = Trainer(
        model=model, args=training_args(tmp_path, max_steps=12), train_dataset=TokenDataset(), callbacks=[callback]
    )
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and (out / "other" / "adapter_config.json").is_file()
    assert loradrop(["compact", str(out), str(tmp_path / "compact")]) == 1
    error = one_line_error(capsys)
    assert f"holds several PEFT adapters ('default' in {out}, 'other' in {out / 'other'})" in error
    assert f"`loradrop compact {out / 'other'} DST --plan {out / PLAN_FILE}`" in error and "switch" not in error
    assert not (tmp_path / "compact").exists()
    assert loradrop(["compact", str(out / "other"), str(tmp_path / "compact")]) == 1
    assert f"its run's plan is probably {out / PLAN_FILE}" in one_line_error(capsys)
    assert loradrop(["compact", str(out / "other"), str(tmp_path / "compact"), "--plan", str(out / PLAN_FILE)]) == 0
    assert read_compact(tmp_path / "compact").plan == callback.plan


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
    assert kept_line(callback.plan) in shown
    assert re.search(r"plus [\d,]+ parameters of modules trained in full", shown)
    card = (tmp_path / "compact" / CARD_FILE).read_text()
    assert f"| plain PEFT adapter | {before:,} |" in card and f"| this compact adapter | {after:,} |" in card
    manifest = json.loads((tmp_path / "compact" / MANIFEST_FILE).read_text())
    assert manifest["plan"]["lora_params_after"] == after


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda t: t.fill_(float("nan")), "not finite"),  # issue 21, item 17: it read "X differs from X"
        (lambda t: t.to(torch.float8_e4m3fn), "float8_e4m3fn; adapter weights are float32"),  # item 20: a traceback
    ],
    ids=["21_17_nan", "21_20_float8"],
)
def test_21_17_and_20_unusable_weights_in_a_compact_source_are_named_in_one_line(tmp_path, capsys, spoil, message):
    _, callback, out = _script(tmp_path, tiny_llama())
    weights = load_file(out / "adapter_model.safetensors")
    key = callback.plan.dropped[0] + ".lora_A.weight"  # a shared member: compared with its source
    weights[key] = spoil(weights[key].clone())
    save_file(weights, out / "adapter_model.safetensors")
    assert loradrop(["compact", str(out), str(tmp_path / "compact")]) == 1
    error = one_line_error(capsys)
    assert message in error and key in error and "differs" not in error
    assert not (tmp_path / "compact").exists()


def test_22_5_a_trainer_output_or_early_checkpoint_is_pointed_to_the_next_step(tmp_path, capsys):
    """Issue 22, item 5: `loradrop inspect` and `push` of what the Trainer saved say to run `loradrop compact` (not to
    load it with PEFT), and `loradrop compact` of a checkpoint from before the switch says it was saved before it and
    which directory to compact, instead of asking for a --plan that would then fail."""
    _, _, out = _script(tmp_path, tiny_llama())
    compact_step = f"`loradrop compact {out} {out / 'compact'}`"
    assert loradrop(["inspect", str(out)]) == 1
    assert compact_step in one_line_error(capsys)
    assert loradrop(["push", str(out), "someone/adapter"]) == 1
    assert compact_step in one_line_error(capsys)
    assert loradrop(["compact", str(out / "checkpoint-2"), str(tmp_path / "compact")]) == 1
    error = one_line_error(capsys)
    assert "saved before the LoRA-drop switch" in error and compact_step in error and "--plan" not in error
    assert not (tmp_path / "compact").exists()


def test_22_5_compact_writes_into_a_folder_of_the_output_directory(tmp_path, capsys):
    """Issue 22, item 5: `loradrop compact OUT OUT/compact`, the quickstart's layout, works, again over its earlier
    output, and leaves the rest of OUT as it was; OUT itself or a directory around it stays refused."""
    _, callback, out = _script(tmp_path, tiny_llama())
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    for _ in range(2):
        assert loradrop(["compact", str(out), str(out / "compact")]) == 0
    assert read_compact(out / "compact").plan == callback.plan
    assert {
        path: path.read_bytes() for path in out.rglob("*") if path.is_file() and "compact" not in path.parts
    } == before
    for target in (out, tmp_path):
        assert loradrop(["compact", str(out), str(target)]) == 1
        assert "would destroy the source" in one_line_error(capsys)
