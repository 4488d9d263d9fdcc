"""`LoraDropCallback`: LoRA-drop inside any `transformers.Trainer` run, in one callback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from .config import LoraDropConfig
from .importance import ImportanceCollector
from .lora_layers import count_distinct, find_lora_layers, lora_kinds, lora_parameters
from .plan import MODEL_PLAN_ATTR, MODEL_PLAN_EXTRA_ATTR, DropPlan, NoImportanceError, build_plan
from .reparam import apply_plan, reinit_shared
from .report import PLOT_FILE, plot_importance, summary_table, write_plan

logger = logging.get_logger(__name__)


class LoraDropCallback(TrainerCallback, ExportableState):
    """Prune a PEFT LoRA adapter with LoRA-drop (arXiv 2402.07721) while the Trainer trains it.

    During the first `alpha` fraction of the optimizer steps, hooks measure how much each LoRA module changes its
    layer's output. At the end of step `ceil(alpha * max_steps)` the most important modules keep their own LoRA and
    the others share one LoRA per kind (same target name and shape); training then continues in the same run with
    fewer LoRA parameters. The plan is logged, written to the output directory with a bar chart, saved in every
    checkpoint, and re-applied when training resumes.

    ```python
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[LoraDropCallback(alpha=0.1)])
    trainer.train()
    ```

    Args:
        config: a [`LoraDropConfig`]; or pass its fields as keyword arguments instead.
    """

    def __init__(self, config: LoraDropConfig | None = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise TypeError("Pass either a LoraDropConfig or its fields as keyword arguments, not both.")
        self.config = config if config is not None else LoraDropConfig(**kwargs)
        self.plan: DropPlan | None = None
        self.lora_params_before: int | None = None
        self.lora_params_after: int | None = None
        self._layers: dict = {}
        self._collector: ImportanceCollector | None = None
        self._switch_step: int | None = None
        self._gave_up = False
        self._pending_logs: dict[str, float] = {}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs["model"]
        _check_training_setup(args, model)
        cfg = self.config
        self._layers = find_lora_layers(model, cfg.adapter_name, cfg.target, cfg.exclude)
        if state.max_steps <= 0:
            raise ValueError(
                "LoraDropCallback needs the number of optimizer steps to place the switch; set "
                "TrainingArguments(max_steps=...) when the training data has no length (an IterableDataset)."
            )
        self._switch_step = cfg.switch_step(state.max_steps)
        if self._switch_step >= state.max_steps:
            raise ValueError(
                f"alpha={cfg.alpha} puts the switch at step {self._switch_step} of {state.max_steps}: no training "
                "would be left after it. Lower alpha or train for more steps."
            )
        self.lora_params_before = count_distinct(
            [p for layer in self._layers.values() for p in lora_parameters(layer, cfg.adapter_name)]
        )

        saved = self._saved_state(state)
        if saved.get("plan") is not None:
            self.plan = DropPlan.from_dict(saved["plan"])
        self._gave_up = bool(saved.get("gave_up", False))
        if self.plan is not None:
            apply_plan(self._layers, self.plan)
            self.lora_params_after = self._count_after()
            self._attach_plan(model)
            logger.info(f"LoRA-drop: re-applied the plan of step {self.plan.step} ({len(self.plan.kept)} kept).")
            return
        if self._gave_up or state.global_step >= self._switch_step:
            return
        self._collector = ImportanceCollector(model, self._layers, cfg.adapter_name, cfg.score_every)
        self._collector.skip_forwards(state.global_step * args.gradient_accumulation_steps)
        if saved.get("totals") and args.process_index == 0:
            self._collector.load_totals(saved["totals"])
        logger.info(
            f"LoRA-drop: collecting importance of {len(self._layers)} LoRA modules until step {self._switch_step} "
            f"of {state.max_steps}."
        )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._collector is None:
            return
        if state.global_step >= self._switch_step:
            self._switch(args, state, control, kwargs["model"], kwargs.get("optimizer"))
        else:
            self._sum_before_save(args, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._collector is not None:
            self._sum_before_save(args, control)  # save_strategy="epoch" decides to save here, not in on_step_end

    def _sum_before_save(self, args: TrainingArguments, control: TrainerControl) -> None:
        """Before a checkpoint, sum every rank's importance into rank 0 (the others start again from zero).

        state() runs on the saving rank only and may not communicate, so the sum is taken here, where all ranks are.
        With save_strategy="best" the Trainer decides to save after evaluating, so any evaluation may be followed by
        a save. Summing early is harmless: the all-reduce at the switch adds the ranks' totals up again.
        """
        if control.should_save or (args.save_strategy == "best" and control.should_evaluate):
            self._collector.all_reduce(args.device)
            if args.process_index != 0:
                self._collector.zero()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if self._pending_logs and logs is not None:
            logs.update(self._pending_logs)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending_logs)
            self._pending_logs = {}

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._collector is not None:
            self._collector.remove()
            self._collector = None

    def state(self) -> dict:
        checkpoint = {
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "totals": self._collector.totals() if self._collector is not None else None,
            "gave_up": self._gave_up,
        }
        return {"args": self.config.to_dict(), "attributes": {"_checkpoint": checkpoint}}

    def _saved_state(self, state: TrainerState) -> dict:
        """What the checkpoint being resumed holds for this callback (empty for a fresh run)."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[-1] if saved else None
        return ((saved or {}).get("attributes") or {}).get("_checkpoint") or {}

    def _switch(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model, optimizer) -> None:
        cfg = self.config
        collector, self._collector = self._collector, None
        collector.all_reduce(args.device)
        totals = collector.totals()
        collector.remove()
        try:
            plan = self.make_plan(totals, lora_kinds(self._layers, cfg.adapter_name), state.global_step)
        except NoImportanceError as err:
            logger.warning(f"LoRA-drop: not pruning, the adapter stays plain LoRA. {err}")
            self._gave_up = True
            return
        apply_plan(self._layers, plan)
        if cfg.mode == "share" and cfg.shared_init == "fresh":
            reinit_shared(self._layers, plan, optimizer, seed=args.seed + state.global_step)
        self.plan = plan
        self.lora_params_after = self._count_after()
        self._attach_plan(model)
        logger.info(
            f"LoRA-drop plan at step {state.global_step}:\n"
            f"{summary_table(plan, self.lora_params_before, self.lora_params_after)}"
        )
        self._pending_logs = {
            "loradrop/kept_modules": len(plan.kept),
            "loradrop/lora_params": self.lora_params_after,
            "loradrop/lora_params_fraction": self.lora_params_after / self.lora_params_before,
        }
        control.should_log = True
        if state.is_world_process_zero:
            self._write_outputs(Path(cfg.output_dir or args.output_dir or "."))

    def make_plan(self, importance: dict[str, float], kinds: dict[str, str], step: int) -> DropPlan:
        """Choose the kept modules from the summed importance. Subclasses may choose otherwise (ablations do).

        Runs on every rank with the same all-reduced numbers, so it must be deterministic.
        """
        cfg = self.config
        return build_plan(
            importance,
            kinds,
            cfg.threshold,
            min_kept=cfg.min_kept,
            per_kind=cfg.normalize == "kind",
            mode=cfg.mode,
            adapter_name=cfg.adapter_name,
            step=step,
        )

    def _count_after(self) -> int:
        adapter = self.config.adapter_name
        dropped = set(self.plan.dropped) if self.plan.mode == "drop" else set()
        return count_distinct(
            [p for name, layer in self._layers.items() if name not in dropped for p in lora_parameters(layer, adapter)]
        )

    def _plan_extra(self) -> dict:
        """The run's facts that travel with the plan into its file, the exported adapter and its model card."""
        return {
            "config": self.config.to_dict(),
            "lora_params_before": self.lora_params_before,
            "lora_params_after": self.lora_params_after,
        }

    def _attach_plan(self, model) -> None:
        """Let exporters (hub_export.save_compact) find the plan on the model itself."""
        setattr(model, MODEL_PLAN_ATTR, self.plan)
        setattr(model, MODEL_PLAN_EXTRA_ATTR, self._plan_extra())

    def _write_outputs(self, directory: Path) -> None:
        path = write_plan(self.plan, directory, self._plan_extra())
        logger.info(f"LoRA-drop: plan written to {path}")
        if self.config.save_plot:
            logger.info(f"LoRA-drop: importance chart written to {plot_importance(self.plan, directory / PLOT_FILE)}")


def _check_training_setup(args: TrainingArguments, model) -> None:
    """Refuse, before the first step, the set-ups whose parameter handling the tying scheme does not survive."""
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError(
            "LoraDropCallback does not support FSDP: sharded parameters cannot be tied in place. Use DDP or "
            "DeepSpeed ZeRO-1/2 (TrainingArguments(deepspeed='recipes/ds_zero2.json'))."
        )
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "LoraDropCallback does not support DeepSpeed ZeRO-3: it partitions each parameter across ranks, so "
            "modules cannot be tied to one another's LoRA in place. Use ZeRO-2 (recipes/ds_zero2.json); LoRA's "
            "trainable parameters are small enough that ZeRO-2 saves nearly as much memory."
        )
    if args.world_size > 1 and not args.deepspeed:
        find_unused = args.ddp_find_unused_parameters
        if find_unused is None and isinstance(model, PreTrainedModel):
            find_unused = not (model.is_activation_checkpointing or args.activation_checkpointing)
        if find_unused is False:
            raise ValueError(
                "LoraDropCallback under DDP needs find_unused_parameters=True: after the switch, the Parameters the "
                "shared modules used to own get no gradient. Set TrainingArguments(ddp_find_unused_parameters=True)."
            )
