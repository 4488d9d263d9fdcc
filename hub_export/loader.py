"""Loading a compact adapter onto a base model: the PeftModel PEFT would build, weights in, modules tied again.

The PeftModel is built the way `PeftModel.from_pretrained` builds it (same class for the task type, same config
handling), the full PEFT state dict is loaded with `set_peft_model_state_dict`, and `loradrop_trainer.apply_plan`
re-ties the shared modules (or switches the dropped ones off), so the result computes exactly what the trained model
did and, with `is_trainable=True`, trains on with the same tying. The plan is attached to the model, so
`save_compact(model, dir)` needs no plan argument.
"""

from __future__ import annotations

import dataclasses
import os

from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, LoraConfig, PeftModel, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.utils import logging

from loradrop_trainer import apply_plan

from .compact import CompactAdapter, read_compact
from .errors import BaseModelMismatchError
from .expand import expanded_state_dict
from .plans import attach_plan, plan_layers
from .remote import local_dir
from .tying import PEFT_PREFIX, split_key

logger = logging.get_logger(__name__)


def load_compact(
    base_model: nn.Module,
    path_or_repo: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Return `base_model` wrapped in a PeftModel carrying the compact adapter at `path_or_repo`, tied as trained.

    `path_or_repo` is a local directory or a Hub repo id (downloaded through the Hugging Face cache; use
    `load_from_hub` to pick a revision or token). Like `PeftModel.from_pretrained`, this modifies `base_model` in
    place; a base model whose modules or shapes do not fit the adapter is refused before it is touched.
    """
    directory = local_dir(path_or_repo)
    adapter = read_compact(directory)
    _check_base_model(base_model, adapter, str(path_or_repo))

    config = LoraConfig.from_pretrained(str(directory))
    config.inference_mode = not is_trainable
    peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
    model = peft_class(base_model, config, adapter_name)
    try:
        result = set_peft_model_state_dict(model, expanded_state_dict(adapter), adapter_name=adapter_name)
    except RuntimeError as err:
        raise BaseModelMismatchError(
            f"The adapter at {path_or_repo} does not fit this base model ({' '.join(str(err).split())}). Load it onto "
            "the base model it was trained on."
        ) from err
    missing = [key for key in result.missing_keys if "lora_" in key and adapter_name in key]
    if result.unexpected_keys or missing:
        odd = (result.unexpected_keys or missing)[0]
        raise BaseModelMismatchError(
            f"The adapter at {path_or_repo} does not fit this base model: {len(result.unexpected_keys)} of its weights "
            f"have no place in the model and {len(missing)} LoRA weights of the model are not in it (first: {odd!r}). "
            "Load it onto the base model it was trained on."
        )

    plan = dataclasses.replace(adapter.plan, adapter_name=adapter_name)
    apply_plan(plan_layers(model, plan), plan)
    if not is_trainable:
        model.eval()
    attach_plan(model, plan, adapter.plan_extra)
    logger.info(f"LoRA-drop: loaded {path_or_repo} ({len(plan.kept)}/{len(plan.kinds)} modules with their own LoRA).")
    return model


def _check_base_model(base_model: nn.Module, adapter: CompactAdapter, source: str) -> None:
    """Refuse, before PEFT modifies it, a base model that is already adapted or lacks the adapter's modules/shapes."""
    if isinstance(base_model, PeftModel) or any(isinstance(m, LoraLayer) for m in base_model.modules()):
        raise BaseModelMismatchError(
            "The base model already carries LoRA layers (a PeftModel, or a model that load_compact or get_peft_model "
            "wrapped before, which modifies it in place). Pass a freshly loaded base model."
        )
    modules = dict(base_model.named_modules())
    shapes = {key: tuple(adapter.tensors[source].shape) for source, keys in adapter.members.items() for key in keys}
    shapes.update({key: spec.shape for key, spec in adapter.dropped.items()})
    problems: dict[str, str] = {}  # the first problem of each module
    for key, shape in shapes.items():
        parts = split_key(key)
        if parts is not None and parts[0] not in problems:
            problem = _module_problem(modules, parts, shape)
            if problem:
                problems[parts[0]] = problem
    if problems:
        base = adapter.peft_config.get("base_model_name_or_path") or "the base model it was trained on"
        first = next(iter(problems.values()))
        raise BaseModelMismatchError(
            f"The adapter at {source} does not fit this base model: {first}"
            f"{f' (and {len(problems) - 1} more modules)' if len(problems) > 1 else ''}. Load it onto {base}."
        )


def _module_problem(modules: dict[str, nn.Module], parts: tuple[str, str], shape: tuple[int, ...]) -> str | None:
    """What keeps the LoRA tensor `parts` = (PEFT module name, suffix) of `shape` off the base model, if anything."""
    name = parts[0].removeprefix(PEFT_PREFIX)
    module = modules.get(name)
    if module is None:
        return f"it has no module {name!r}"
    features = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if not all(isinstance(n, int) for n in features) or len(shape) != 2:
        return None
    if parts[1] == ".lora_A.weight" and shape[1] != features[0]:
        return f"{name!r} takes {features[0]} input features, the adapter's LoRA A expects {shape[1]}"
    if parts[1] == ".lora_B.weight" and shape[0] != features[1]:
        return f"{name!r} gives {features[1]} output features, the adapter's LoRA B gives {shape[0]}"
    return None
