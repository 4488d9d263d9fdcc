"""restart=True: at the switch the adapter, its optimizer state and the LR schedule are those of a fresh run."""

import pytest
import torch
from helpers import TokenDataset, tiny_bert, tiny_llama, training_args
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch.optim.lr_scheduler import ReduceLROnPlateau
from transformers import Trainer, TrainerCallback, get_scheduler

from loradrop_trainer import LoraDropCallback, LoraDropConfig
from loradrop_trainer.restart import check_restartable

MAX_STEPS, SWITCH, WARMUP = 12, 3, 2


class AtSwitch(TrainerCallback):
    """Listed after LoraDropCallback: copies what the model and optimizer hold right after the switch, and the
    learning rate every optimizer step uses."""

    def __init__(self):
        self.lrs, self.snapshot = [], None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == SWITCH:
            params = {n: p for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
            inner = getattr(optimizer, "optimizer", optimizer)
            self.snapshot = {
                "values": {n: p.detach().clone() for n, p in params.items()},
                "has_state": {n: bool(inner.state.get(p)) for n, p in params.items()},
            }


def _train(tmp_path, model, data, resume_from=None, save_steps=None, **config):
    callback = LoraDropCallback(LoraDropConfig(alpha=SWITCH / MAX_STEPS, restart=True, **{"mode": "share", **config}))
    probe = AtSwitch()
    args = training_args(
        tmp_path,
        max_steps=MAX_STEPS,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, probe]).train(resume_from)
    return callback, probe, model


def _fresh_lora(model_factory, seed):
    """Every LoRA layer's weights as PEFT's own initialiser draws them, in model order, from `seed`."""
    model = model_factory()
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.reset_lora_parameters("default", True)
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("mode", ["share", "drop"])
def test_restart_gives_every_lora_a_fresh_start(tmp_path, mode):
    callback, probe, _ = _train(tmp_path, tiny_llama(), TokenDataset(n=40), mode=mode)
    plan = callback.plan
    assert plan.step == SWITCH
    fresh = _fresh_lora(tiny_llama, seed=0 + SWITCH)  # TrainingArguments.seed + the switch step
    snapshot = probe.snapshot
    own = [name for name in plan.kinds if plan.source_of(name) == name]
    assert len(own) == len(plan.kept) + (len(plan.shared) if mode == "share" else 0)
    for name in own:
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.default.weight"
            assert torch.equal(snapshot["values"][key], fresh[key]), key
            assert not snapshot["has_state"][key], f"{key} kept its optimizer state"
    assert all(not snapshot["values"][f"{n}.lora_B.default.weight"].any() for n in own)


def test_restart_resets_the_classifier_head_to_the_base_models(tmp_path):
    callback, probe, model = _train(tmp_path, tiny_bert(), TokenDataset(n=40, task="classification"))
    head = next(m for m in model.modules() if isinstance(m, ModulesToSaveWrapper))
    head_name = next(n for n, m in model.named_modules() if m is head)
    for pname, original in head.original_module.named_parameters():
        key = f"{head_name}.modules_to_save.default.{pname}"
        assert torch.equal(probe.snapshot["values"][key], original), key
        assert not probe.snapshot["has_state"][key]
    assert callback.plan.step == SWITCH


def test_restart_starts_the_schedule_again_over_the_remaining_steps(tmp_path):
    _, probe, _ = _train(tmp_path, tiny_llama(), TokenDataset(n=40))
    base_lr = 5e-3

    def schedule(steps):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=WARMUP, num_training_steps=steps)
        lrs = []
        for _ in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return lrs

    expected = schedule(MAX_STEPS)[:SWITCH] + schedule(MAX_STEPS - SWITCH)
    assert probe.lrs == pytest.approx(expected, rel=1e-12, abs=0)


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("checkpoint", [2, 6], ids=["before-switch", "after-switch"])
def test_resume_with_restart_is_exact(tmp_path, checkpoint):
    full, full_probe, full_model = _train(tmp_path / "full", tiny_llama(), TokenDataset(n=40), save_steps=2)
    resumed, probe, model = _train(
        tmp_path / "resumed",
        tiny_llama(),
        TokenDataset(n=40),
        resume_from=str(tmp_path / "full" / "out" / f"checkpoint-{checkpoint}"),
    )
    assert resumed.plan == full.plan
    assert probe.lrs == full_probe.lrs[checkpoint:]
    expected, got = _lora(full_model), _lora(model)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_restart_refuses_what_it_cannot_make_fresh(tmp_path):
    trainer = Trainer(
        model=tiny_llama(init_lora_weights="pissa"),
        args=training_args(tmp_path, max_steps=8),
        train_dataset=TokenDataset(n=16),
        callbacks=[LoraDropCallback(restart=True, mode="share")],
    )
    with pytest.raises(ValueError, match="init_lora_weights"):
        trainer.train()
    model = tiny_llama()
    plateau = ReduceLROnPlateau(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        check_restartable(model, "default", plateau)
    with pytest.raises(ValueError, match="DoRA"):
        check_restartable(tiny_llama(use_dora=True), "default", None)
