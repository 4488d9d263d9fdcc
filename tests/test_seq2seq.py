"""Encoder-decoder models: each stack's modules are their own kinds, so a shared LoRA never spans both stacks."""

import pytest
import torch
from helpers import VOCAB, TokenDataset, training_args
from peft import LoraConfig, get_peft_model
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
)

from loradrop_trainer import LoraDropCallback, find_lora_layers, lora_kinds


def tiny_t5():
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=4,
        pad_token_id=0, decoder_start_token_id=0,
    )  # fmt: skip
    targets = ["q", "k", "v", "o", "wi", "wo"]
    return get_peft_model(T5ForConditionalGeneration(config), LoraConfig(r=4, target_modules=targets))


def tiny_bart():
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=0, decoder_start_token_id=2,
    )  # fmt: skip
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    return get_peft_model(BartForConditionalGeneration(config), LoraConfig(r=4, target_modules=targets))


def _stack(name: str) -> str:
    return "encoder" if ".encoder." in name else "decoder"


@pytest.mark.parametrize("make_model", [tiny_t5, tiny_bart], ids=["t5", "bart"])
def test_kinds_never_mix_encoder_and_decoder(make_model):
    kinds = lora_kinds(find_lora_layers(make_model()))
    for kind in set(kinds.values()):
        assert len({_stack(name) for name, k in kinds.items() if k == kind}) == 1, kind
    assert {k.split(".")[0] for k in kinds.values()} == {"encoder", "decoder"}


def test_seq2seq_trainer_run_shares_within_each_stack(tmp_path):
    model = tiny_t5()
    callback = LoraDropCallback(alpha=0.25, threshold=0.6, mode="share")
    args = training_args(tmp_path, Seq2SeqTrainingArguments)
    Seq2SeqTrainer(model=model, args=args, train_dataset=TokenDataset(task="causal"), callbacks=[callback]).train()
    plan = callback.plan
    assert plan is not None and plan.shared
    for members in plan.shared.values():
        assert len({_stack(name) for name in members}) == 1
    layers = find_lora_layers(model)
    for members in plan.shared.values():
        assert len({id(layers[name].lora_A["default"].weight) for name in members}) == 1
