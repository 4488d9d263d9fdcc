"""`LoraDropCallback`: LoRA-drop inside any `transformers.Trainer` run, in one callback."""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .config import LoraDropConfig
from .grad_tying import GradientTying
from .importance import ImportanceCollector
from .lora_layers import count_distinct, find_lora_layers, lora_kinds, lora_parameters, lora_shape
from .modes import mode_of
from .plan import DropPlan, NoImportanceError, attach_plan, attached_plan, build_plan, coverage_warning, detach_plan
from .reparam import UntiedLora, reparameterise, untied_before_plan
from .report import PLAN_FILE, PLOT_FILE, plan_settings, plot_importance, summary_table, write_plan
from .restart import check_restartable, restart_adapter, restart_schedule, scheduler_step
from .saved_form import saved_form, unfold_restored
from .sharding import check_fsdp_version, parameter_engine
from .stability import StabilityTracker

logger = logging.get_logger(__name__)

# Settings that do not change what the plan is or how it is applied: a resume may change them without a warning.
_OUTPUT_SETTINGS = ("output_dir", "save_plot")
# Settings that say what collected importance measures: totals collected under others cannot be added to.
_MEASURE_SETTINGS = ("score", "aggregate")


@dataclass
class _Outcome:
    """What a run tells the caller. A callback the Trainer restores from a checkpoint shares the outcome of the
    instance the caller handed to the Trainer, so `callback.plan` holds whichever instance did the work."""

    plan: DropPlan | None = None
    lora_params_before: int | None = None
    lora_params_after: int | None = None


# The callback each model's Trainer was built with (recorded in `on_init_end`), for restored copies to report to.
_HANDED_TO_TRAINER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LoraDropCallback(TrainerCallback, ExportableState):
    """Prune a PEFT LoRA adapter with LoRA-drop (arXiv 2402.07721) while the Trainer trains it.

    During the first `alpha` fraction of the optimizer steps, hooks measure how much each LoRA module changes its
    layer's output. At the end of step `ceil(alpha * max_steps)` the most important modules keep their LoRA and the
    others are cut to a lower rank by SVD (the default, `mode="truncate"`) or share one LoRA per kind (`mode="share"`,
    the paper's); training then continues in the same run with fewer LoRA parameters. The plan is logged, written to
    the output directory with a bar chart, saved in every checkpoint, and re-applied when training resumes.

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
        self._outcome = _Outcome()
        self._reset()

    @property
    def plan(self) -> DropPlan | None:
        """The `DropPlan` after the switch; None before it, and when nothing could be pruned."""
        return self._outcome.plan

    @property
    def lora_params_before(self) -> int | None:
        """Distinct LoRA parameters the adapter had when training began."""
        return self._outcome.lora_params_before

    @property
    def lora_params_after(self) -> int | None:
        """Distinct LoRA parameters left after the switch (tied Parameters count once)."""
        return self._outcome.lora_params_after

    @classmethod
    def of(cls, trainer: Any) -> LoraDropCallback:
        """The instance of this callback that `trainer` runs (the restored copy, after a restoring resume)."""
        found = [callback for callback in trainer.callback_handler.callbacks if isinstance(callback, cls)]
        if len(found) != 1:
            raise ValueError(f"The trainer runs {len(found)} {cls.__name__} instances; expected exactly one.")
        return found[0]

    def _reset(self) -> None:
        """Forget everything about a previous run: a callback reused for another `train()` starts fresh."""
        self._outcome.plan = self._outcome.lora_params_before = self._outcome.lora_params_after = None
        self._plan_config: dict[str, Any] | None = None
        self._layers: dict = {}
        self._untied: UntiedLora | None = None
        self._tying: GradientTying | None = None
        self._collector: ImportanceCollector | None = None
        self._switch_step: int | None = None
        self._tracker: StabilityTracker | None = None
        self._schedule_restart: dict[str, int] | None = None
        self._gave_up = False
        self._pending_logs: dict[str, float] = {}

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if kwargs.get("model") is not None:
            _HANDED_TO_TRAINER[kwargs["model"]] = weakref.ref(self)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs["model"]
        original = _HANDED_TO_TRAINER.get(model, lambda: None)()
        if "_checkpoint" in self.__dict__ and isinstance(original, LoraDropCallback) and original is not self:
            self._outcome = original._outcome  # the Trainer restored this copy; report to the caller's instance
        self._reset()
        _check_training_setup(args, model)
        _anchor_base_path(_peft_config(model, self.config.adapter_name))
        if self.config.restart:
            check_restartable(model, self.config.adapter_name, kwargs.get("lr_scheduler"))
        previous, _ = attached_plan(model)
        if state.global_step == 0 and previous is not None:
            raise ValueError(
                f"This model was already re-parameterised by LoRA-drop (plan of step {previous.step}, mode "
                f"{previous.mode!r}). Start the new run from a freshly wrapped PEFT model."
            )
        cfg = self.config
        self._select_layers(model, cfg.adapter_name, cfg.target, cfg.exclude)
        _check_adapter_trains(model, self._layers, cfg.adapter_name)
        mode_of(cfg.mode).check_layers(self._layers, cfg)
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
        if state.global_step == 0:
            _check_collection_spans_updates(cfg, self._switch_step, state.max_steps, kwargs.get("lr_scheduler"))

        # At step 0 the Trainer's record of this callback is this instance's own state (of a previous run, if any).
        saved = self._saved_state(state) if state.global_step > 0 else {}
        if saved.get("plan") is None and previous is not None and state.global_step > 0:
            raise ValueError(
                f"Resuming at step {state.global_step} from a checkpoint saved before the LoRA-drop switch, into a "
                "model that an earlier train() in this process already re-parameterised (plan of step "
                f"{previous.step}, mode {previous.mode!r}): the checkpoint's weights would not mean what they meant. "
                "Build the PEFT model afresh (get_peft_model on a freshly loaded base model) and resume with it."
            )
        if saved.get("plan") is None:
            saved = self._drop_other_measure(saved, state)
        if saved.get("plan") is not None:
            self._resume_after_switch(saved, model, args, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))
            return
        self._gave_up = bool(saved.get("gave_up", False))
        if self._gave_up:
            return
        if state.global_step >= self._switch_step and not saved.get("totals"):
            raise ValueError(
                f"Resuming at step {state.global_step}, at or past the switch (step {self._switch_step} with "
                f"alpha={cfg.alpha} and max_steps={state.max_steps}), from a checkpoint with no LoRA-drop importance "
                "(it was saved without LoraDropCallback): there is nothing to choose the kept modules by. Resume from "
                "a checkpoint of a run with the callback, or raise alpha so that the switch comes after the resumed "
                "step."
            )
        self._collector = ImportanceCollector(
            model, self._layers, cfg.adapter_name, cfg.score_every, cfg.score, cfg.aggregate, self._needs_grams()
        )
        if cfg.auto:
            self._tracker = StabilityTracker(cfg.auto_patience, cfg.auto_min_tau, cfg.auto_min_overlap)
            self._tracker.load_state_dict(saved.get("stability") or {})
        self._collector.skip_forwards(state.global_step * args.gradient_accumulation_steps)
        if saved.get("totals") and args.process_index == 0:
            self._collector.load_totals(saved["totals"], saved.get("skipped"), saved.get("scored"), saved.get("grams"))
        if state.global_step >= self._switch_step:
            logger.warning(
                f"LoRA-drop: resumed at step {state.global_step}, at or past the switch that alpha={cfg.alpha} and "
                f"max_steps={state.max_steps} now place at step {self._switch_step}: switching now, with the "
                f"importance collected up to step {state.global_step}."
            )
            self._switch(args, state, control, model, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))
            return
        logger.info(
            f"LoRA-drop: collecting importance of {len(self._layers)} LoRA modules until step {self._switch_step} "
            f"of {state.max_steps}."
        )

    def _select_layers(self, model, adapter_name: str, target: list[str] | None, exclude: list[str] | None) -> None:
        """Take the LoRA layers that `target` and `exclude` choose: what the run prunes, its parameter count before
        the switch, and their state before any plan (to undo one)."""
        self._layers = find_lora_layers(model, adapter_name, target, exclude)
        self._untied = untied_before_plan(model, self._layers, adapter_name)
        params = [p for layer in self._layers.values() for p in lora_parameters(layer, adapter_name)]
        self._outcome.lora_params_before = count_distinct(self._untied.parameters if self._untied else params)

    def _resume_after_switch(self, saved: dict, model, args: TrainingArguments, optimizer, scheduler) -> None:
        """Re-apply the checkpoint's plan, under the settings it was made with, whatever the settings are now."""
        self._outcome.plan = DropPlan.from_dict(saved["plan"])
        self._plan_config = saved.get("plan_config") or self.config.to_dict()
        changed = {
            key: (value, self._plan_config.get(key))
            for key, value in self.config.to_dict().items()
            if key not in _OUTPUT_SETTINGS and value != self._plan_config.get(key)
        }
        if changed:
            listed = ", ".join(f"{key}={now!r} (plan: {then!r})" for key, (now, then) in changed.items())
            logger.warning(
                f"LoRA-drop: the checkpoint's plan (step {self.plan.step}) was made with other settings than this "
                f"run's: {listed}. The saved plan is re-applied and its settings are the ones recorded; start a new "
                "run to prune with the new settings."
            )
        if any(key in changed for key in ("target", "exclude")):  # the plan's modules, as its settings chose them
            planned = self._plan_config
            self._select_layers(model, self.plan.adapter_name, planned.get("target"), planned.get("exclude"))
        if self._untied is None and args.load_best_model_at_end:
            raise ValueError(
                f"Resuming past the LoRA-drop switch into a model that was already re-parameterised (plan of step "
                f"{self.plan.step}) without its state from before the plan, with load_best_model_at_end=True: a best "
                "checkpoint from before the switch could not be restored as the plain LoRA it is. Build the PEFT "
                "model afresh (get_peft_model on a freshly loaded base model) and resume with it."
            )
        self._tying = reparameterise(
            self._layers, self.plan, optimizer, at_switch=False, dropped_scaling=self._dropped_scaling()
        )
        unfold_restored(self._layers, self.plan, saved.get("saved_form"), "the checkpoint being resumed")
        self._record_in_config(model)
        self._schedule_restart = saved.get("schedule_restart")
        if self._schedule_restart is not None:
            restart_schedule(scheduler, args, **self._schedule_restart)
        self._outcome.lora_params_after = self._count_after()
        self._attach_plan(model)
        logger.info(f"LoRA-drop: re-applied the plan of step {self.plan.step} ({len(self.plan.kept)} kept).")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._collector is None:
            return
        if self._window_is_stable(args, state) or state.global_step >= self._switch_step:
            self._switch(args, state, control, kwargs["model"], kwargs.get("optimizer"), kwargs.get("lr_scheduler"))
        else:
            self._sum_before_save(args, control)

    def _window_is_stable(self, args: TrainingArguments, state: TrainerState) -> bool:
        """alpha="auto": at the end of each scoring window, whether the plan has stopped changing.

        Every rank decides on the same all-reduced totals (rank 0 keeps their sum, as before a save), so all switch
        at the same step.
        """
        if self._tracker is None or state.global_step % self.config.window_steps(state.max_steps):
            return False
        self._collector.all_reduce(args.device)
        totals = self._importance(self._collector)
        if args.process_index != 0:
            self._collector.zero()
        try:
            kept = self.make_plan(totals, lora_kinds(self._layers, self.config.adapter_name), state.global_step).kept
        except NoImportanceError:
            kept = None
        return self._tracker.update(state.global_step, totals, kept)

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

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Put the plan into the checkpoint next to its adapter, so `loradrop compact checkpoint-N` finds it."""
        if self.plan is not None and state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if checkpoint.is_dir():
                write_plan(self.plan, checkpoint, self._plan_extra())

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._collector is not None:
            self._collector.remove()
            self._collector = None
        if self._tying is not None:
            self._tying.remove()
            self._tying = None
        best_step = state.best_global_step if args.load_best_model_at_end and state.best_model_checkpoint else None
        if self.plan is not None and best_step is not None and best_step < self.plan.step:
            self._restore_untied(kwargs["model"], state.best_model_checkpoint)
        elif self.plan is not None and best_step is not None:  # the Trainer loaded a checkpoint after the switch
            self._unfold_best(state.best_model_checkpoint)

    def _unfold_best(self, checkpoint: str) -> None:
        """`load_best_model_at_end` loaded `checkpoint`: undo the fold if it came from the adapter file (`saved_form`),
        told by the record in that checkpoint's own callback state."""
        from transformers.trainer import TRAINER_STATE_NAME

        best = self._saved_state(TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME)))
        unfold_restored(self._layers, self.plan, best.get("saved_form"), checkpoint)

    def _restore_untied(self, model, checkpoint: str) -> None:
        """The Trainer loaded a checkpoint from before the switch into the re-parameterised model; make the model that
        checkpoint's plain LoRA again.

        Replicated LoRA (one process, DDP, ZeRO-1/2) was tied in place, so each shared group kept whichever member's
        weights the load wrote last: every module gets its own LoRA back and PEFT loads the checkpoint again. Sharded
        LoRA (ZeRO-3, FSDP2) was gradient-tied: every member kept its own Parameters, which the engine's own load of
        the checkpoint already filled; only the dropped modules are switched on again.
        """
        self._untied.restore()
        config = _peft_config(model, self.plan.adapter_name)
        if config is not None:
            mode_of(self.plan.mode).forget(model, config, self.plan, self._dropped_scaling())
        if self._untied.reload_needed:
            model.load_adapter(checkpoint, adapter_name=self.config.adapter_name, is_trainable=True)
        detach_plan(model, restored_from=checkpoint)
        logger.warning(
            f"LoRA-drop: the best checkpoint ({checkpoint}) predates the LoRA-drop switch (step {self.plan.step}); "
            "the model is back to plain LoRA with that checkpoint's weights, and carries no plan. Export it with "
            "trainer.save_model(); `callback.plan` describes the pruned model that was not kept."
        )

    def state(self) -> dict:
        collector = self._collector
        checkpoint = {
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "plan_config": self._plan_config,
            "totals": collector.totals() if collector is not None else None,
            "skipped": collector.skipped() if collector is not None else None,
            "scored": collector.scored() if collector is not None else None,
            "grams": collector.grams() if collector is not None else None,
            "stability": self._tracker.state_dict() if self._tracker is not None and collector is not None else None,
            "schedule_restart": self._schedule_restart,
            "gave_up": self._gave_up,
            "saved_form": saved_form(self._layers, self.plan) if self.plan is not None else None,
        }
        return {"args": self.config.to_dict(), "attributes": {"_checkpoint": checkpoint}}

    def _saved_state(self, state: TrainerState) -> dict:
        """What the checkpoint being resumed holds for this callback (empty for a fresh run), with the settings it
        was saved under as `"settings"`."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[-1] if saved else None
        checkpoint = dict(((saved or {}).get("attributes") or {}).get("_checkpoint") or {})
        return {**checkpoint, "settings": (saved or {}).get("args") or {}} if checkpoint else {}

    def _drop_other_measure(self, saved: dict, state: TrainerState) -> dict:
        """Before the switch, importance collected under another `score` or `aggregate` measures something else: it
        is left out (the collection starts again at the resumed step), never added to this run's. So is importance
        saved without the token Grams this run needs (`truncation="activation"` after a run that summed none)."""
        changed = [
            f"{key}={saved['settings'][key]!r} (now {getattr(self.config, key)!r})"
            for key in _MEASURE_SETTINGS
            if key in saved.get("settings", {}) and saved["settings"][key] != getattr(self.config, key)
        ]
        if self._needs_grams() and saved.get("totals") and not saved.get("grams"):
            changed.append(f"no token Grams (now truncation={self.config.truncation!r})")
        if not saved.get("totals") or not changed:
            return saved
        if state.global_step >= self._switch_step:
            raise ValueError(
                f"Resuming at step {state.global_step}, at or past the switch (step {self._switch_step}), from a "
                f"checkpoint whose importance was measured with {', '.join(changed)}: the plan would rest on another "
                "measure than this run's, and there are no steps left to measure again. Resume with the checkpoint's "
                "settings, or from a checkpoint before the switch."
            )
        logger.warning(
            f"LoRA-drop: the checkpoint's importance was measured with {', '.join(changed)}; it is left out and the "
            f"collection starts again at step {state.global_step} (the switch stays at step {self._switch_step})."
        )
        measured = ("totals", "skipped", "scored", "grams", "stability")
        return {key: value for key, value in saved.items() if key not in measured}

    def _switch(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model, optimizer, scheduler
    ) -> None:
        cfg = self.config
        collector, self._collector = self._collector, None
        collector.all_reduce(args.device)
        totals, skipped, scored = self._importance(collector), collector.skipped(), collector.scored()
        input_grams = collector.input_grams() if cfg.truncation == "activation" else None
        collector.remove()
        if skipped:
            worst = max(skipped, key=skipped.get)
            logger.warning(
                f"LoRA-drop: left out {sum(skipped.values())} importance scores that were not finite, in "
                f"{len(skipped)} modules (most in {worst}: {skipped[worst]}); the plan uses the finite ones. Check "
                "for overflowing activations (fp16) if this happens often."
            )
        try:
            plan = self.make_plan(totals, lora_kinds(self._layers, cfg.adapter_name), state.global_step)
        except NoImportanceError as err:
            zero = all(value == 0 for value in totals.values())
            logger.warning(_not_pruning(err, args, state) if zero else f"LoRA-drop: not pruning. {err}")
            self._gave_up = True
            return
        plan.scored = scored
        if self._tracker is not None:
            plan.stability = self._tracker.history
        fresh_seed = args.seed + state.global_step if cfg.shared_init == "fresh" and not cfg.restart else None
        self._tying = reparameterise(
            self._layers,
            plan,
            optimizer,
            at_switch=True,
            fresh_seed=fresh_seed,
            dropped_scaling=cfg.dropped_scaling,
            input_grams=input_grams,
        )
        self._outcome.plan = plan
        self._record_in_config(model)
        if cfg.restart:
            restart_adapter(model, plan, optimizer, seed=args.seed + state.global_step)
            self._schedule_restart = {"offset": scheduler_step(scheduler), "remaining": state.max_steps - plan.step}
            restart_schedule(scheduler, args, **self._schedule_restart)
        self._plan_config = cfg.to_dict()
        self._outcome.lora_params_after = self._count_after()
        self._attach_plan(model)
        if state.is_world_process_zero:
            table = summary_table(plan, self.lora_params_before, self.lora_params_after)
            _show(
                args, f"LoRA-drop plan at step {state.global_step}:\n{table}\n{plan_settings(plan, self._plan_config)}"
            )
            if self._tracker is not None:
                why = "the plan was stable" if self._tracker.settled else "max_alpha reached"
                _show(args, f"LoRA-drop: alpha='auto' switched ({why}); scoring windows:\n{self._tracker.describe()}")
            warning = coverage_warning(plan)
            if warning:
                logger.warning(warning)
        self._pending_logs = {
            "loradrop/kept_modules": len(plan.kept),
            "loradrop/lora_params": self.lora_params_after,
            "loradrop/lora_params_fraction": self.lora_params_after / self.lora_params_before,
            "loradrop/switch_step": plan.step,
        }
        control.should_log = True
        if state.is_world_process_zero:
            self._write_outputs(args, Path(cfg.output_dir or args.output_dir or "."))

    def _importance(self, collector: ImportanceCollector) -> dict[str, float]:
        """The summed importance the plan is made from (after `all_reduce`; every rank calls it): the collector's
        totals, or with score="residual" what truncation to `dropped_rank` would take from each module's output."""
        cfg = self.config
        if cfg.score != "residual":
            return collector.totals()
        activation = cfg.truncation == "activation"
        return collector.residual_totals(self._layers, cfg.adapter_name, cfg.dropped_rank, activation)

    def _needs_grams(self) -> bool:
        """Whether the collection sums token Grams: score "residual" reads them, truncation "activation" cuts by
        them."""
        return self.config.score == "residual" or self.config.truncation == "activation"

    def _record_in_config(self, model) -> None:
        """Let the plan's mode record in the PEFT config what the config would not say of the applied plan (mode
        "truncate": how the truncated modules are scaled, written folded into lora_B by `save_pretrained`, which
        every engine reads: `saved_form`)."""
        config = _peft_config(model, self.plan.adapter_name)
        if config is not None:
            mode_of(self.plan.mode).record(model, config, self._layers, self.plan, self._dropped_scaling())

    def _dropped_scaling(self) -> str:
        """The `dropped_scaling` the plan is applied with: the settings it was made under (a checkpoint's, when
        resuming; checkpoints written before the setting existed used "rank"), else this run's."""
        settings = self._plan_config if self._plan_config is not None else self.config.to_dict()
        return settings.get("dropped_scaling", "rank")

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
            normalize=cfg.normalize,
            mode=cfg.mode,
            dropped_rank=cfg.dropped_rank,
            adapter_name=cfg.adapter_name,
            step=step,
        )

    def _count_after(self) -> int:
        """The LoRA of the plan's owners (kept modules, and in mode "share" one per group: tied in place, or
        gradient-tied copies), and each truncated module's rank-k part (the rest of its Parameters is a zero block)."""
        plan = self.plan
        owned = [p for name in plan.owners for p in lora_parameters(self._layers[name], plan.adapter_name)]
        shapes = [lora_shape(self._layers[name], plan.adapter_name) for name in plan.truncated]
        return count_distinct(owned) + sum(
            plan.dropped_rank * (in_features + out_features) for in_features, _, out_features in shapes
        )

    def _plan_extra(self) -> dict:
        """The run's facts that travel with the plan into its file, the exported adapter and its model card."""
        return {
            "config": self._plan_config,
            "lora_params_before": self.lora_params_before,
            "lora_params_after": self.lora_params_after,
        }

    def _attach_plan(self, model) -> None:
        """Let exporters (hub_export.save_compact) find the plan on the model itself."""
        attach_plan(model, self.plan, self._plan_extra())

    def _write_outputs(self, args: TrainingArguments, directory: Path) -> None:
        """Write the plan file and the chart, and say where, next to the plan on the console."""
        written = [f"plan written to {write_plan(self.plan, directory, self._plan_extra())}"]
        if self.config.save_plot:
            chart = plot_importance(self.plan, directory / PLOT_FILE, self._plan_config)
            written.append(f"importance chart written to {chart}")
        _show(args, f"LoRA-drop: {'; '.join(written)}")


def _peft_config(model, adapter_name: str) -> object | None:
    """The PEFT config of `adapter_name` on `model` (None for a model PEFT did not wrap)."""
    return getattr(model, "peft_config", {}).get(adapter_name)


def _anchor_base_path(config: object | None) -> None:
    """Record a base model loaded from a relative directory by its absolute path, in the PEFT config the adapter and
    its checkpoints are saved with: PEFT keeps the path as given, which read from anywhere but where this script runs
    names nothing (and "models/base" would pass for a Hub id)."""
    name = getattr(config, "base_model_name_or_path", None)
    if isinstance(name, str) and name and not os.path.isabs(name) and os.path.isdir(name):
        config.base_model_name_or_path = os.path.abspath(name)


def _show(args: TrainingArguments, text: str) -> None:
    """Put `text` on the console the way the Trainer shows its logs: above the progress bar, or printed when the bar
    is off. Logging would hide it, since scripts run the `transformers` loggers at WARNING or INFO on other names."""
    if args.disable_tqdm:
        print(text)
    else:
        tqdm.write(text)


def _check_collection_spans_updates(cfg: LoraDropConfig, switch_step: int, max_steps: int, scheduler) -> None:
    """Refuse, before the first step, a switch that comes before any optimizer update can have changed LoRA.

    Importance is measured in the forwards of the steps up to the switch, and the forwards of step s see the weights
    after s - 1 updates. PEFT starts every LoRA's B at zero, so the forwards before the first update that moves it
    score zero everywhere: the switch must come at step 2 or later, at step 3 when the first update has learning
    rate 0 (a warm-up starts there).
    """
    first_lr = getattr(scheduler, "get_last_lr", lambda: None)()  # the first update's: the schedule is at step 0
    warm_up = bool(first_lr) and not any(lr > 0 for lr in first_lr)
    earliest = 3 if warm_up else 2
    if switch_step >= earliest:
        return
    name, fraction = ("max_alpha", cfg.max_alpha) if cfg.auto else ("alpha", cfg.alpha)
    wanted = math.ceil(earliest / max_steps * 100) / 100
    options = [f"raise {name} to {wanted}"] if earliest < max_steps and wanted < 1 else []
    options.append(f"train for at least {cfg.steps_for_switch_at(earliest)} steps")
    if warm_up:
        options.append("start without a warm-up (warmup_steps=0)")
    raise ValueError(
        f"LoraDropCallback: {name}={fraction} of max_steps={max_steps} puts the switch at the end of step "
        f"{switch_step}, before any optimizer update{' with a learning rate above 0' if warm_up else ''} has changed "
        "LoRA: importance is measured in the forwards up to the switch, PEFT starts every LoRA's B at zero, and the "
        f"first update{' (at learning rate 0, where a warm-up starts)' if warm_up else ''} comes at the end of step 1, "
        "so every module would score zero and nothing could be pruned. The collection must span at least one such "
        f"update (a switch at step {earliest} or later): {', or '.join(options)}."
    )


def _not_pruning(err: Exception, args: TrainingArguments, state: TrainerState) -> str:
    """The warning for a switch at which every module scored zero: what that means and what to do next."""
    warmup = args.get_warmup_steps(state.max_steps)
    return (
        f"LoRA-drop: not pruning at step {state.global_step}; the adapter stays plain LoRA and no {PLAN_FILE} is "
        f"written (trainer.save_model() writes a plain PEFT adapter, with nothing to compact). {err} The "
        f"{state.global_step - 1} optimizer updates before the switch's last forwards did not move LoRA: their "
        f"learning rate was 0 (learning_rate={args.learning_rate}"
        f"{f', a warm-up of {warmup} steps starting at 0' if warmup else ''}), or no gradient reached the LoRA "
        "weights. Raise alpha so that updates with a learning rate above 0 come before the switch."
    )


def _check_adapter_trains(model, layers: dict, adapter_name: str) -> None:
    """Refuse an adapter that the run does not train (its importance would stay zero and nothing could be pruned), or
    trains more than LoRA-drop can export."""
    active = getattr(model, "active_adapters", None)
    active = [active] if isinstance(active, str) else list(active or [])
    if active and adapter_name not in active:
        raise ValueError(
            f"LoraDropCallback(adapter_name={adapter_name!r}): adapter {adapter_name!r} is not active (the model "
            f"trains {active}), so its LoRA would never change and LoRA-drop would have nothing to measure. Call "
            f"model.set_adapter({adapter_name!r}) before building the Trainer, or set adapter_name to {active[0]!r}."
        )
    bias = getattr(_peft_config(model, adapter_name), "bias", "none")
    if bias != "none":
        raise ValueError(
            f"Adapter {adapter_name!r} trains the base layers' biases too (LoraConfig(bias={bias!r})), which LoRA-drop "
            "neither prunes nor exports (the compact adapter and its expansion hold LoRA weights and modules_to_save "
            "only). Train with bias='none' (PEFT's default), or name the layers whose bias must train in "
            "modules_to_save."
        )
    frozen = [name for name, layer in layers.items() if not layer.lora_A[adapter_name].weight.requires_grad]
    if frozen:
        raise ValueError(
            f"Adapter {adapter_name!r} is frozen in {len(frozen)} LoRA modules (first: {frozen[0]}): LoRA-drop prunes "
            "the adapter being trained. Load it with is_trainable=True, or set adapter_name to the trained adapter."
        )


def _check_training_setup(args: TrainingArguments, model) -> None:
    """Refuse, before the first step, the set-ups whose parameter handling neither tying scheme survives (FSDP1), and
    DDP set to fail on the Parameters in-place tying leaves without gradients. FSDP2 and ZeRO-3 are supported
    (gradient tying, see `grad_tying`); the model, already wrapped here, tells which engine holds the LoRA."""
    check_fsdp_version(args.fsdp_config if args.fsdp else None, model)
    sharded = parameter_engine(p for n, p in model.named_parameters() if "lora_" in n) != "replicated"
    if args.world_size > 1 and not (args.deepspeed or args.fsdp or sharded):
        find_unused = args.ddp_find_unused_parameters
        if find_unused is None and isinstance(model, PreTrainedModel):
            find_unused = not (model.is_activation_checkpointing or args.activation_checkpointing)
        if find_unused is False:
            raise ValueError(
                "LoraDropCallback under DDP needs find_unused_parameters=True: after the switch, the Parameters the "
                "shared modules used to own get no gradient. Set TrainingArguments(ddp_find_unused_parameters=True)."
            )
