"""The callback works unchanged in TRL's SFTTrainer, a Trainer subclass with its own data pipeline."""

import pytest
import torch
from helpers import SHARING, VOCAB, tiny_llama

from loradrop_trainer import LoraDropCallback, find_lora_layers

trl = pytest.importorskip("trl")


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def test_sft_trainer(tmp_path):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    texts = [
        " ".join(f"w{int(i)}" for i in torch.randint(2, VOCAB, (int(torch.randint(4, 12, ())),), generator=g))
        for _ in range(64)
    ]
    model = tiny_llama()
    callback = LoraDropCallback(alpha=0.2, **SHARING)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=10,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        max_length=32,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=_word_tokenizer(),
        callbacks=[callback],
    )
    trainer.train()
    assert callback.plan is not None and callback.plan.step == 2
    layers = find_lora_layers(model)
    for members in callback.plan.shared.values():
        assert len({id(layers[n].lora_B["default"].weight) for n in members}) == 1
    assert callback.lora_params_after < callback.lora_params_before
