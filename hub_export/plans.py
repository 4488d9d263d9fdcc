"""Where the drop plan of a model comes from.

A compact adapter needs the plan (importances, kinds, which module shares whose LoRA). `save_compact` takes it from,
in this order: its `plan` argument, or the plan recorded on the model (`loradrop_trainer.plan.attach_plan`: by the
callback at the switch, by `load_compact` on the model it returns). The plan argument
may be a `DropPlan` (`callback.plan`), the JSON payload of a plan file, or the path of ``loradrop_plan.json`` / of the
Trainer output directory holding it. The plan file also carries the run's LoRA-drop settings ("config") and LoRA
parameter counts; these "extra" fields travel with the plan into the compact adapter and its model card.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from loradrop_trainer import DropPlan
from loradrop_trainer.plan import attached_plan, restored_checkpoint
from loradrop_trainer.report import PLAN_FILE

from .errors import PlanError
from .jsonfile import read_json_object

PlanSource = DropPlan | Mapping[str, Any] | str | os.PathLike | None


def resolve_plan(model: nn.Module, plan: PlanSource) -> tuple[DropPlan, dict[str, Any]]:
    """Return the plan for `model` and the extra fields that go with it (see the module docstring)."""
    attached, extra = attached_plan(model)  # set by LoraDropCallback at the switch and by `load_compact`
    restored = restored_checkpoint(model)
    if attached is None and restored is not None:
        raise PlanError(
            f"This model was put back to {restored}, a checkpoint from before the LoRA-drop switch "
            "(load_best_model_at_end): it holds plain LoRA, which no plan fits, so there is no compact adapter to "
            "write. Save it as a plain PEFT adapter (trainer.save_model(), model.save_pretrained(...)), or train "
            "without load_best_model_at_end to keep the pruned model."
        )
    if plan is None:
        if attached is None:
            raise PlanError(
                "No drop plan for this model: pass plan=callback.plan, or plan=<the Trainer output_dir> (its "
                f"{PLAN_FILE} also records the LoRA-drop settings for the model card). Models returned by "
                "load_compact carry their plan and need no argument."
            )
        return attached, extra
    if isinstance(plan, DropPlan):
        return plan, extra if plan == attached else {}
    return read_plan(plan)


def read_plan(plan: DropPlan | Mapping[str, Any] | str | os.PathLike) -> tuple[DropPlan, dict[str, Any]]:
    """The plan and its extra fields from a `DropPlan`, a plan file's JSON payload, or the path of a plan file (or of
    the directory holding ``loradrop_plan.json``)."""
    if isinstance(plan, DropPlan):
        return plan, {}
    if isinstance(plan, Mapping):
        return split_payload(plan, "the plan mapping")
    return split_payload(_read_plan_file(Path(plan)), str(plan))


# The run's facts recorded next to a plan that the model card, the chart and `inspect` read: their JSON types.
_EXTRA_TYPES = {
    "config": (dict, "an object (the run's LoraDropConfig settings)"),
    "license": (str, "a string (an SPDX licence id)"),
    "lora_params_before": (int, "an integer"),
    "lora_params_after": (int, "an integer"),
}


def split_payload(payload: Mapping[str, Any], where: str) -> tuple[DropPlan, dict[str, Any]]:
    """Split a plan file's JSON into the `DropPlan` and the extra fields stored next to it."""
    try:
        plan = DropPlan.from_dict(payload)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PlanError(f"{where} does not hold a usable drop plan: {err}") from err
    own = set(plan.to_dict())
    extra = {key: value for key, value in payload.items() if key not in own}
    for key, (kind, label) in _EXTRA_TYPES.items():
        if extra.get(key) is not None and not (isinstance(extra[key], kind) and not isinstance(extra[key], bool)):
            raise PlanError(f"{where} gives {key} {extra[key]!r}; it is {label}, when recorded.")
    return plan, extra


def _read_plan_file(path: Path) -> Mapping[str, Any]:
    file = path / PLAN_FILE if path.is_dir() else path
    return read_json_object(
        file,
        missing=f"No plan file at {file}: pass the {PLAN_FILE} written by LoraDropCallback, or the Trainer output "
        "directory that holds it.",
        invalid=PlanError,
        what="it is not a LoRA-drop plan file; pass callback.plan instead.",
    )
