"""Bad set-ups fail before the first step, with a message that says what to do."""

from types import SimpleNamespace

import pytest
import torch
from helpers import TokenDataset, tiny_llama, tiny_llama_base, training_args
from peft import LoraConfig, get_peft_model
from transformers import Trainer

from loradrop_trainer import LoraDropCallback
from loradrop_trainer.callback import _check_training_setup


class FailOnStep(LoraDropCallback):
    """Fails the test if training got as far as a step: errors must come earlier."""

    def on_step_begin(self, *args, **kwargs):
        raise AssertionError("training started before the error was raised")


def _train(tmp_path, model, **args):
    trainer = Trainer(
        model=model, args=training_args(tmp_path, **args), train_dataset=TokenDataset(), callbacks=[FailOnStep()]
    )
    trainer.train()


def test_model_without_lora(tmp_path):
    with pytest.raises(ValueError, match=r"no PEFT LoRA modules.*get_peft_model"):
        _train(tmp_path, tiny_llama_base())


def test_wrong_adapter_name(tmp_path):
    model = tiny_llama()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=TokenDataset(),
        callbacks=[LoraDropCallback(adapter_name="other")],
    )
    with pytest.raises(ValueError, match=r"adapter 'other'.*\['default'\]"):
        trainer.train()


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_21_8_trained_biases_are_refused_before_the_first_step(tmp_path, bias):
    """Issue 21, item 8: bias="lora_only" used to train to the end, then both exports refused it as a crafted file."""
    model = get_peft_model(tiny_llama_base(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias=bias))
    with pytest.raises(ValueError, match=rf"bias={bias!r}.*Train with bias='none'"):
        _train(tmp_path, model)


def test_dora_is_refused(tmp_path):
    model = get_peft_model(tiny_llama_base(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        _train(tmp_path, model)


def test_embedding_lora_is_refused_unless_excluded(tmp_path):
    model = get_peft_model(tiny_llama_base(), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match=r"embed_tokens.*exclude"):
        _train(tmp_path, model)
    callback = LoraDropCallback(exclude=["embed_tokens"], alpha=0.2)
    Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(), callbacks=[callback]).train()
    assert callback.plan is not None and not any("embed" in n for n in callback.plan.kinds)


def test_switch_at_the_last_step(tmp_path):
    trainer = Trainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=10),
        train_dataset=TokenDataset(),
        callbacks=[LoraDropCallback(alpha=0.95)],
    )
    with pytest.raises(ValueError, match=r"step 10 of 10.*Lower alpha"):
        trainer.train()


def test_iterable_dataset_without_max_steps(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from TokenDataset().rows

    with pytest.raises(ValueError, match="max_steps"):
        Trainer(
            model=tiny_llama(),
            args=training_args(tmp_path, max_steps=-1),
            train_dataset=Stream(),
            callbacks=[LoraDropCallback()],
        ).train()


def _args(**kw):
    base = dict(
        fsdp=None,
        fsdp_config={},
        world_size=1,
        deepspeed=None,
        ddp_find_unused_parameters=None,
        activation_checkpointing=False,
    )
    return SimpleNamespace(**{**base, **kw})


def test_fsdp1_is_refused_and_fsdp2_is_not():
    """FSDP1 flattens Parameters, which neither tying scheme survives; FSDP2 (the Trainer's default) is supported."""
    with pytest.raises(ValueError, match=r"FSDP1.*FSDP2"):
        _check_training_setup(_args(fsdp=["full_shard"], fsdp_config={"version": 1}, world_size=2), tiny_llama())
    _check_training_setup(_args(fsdp=["full_shard"], fsdp_config={"version": 2}, world_size=2), tiny_llama())


def test_ddp_without_find_unused_parameters_is_refused():
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True"):
        _check_training_setup(_args(world_size=2, ddp_find_unused_parameters=False), tiny_llama())
    _check_training_setup(_args(world_size=2), tiny_llama())


def test_lora_bias_is_refused(tmp_path):
    model = get_peft_model(tiny_llama_base(), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(ValueError, match="lora_bias"):
        _train(tmp_path, model)
