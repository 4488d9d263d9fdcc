"""Mode "truncate" (the default): each dropped module keeps a LoRA of its own, cut to rank `dropped_rank` by SVD
(or, with `truncation="activation"`, to the rank-k LoRA with the least output error on the inputs it saw).

The SVD, the zero block it leaves and the rank-k scaling are `loradrop_trainer.truncate`; what `save_pretrained`
writes of the truncated modules (their scaling folded into lora_B, so that engines that ignore `alpha_pattern` read
it) is `loradrop_trainer.saved_form`. This module says when each happens. With `dropped_scaling="keep"` a truncated
module keeps the adapter's scaling: nothing is set, recorded or folded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Mode, Run

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

    from ..config import LoraDropConfig
    from ..plan import DropPlan


class Truncate(Mode):
    name = "truncate"
    dropped_as = "truncated"
    truncates = True

    def source_of(self, plan: DropPlan, name: str) -> str | None:
        """The module itself: it keeps its own LoRA, at the lower rank."""
        return name

    def became(self, plan: DropPlan) -> str:
        return f"truncated to rank {plan.dropped_rank}"

    def summary(self, plan: DropPlan) -> str:
        """Every module has a LoRA of its own, at one of two ranks."""
        return f"their full-rank LoRA, {len(plan.dropped)} are truncated to rank {plan.dropped_rank}"

    def check_layers(self, layers: dict[str, LoraLayer], config: LoraDropConfig) -> None:
        """Refuse a `dropped_rank` that is not below every module's rank."""
        from ..truncate import check_truncatable

        check_truncatable(layers, config.adapter_name, config.dropped_rank)

    def apply(self, layers: dict[str, LoraLayer], plan: DropPlan, *, dropped_scaling: str) -> None:
        """Scale the truncated modules as rank-k LoRA (their values are the model's own: `reparameterise` sets them
        at the switch)."""
        from ..truncate import set_truncated_scaling

        if dropped_scaling == "rank":
            set_truncated_scaling(layers, plan)

    def reparameterise(self, layers: dict[str, LoraLayer], plan: DropPlan, run: Run) -> None:
        """At the switch, cut every dropped module to rank k (values and optimizer state, on any engine); then scale
        them as `apply` does."""
        from ..reparam import apply_plan, check_plan_matches, set_values
        from ..truncate import truncated_dropped_values

        check_plan_matches(layers, plan)
        if run.at_switch:
            values = truncated_dropped_values(layers, plan, run.optimizer, run.dropped_scaling, run.input_grams)
            set_values(values, run.optimizer)
        apply_plan(layers, plan, dropped_scaling=run.dropped_scaling)
        return None

    def record(
        self, model: Any, config: Any, layers: dict[str, LoraLayer], plan: DropPlan, dropped_scaling: str
    ) -> None:
        """Put the truncated modules' rank-k scaling into the PEFT config, and make `save_pretrained` write it folded
        into their lora_B instead, which every engine reads (`saved_form`)."""
        from ..saved_form import save_folded
        from ..truncate import record_truncation

        if dropped_scaling == "rank":
            record_truncation(config, layers, plan)
            save_folded(model, layers, plan)

    def forget(self, model: Any, config: Any, plan: DropPlan, dropped_scaling: str) -> None:
        from ..saved_form import stop_folding
        from ..truncate import forget_truncation

        if dropped_scaling == "rank":
            forget_truncation(config, plan)
            stop_folding(model)
