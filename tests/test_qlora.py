"""QLoRA: LoRA-drop on a 4-bit (bitsandbytes nf4) base, trained, resumed and exported like a plain one.

bitsandbytes' CPU backend runs 4-bit layers, forward and backward into LoRA (0.50.2 checked), so this runs on a CPU;
it is skipped where bitsandbytes is not installed (it is in the `dev` and `qlora` extras). The CPU kernels quantize in
blocks of 64 input features, so the tiny model is 64 wide.

The base is loaded the way QLoRA recipes load it, in bf16 with nf4 linear layers, then `prepare_model_for_kbit_training`
casts every non-quantized weight (embeddings, norms, head) to float32. Reloading the adapter gives the trained model's
logits only on a base prepared the same way: that is what the export checks do.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import LLAMA_TARGETS, SHARING, TokenDataset, tiny_llama_base, training_args
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, LlamaForCausalLM, Trainer, set_seed

from hub_export import expand_to_peft, load_compact, save_compact
from loradrop_trainer import LoraDropCallback, find_lora_layers

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")

MAX_STEPS = 12
SAVE_AT = 6  # after the switch (step 3)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama in fp32 on disk, which every 4-bit load quantizes the same way."""
    directory = tmp_path_factory.mktemp("base")
    tiny_llama_base(layers=3, hidden=64).save_pretrained(directory)
    return directory


def load_4bit_base(directory) -> LlamaForCausalLM:
    """The QLoRA base: nf4 linear layers in a bf16 model, then prepared for k-bit training (non-quantized -> fp32)."""
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    )
    model = LlamaForCausalLM.from_pretrained(
        directory, quantization_config=quantization, dtype=torch.bfloat16, device_map="cpu"
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _train(base_dir, out, resume_from=None):
    torch.manual_seed(0)
    model = get_peft_model(
        load_4bit_base(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    callback = LoraDropCallback(alpha=0.25, save_plot=False, **SHARING)
    args = training_args(out, max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_AT, warmup_steps=0)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=40), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, LoraDropCallback.of(trainer)


@pytest.fixture(scope="module")
def runs(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    full, callback = _train(base_dir, out / "full")
    resumed, resumed_callback = _train(base_dir, out / "resumed", out / "full" / "out" / f"checkpoint-{SAVE_AT}")
    return {"full": (full, callback), "resumed": (resumed, resumed_callback), "out": out}


def _all_4bit(layers: dict) -> bool:
    from peft.tuners.lora.bnb import Linear4bit  # imports bitsandbytes

    return all(isinstance(layer, Linear4bit) for layer in layers.values())


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_qlora_layers_are_scored_pruned_and_tied(runs):
    trainer, callback = runs["full"]
    layers = find_lora_layers(trainer.model)
    assert _all_4bit(layers)
    plan = callback.plan
    assert plan is not None and plan.step == 3 and 0 < len(plan.kept) < len(plan.kinds)
    for members in plan.shared.values():
        assert len({id(layers[name].lora_A["default"].weight) for name in members}) == 1
    assert callback.lora_params_after < callback.lora_params_before


def test_qlora_resume_after_the_switch_is_bit_identical(runs):
    (full, callback), (resumed, resumed_callback) = runs["full"], runs["resumed"]
    assert resumed_callback.plan == callback.plan
    full_lora, resumed_lora = _lora(full.model), _lora(resumed.model)
    assert full_lora.keys() == resumed_lora.keys()
    assert all(torch.equal(full_lora[name], resumed_lora[name]) for name in full_lora)


def test_qlora_compact_and_expanded_exports_load_onto_the_4bit_base_with_the_trained_logits(runs, base_dir):
    trainer, _ = runs["full"]
    ids = TokenDataset(n=4, seed=3)[0]["input_ids"][None].repeat(2, 1)
    trained = _logits(trainer.model, ids)
    compact = save_compact(trainer.model, runs["out"] / "compact")
    assert torch.equal(_logits(load_compact(load_4bit_base(base_dir), compact), ids), trained)
    expanded = expand_to_peft(compact, runs["out"] / "peft")
    assert torch.equal(_logits(PeftModel.from_pretrained(load_4bit_base(base_dir), expanded), ids), trained)


def test_recipe_trains_qlora_and_its_adapters_reload_onto_a_base_loaded_the_same_way(tmp_path):
    from recipes.llama2_gsm8k import load_base, main, parse_args, toy_model_and_tokenizer, toy_tokenizer

    out = tmp_path / "qlora"
    argv = ["--toy", "--load_in_4bit", "--output_dir", str(out), "--max_steps", "12", "--alpha", "0.25",
            "--threshold", "0.5", "--learning_rate", "5e-3", "--warmup_ratio", "0", "--per_device_train_batch_size",
            "4", "--max_eval_samples", "4", "--max_new_tokens", "4", "--save_steps", "0", "--seed", "0"]  # fmt: skip
    results = main(argv)
    assert results["plan"]["switch_step"] == 3 and results["lora_params_after"] < results["lora_params_before"]

    cfg = parse_args(argv)
    set_seed(cfg.seed)  # the recipe seeds before building the toy model: the same base weights again
    toy_model_and_tokenizer(cfg)[0].save_pretrained(tmp_path / "base")
    compact = load_compact(load_base(tmp_path / "base", cfg), out / "compact")
    plain = PeftModel.from_pretrained(load_base(tmp_path / "base", cfg), str(out))  # the Trainer's own save
    assert _all_4bit(find_lora_layers(compact))
    ids = torch.tensor([toy_tokenizer()("Question: Ann has 3 cats and buys 4 more. How many?")["input_ids"]])
    assert torch.equal(_logits(compact, ids), _logits(plain, ids))
