"""Mode "truncate" in the export: each truncated module stored at its rank k, and the PEFT config entries that say how
PEFT scales it.

The compact adapter's PEFT config is the trained model's, every module at rank r, with the `alpha_pattern` entries
LoraDropCallback records for the truncated modules (`check_config` holds a config to them); the plain PEFT adapter
`expand_to_peft` writes gives them rank k through `rank_pattern` instead (`peft_config`); `load_compact` records the
entries again in the model it builds (`loaded`). How the weights are cut to rank k, padded back to r and checked for
their zero block is `hub_export.truncation`, which every reader applies to `DropPlan.truncated`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from loradrop_trainer.peft_keys import PEFT_PREFIX, pattern_key

from ..errors import CompactFormatError
from ..truncation import module_value, recorded_alpha_keys, without_recorded_alpha
from .base import ExportMode

if TYPE_CHECKING:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    from loradrop_trainer import DropPlan


class Truncate(ExportMode):
    name = "truncate"
    rank_pattern_form = True

    def check_config(
        self, config: LoraConfig, plan: DropPlan, where: str, error: type[ValueError] = CompactFormatError
    ) -> None:
        """Refuse a plan whose `dropped_rank` k is not below a truncated module's rank r, and a config
        that does not scale every truncated module as a rank-k LoRA.

        The adapter's config is the model's, at rank r everywhere: what PEFT builds from it computes the truncated
        modules' LoRA only with the `alpha_pattern` entry LoraDropCallback records for each of them, the `lora_alpha`
        that makes PEFT's rank-r scaling the rank-k one. It must be the first key PEFT finds for the module, and its
        value the one the user's own `lora_alpha` (or `alpha_pattern`) gives.
        """
        from peft.utils.other import get_pattern_key

        from loradrop_trainer.truncate import alpha_at_rank

        k, ours = plan.dropped_rank, recorded_alpha_keys(plan)
        theirs = {key: value for key, value in config.alpha_pattern.items() if key not in ours}
        for key, name in ours.items():
            r, short = module_value(config.r, config.rank_pattern, name), name.removeprefix(PEFT_PREFIX)
            if k >= r:
                raise error(
                    f"{where}: its plan truncates {name!r} to rank {k} (dropped_rank), but its PEFT config gives "
                    f"that module rank {r}; truncation keeps fewer ranks than r. The plan and the config come from "
                    "different adapters: export the adapter again."
                )
            alpha = module_value(config.lora_alpha, theirs, name)
            wanted = alpha_at_rank(alpha, r, k, config.use_rslora)
            first = get_pattern_key(config.alpha_pattern.keys(), short)
            if key not in config.alpha_pattern:
                found = "has no entry for it"
            elif first != key:
                found = f"has {first!r} first among the keys that match it"
            elif config.alpha_pattern[key] != wanted:
                found = f"maps it to lora_alpha {config.alpha_pattern[key]!r}"
            else:
                continue
            raise error(
                f"{where}: its plan truncates {name!r} to rank {k}, but the alpha_pattern of its PEFT config "
                f"{found}; LoraDropCallback records {key!r}: {wanted!r} there at the switch, so that PEFT scales the "
                f"rank-{r} module as a rank-{k} LoRA. The config was saved before the switch or by another run than "
                "the plan's: export the adapter again from the model (or a checkpoint) saved after the switch, with "
                "the plan of the same run."
            )

    def peft_config(self, peft_config: Mapping[str, Any], plan: DropPlan) -> dict[str, Any]:
        """The PEFT config of the plain adapter at the reduced size: `rank_pattern` gives every truncated module rank
        k (ahead of the user's own entries) and loradrop's `alpha_pattern` entries are gone, so PEFT scales those
        modules by `lora_alpha / k` (`/ sqrt(k)` with rsLoRA), the scaling they trained with."""
        ours = {pattern_key(name): plan.dropped_rank for name in plan.dropped}
        theirs = {key: value for key, value in (peft_config.get("rank_pattern") or {}).items() if key not in ours}
        return {**without_recorded_alpha(peft_config, plan), "rank_pattern": {**ours, **theirs}}

    def loaded(self, config: LoraConfig, layers: dict[str, LoraLayer], plan: DropPlan) -> None:
        """Record the truncated modules' rank-k scaling in the config, as the callback did (`save_pretrained` needs
        it: the model was built from the config without those entries, `without_recorded_alpha`)."""
        from loradrop_trainer.truncate import record_truncation

        record_truncation(config, layers, plan)

    def dropped_clause(self, plan: DropPlan) -> str:
        return f"are truncated to rank {plan.dropped_rank}, each keeping its own LoRA cut by SVD at the switch"

    def status(self, plan: DropPlan, name: str) -> str:
        return f"truncated to rank {plan.dropped_rank}"

    def loaded_again(self, plan: DropPlan) -> str:
        return (
            f"the model as trained, truncated modules at rank r with zeros past rank {plan.dropped_rank}; "
            "`is_trainable=True` continues training at the same ranks"
        )
