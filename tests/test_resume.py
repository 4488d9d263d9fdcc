"""Resuming from a checkpoint: after the switch it re-ties and continues bit-identically; before, it counts once."""

import pytest
import torch
from helpers import SHARING, TokenDataset, tiny_llama, training_args
from transformers import Trainer

from loradrop_trainer import LoraDropCallback, find_lora_layers


def _run(tmp_path, resume_from=None, max_steps=12, save_steps=None, warmup_steps=2, **config):
    model = tiny_llama()
    callback = LoraDropCallback(alpha=0.25, **{**SHARING, **config})
    args = training_args(
        tmp_path,
        max_steps=max_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=40), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume_from)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return callback, lora, model


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "config",
    [{}, {"shared_init": "fresh"}, {"mode": "drop"}, {"mode": "truncate"}],
    ids=["share", "fresh", "drop", "truncate"],
)
def test_resume_after_switch_is_bit_identical(tmp_path, config):
    full, full_lora, _ = _run(tmp_path / "full", save_steps=6, **config)
    assert full.plan.step == 3
    resumed, resumed_lora, model = _run(
        tmp_path / "resumed", resume_from=str(tmp_path / "full" / "out" / "checkpoint-6"), **config
    )
    assert resumed.plan == full.plan
    _assert_identical(resumed_lora, full_lora)
    if config.get("mode", "share") == "share":
        layers = find_lora_layers(model)
        members = next(iter(resumed.plan.shared.values()))
        assert len({id(layers[n].lora_A["default"].weight) for n in members}) == 1, "resume must re-tie"


@pytest.mark.parametrize("score_every", [1, 2])
def test_resume_before_switch_gives_the_same_plan(tmp_path, score_every):
    full, full_lora, _ = _run(tmp_path / "full", max_steps=20, save_steps=3, warmup_steps=0, score_every=score_every)
    assert full.plan.step == 5
    checkpoint = tmp_path / "full" / "out" / "checkpoint-3"
    resumed, resumed_lora, _ = _run(
        tmp_path / "resumed", max_steps=20, warmup_steps=0, resume_from=str(checkpoint), score_every=score_every
    )
    assert resumed.plan.total == full.plan.total
    assert resumed.plan == full.plan
    _assert_identical(resumed_lora, full_lora)
