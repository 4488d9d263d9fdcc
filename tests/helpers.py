"""Tiny random models built from configs, and small data sets, so every test runs offline on a CPU in seconds.

Tests import these from here (`tests` is on pytest's `pythonpath`); conftest.py holds only fixtures and the test Hub.
"""

from __future__ import annotations

import inspect
import os

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
    TrainingArguments,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 96
# The paper's method: dropped modules share one LoRA per kind, kept until 90% of the total importance. Tests of the
# tying, export and engines use it (a 4-layer model has too few modules per kind for a per-kind threshold to share
# any); the library's default is mode "truncate" (tests/test_truncate.py).
SHARING = {"normalize": "global", "mode": "share", "threshold": 0.9}


def tiny_llama(seed: int = 0, layers: int = 4, **lora_kwargs):
    """A Llama with grouped-query attention (q_proj and v_proj differ in shape) and LoRA on all seven kinds."""
    model = tiny_llama_base(seed, layers)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM", **lora_kwargs
    )
    return get_peft_model(model, lora)


def random_lora_b(model, seed: int = 1):
    """LoRA B starts at zero in PEFT; give it values so the LoRA term is not zero before any training."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return model


def tiny_llama_base(seed: int = 0, layers: int = 4, hidden: int = 32) -> LlamaForCausalLM:
    """The frozen model under `tiny_llama(seed)`: same seed, same weights. (bitsandbytes' CPU kernels need `hidden`
    to be a multiple of 64.)"""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def tiny_bert(seed: int = 0, layers: int = 3, **lora_kwargs):
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS", **lora_kwargs
    )
    return get_peft_model(tiny_bert_base(seed, layers), lora)


def tiny_bert_base(seed: int = 0, layers: int = 3) -> BertForSequenceClassification:
    """The frozen model under `tiny_bert(seed)`: same seed, same weights (the classifier head included)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


class TokenDataset(Dataset):
    """Random token sequences of varied length, right-padded, with causal-LM labels or class labels."""

    def __init__(self, n: int = 64, length: int = 16, seed: int = 0, task: str = "causal"):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            real = int(torch.randint(length // 2, length + 1, (), generator=g))
            ids = torch.randint(1, VOCAB, (length,), generator=g)
            ids[real:] = 0
            mask = (torch.arange(length) < real).long()
            if task == "causal":
                labels = ids.masked_fill(mask == 0, -100)
            else:
                labels = torch.tensor(int(ids[:real].float().mean() > VOCAB / 2))
            self.rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def lora_and_frozen_norms(model, batch) -> tuple[dict[str, float], dict[str, float]]:
    """Per LoRA module, over the batch's real tokens: the squared norm of its LoRA term (the layer's output minus its
    frozen layer's output) and of its frozen layer's output, in float64, from hooks on the whole LoRA layers."""
    from loradrop_trainer import find_lora_layers

    layers = find_lora_layers(model)
    lora, frozen = dict.fromkeys(layers, 0.0), dict.fromkeys(layers, 0.0)
    mask = batch["attention_mask"].unsqueeze(-1).double()

    def hook(name):
        def fn(module, args, out):
            base = module.base_layer(args[0]).double()
            lora[name] += float((((out.double() - base) * mask) ** 2).sum())
            frozen[name] += float(((base * mask) ** 2).sum())

        return fn

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    return lora, frozen


class EarliestIsBest(TrainerCallback):
    """Adds the metric `eval_earliness` (minus the step), so that with `metric_for_best_model="earliness"` and
    `greater_is_better=True` the first evaluated checkpoint is the best one, whatever the losses do."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_earliness"] = -state.global_step


# TrainingArguments under which, with EarliestIsBest among the callbacks, the Trainer ends by loading the checkpoint of
# the first evaluation (step 2): a best checkpoint from before a switch at any later step.
EARLIEST_IS_BEST = {
    "eval_strategy": "steps",
    "eval_steps": 2,
    "load_best_model_at_end": True,
    "metric_for_best_model": "earliness",
    "greater_is_better": True,
}


def training_args(tmp_path, args_class: type[TrainingArguments] = TrainingArguments, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        max_steps=20,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return args_class(**defaults)


# A fixed batch of token ids for comparing a model's logits with another's.
INPUTS = torch.randint(1, 90, (2, 12), generator=torch.Generator().manual_seed(7))


def model_logits(model, input_ids: torch.Tensor = INPUTS) -> torch.Tensor:
    """The model's logits on `input_ids`, in eval mode and without gradients."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def tree_bytes(root) -> dict[str, bytes]:
    """Every file below `root` by relative path, with its bytes: two trees are the same files when these are equal."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    """What the `loradrop` command printed on stderr, checked to be its one-line error (no traceback)."""
    err = capsys.readouterr().err
    assert err.startswith("loradrop: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def craft_compact(src, dst, *, manifest=None, config=None, tensors=None):
    """A copy of the compact adapter `src` at `dst` with its manifest, PEFT config or weights edited in place by the
    given functions (`tensors(weights, manifest)`), the checksum kept consistent: crafted input for the refusals."""
    import hashlib
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from hub_export.compact import MANIFEST_FILE, METADATA_VERSION_KEY, WEIGHTS_FILE

    out = Path(shutil.copytree(src, dst))
    data = json.loads((out / MANIFEST_FILE).read_text())
    if tensors is not None:
        weights = load_file(out / WEIGHTS_FILE)
        tensors(weights, data)
        save_file(weights, out / WEIGHTS_FILE, metadata={METADATA_VERSION_KEY: "1"})
        data["weights_sha256"] = hashlib.sha256((out / WEIGHTS_FILE).read_bytes()).hexdigest()
    if manifest is not None:
        manifest(data)
    (out / MANIFEST_FILE).write_text(json.dumps(data))
    if config is not None:
        peft_config = json.loads((out / "adapter_config.json").read_text())
        config(peft_config)
        (out / "adapter_config.json").write_text(json.dumps(peft_config))
    return out


def validate_card(card) -> None:
    """huggingface_hub's metadata check of a model card, against the test Hub. Releases before 2.1 post it to
    huggingface.co whatever the endpoint (unreachable here), so with those only the card's own parse is checked."""
    from huggingface_hub import ModelCard

    if "https://huggingface.co/api/validate-yaml" not in inspect.getsource(ModelCard.validate):
        card.validate()


class LoraDeltas(TrainerCallback):
    """The LoRA term `scaling * B @ A` of every module at the end of the switch step (placed before or after the
    LoRA-drop callback in the list, it sees the model before or after the switch)."""

    def __init__(self, step: int):
        self.step, self.deltas = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from loradrop_trainer import find_lora_layers

        if state.global_step == self.step:
            self.deltas = {
                name: (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
                .detach()
                .double()
                for name, layer in find_lora_layers(model).items()
            }


def assert_saved_adapter_reloads_exactly(model, directory):
    """Save `model` (a tiny Llama PeftModel) with its own `save_pretrained`, reload the directory in plain PEFT onto a
    fresh base, and check the logits are the model's bit for bit; return the reloaded model."""
    from peft import PeftModel

    batch = {key: torch.stack([row[key] for row in TokenDataset(n=4).rows]) for key in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(directory)
    reloaded = PeftModel.from_pretrained(tiny_llama_base(), directory).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
    return reloaded


def padded_batches(count: int = 3) -> list[dict]:
    """`count` batches of 6 token sequences, each holding padding (for scoring on real tokens only)."""
    from torch.utils.data import default_collate

    data = TokenDataset(n=6 * count, seed=3)
    batches = [default_collate([data[i] for i in range(k * 6, k * 6 + 6)]) for k in range(count)]
    assert all((b["attention_mask"] == 0).any() for b in batches), "the batches must hold padding"
    return batches


def record_training_batches(model) -> list[dict]:
    """The list that will hold a copy of every training forward's keyword inputs (the micro-batches the Trainer
    formed), filled by a forward pre-hook on `model`."""
    batches: list[dict] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: (
            batches.append({k: v.clone() for k, v in kwargs.items()}) if module.training else None
        ),
        with_kwargs=True,
    )
    return batches


def train_tiny_llama(tmp_path, callback, resume_from=None, save_steps=None):
    """Train a fresh tiny Llama 20 steps with `callback` (checkpoints every `save_steps`, resuming from `resume_from`
    when given); return the model."""
    from transformers import Trainer

    model = tiny_llama()
    args = training_args(
        tmp_path,
        max_steps=20,
        learning_rate=5e-3,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        warmup_steps=0,
    )
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=40), callbacks=[callback]).train(
        resume_from_checkpoint=resume_from
    )
    return model


def lora_state(model) -> dict[str, torch.Tensor]:
    """A copy of the model's LoRA weights, by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
