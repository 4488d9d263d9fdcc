"""Reading the tying off a re-parameterised PeftModel: which LoRA tensors are stored once, and for whom.

The model is the truth, not the plan: in mode "share" the members of a shared group hold the very same Parameters
(same storage), or, when FSDP2 or ZeRO-3 sharded them and their gradients were tied instead, bit-identical copies
(gathered from the shards first); in mode "drop" the dropped layers have the adapter switched off; in mode "truncate"
the truncated layers' LoRA is zero past rank k, and only its first k ranks are stored. The plan says what
the model should look like; anything else (a plan from another run, a model that was never re-parameterised) is
refused rather than exported wrongly. Keys are PEFT's own state-dict keys (`get_peft_model_state_dict`: adapter name
removed), so a compact adapter expands to a plain one by copying each stored tensor to its members' keys.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from loradrop_trainer import DropPlan
from loradrop_trainer.lora_layers import named_modules
from loradrop_trainer.sharding import lora_state_dict

from .errors import PlanError
from .format import TensorSpec, split_key
from .truncation import check_zero_block, stored_part, truncated_keys


@dataclass
class Tying:
    """What a compact adapter stores: `tensors` by key, `members[key]` = every PEFT key that takes that tensor (the
    key itself first), `dropped` = keys of switched-off modules, which are not stored at all."""

    tensors: dict[str, torch.Tensor]
    members: dict[str, list[str]]
    dropped: dict[str, TensorSpec]
    gathered: bool = False  # read from sharded Parameters: every rank took part in gathering them


def read_tying(model: nn.Module, plan: DropPlan) -> Tying:
    """Group the adapter's tensors as the model shares them, after checking the model is tied as `plan` says.

    A collective when the LoRA Parameters are sharded (FSDP2, ZeRO-3): then every rank must call it.
    """
    adapter = plan.adapter_name
    if adapter not in getattr(model, "peft_config", {}):
        raise PlanError(
            f"The model has no PEFT adapter {plan.adapter_name!r} (the plan's adapter); pass the PeftModel that was "
            "trained with LoraDropCallback or returned by load_compact."
        )
    layers = plan_layers(model, plan)
    switched_off = {name for name, layer in layers.items() if adapter not in layer.active_adapters}
    expected_off = {name for name in plan.kinds if plan.source_of(name) is None}
    if switched_off != expected_off:
        odd = sorted(switched_off ^ expected_off)
        raise PlanError(
            f"The model does not match the plan (mode {plan.mode!r}): the LoRA of {odd[0]!r} is "
            f"{'switched off in the model but not' if odd[0] in switched_off else 'active in the model but not'} in "
            f"the plan ({len(odd)} such modules). Pass the plan this model was trained or loaded with, and do not call "
            "set_adapter() on a model in mode 'drop' (it switches the dropped LoRA back on)."
        )

    state, live = lora_state_dict(model, adapter)
    if not live:  # gathered copies of gradient-tied members: equal bit for bit, or the model is not what it says
        return replace(group_by_plan(state, plan, same=torch.equal, differs=_NOT_EQUAL), gathered=True)
    tying = group_by_plan(state, plan, same=lambda a, b: _identity(a) == _identity(b), differs=_NOT_TIED)
    shared = [key for key, n in Counter(_identity(state[source]) for source in tying.members).items() if n > 1]
    if shared:
        owners = [source for source in tying.members if _identity(state[source]) == shared[0]]
        raise PlanError(
            f"The model does not match the plan: {owners[0]!r} and {owners[1]!r} are the same tensor, but the plan "
            "gives them separate LoRA weights. Pass the plan this model was trained or loaded with."
        )
    return tying


_NOT_TIED = (
    "The model does not match the plan: {key!r} is not the same tensor as {source!r}, whose LoRA the plan says it "
    "shares. Pass the plan this model was trained or loaded with (a plan of another run, or a model saved before the "
    "switch, does not fit)."
)
_NOT_EQUAL = (
    "The model does not match the plan: {key!r} does not equal {source!r}, whose LoRA the plan says it shares (its "
    "gradient-tied copy). Pass the plan this model was trained or loaded with."
)


def plan_layers(model: nn.Module, plan: DropPlan) -> dict[str, LoraLayer]:
    """The LoRA layers the plan names, by PEFT module name; the plan must fit the model."""
    modules = dict(named_modules(model))
    layers = {}
    for name in plan.kinds:
        layer = modules.get(name)
        if not isinstance(layer, LoraLayer) or plan.adapter_name not in layer.lora_A:
            raise PlanError(
                f"The drop plan names {name!r}, which is not a LoRA layer of adapter {plan.adapter_name!r} in this "
                "model; the plan belongs to another model, adapter or target filter."
            )
        layers[name] = layer
    return layers


def group_by_plan(
    state: Mapping[str, torch.Tensor],
    plan: DropPlan,
    *,
    same: Callable[[torch.Tensor, torch.Tensor], bool],
    differs: str,
) -> Tying:
    """Group a PEFT state dict's tensors as `plan` ties them, checking that each member holds its source's weights.

    In mode "truncate" every module is its own source, and a truncated module's weights are stored at its rank k
    (`truncation.stored_part`) once `truncation.check_zero_block` has found the rest exactly zero (`PlanError`
    otherwise, naming the module).

    Args:
        state: PEFT state-dict keys (adapter name removed) to tensors.
        plan: says which module's LoRA each module uses (`DropPlan.source_of`).
        same: whether a member's tensor is its source's (the same Parameter in a model; equal values on disk).
        differs: the `PlanError` message when it is not, formatted with `key` and `source`.
    """
    members: dict[str, list[str]] = {}
    dropped: dict[str, TensorSpec] = {}
    for key, tensor in state.items():
        source = _source_key(key, plan)
        if source is None:
            dropped[key] = TensorSpec.of(tensor)
        else:
            members.setdefault(source, []).append(key)
    for source, keys in members.items():
        if source not in state:
            raise PlanError(f"The plan makes modules share {source!r}, which the adapter's state dict lacks.")
        keys.sort(key=lambda k: k != source)
        for key in keys:
            if not same(state[key], state[source]):
                raise PlanError(differs.format(key=key, source=source))
    check_zero_block(state, plan)
    truncated = truncated_keys(plan)
    tensors = {}
    for source in members:
        tensor = state[source].detach()
        if source in truncated:
            tensor = stored_part(source, tensor, plan.dropped_rank)
        tensors[source] = tensor.to("cpu", copy=True).contiguous()
    return Tying(tensors, members, dropped)


def _source_key(key: str, plan: DropPlan) -> str | None:
    """The key whose tensor `key` uses: itself, its shared source's, or None if its module's LoRA is dropped."""
    parts = split_key(key)
    if parts is None or parts[0] not in plan.kinds:
        return key
    source = plan.source_of(parts[0])
    return None if source is None else source + parts[1]


def _identity(tensor: torch.Tensor) -> tuple:
    """Two state-dict entries with equal identity are one Parameter seen under two names."""
    return tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride())
