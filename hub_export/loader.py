"""Loading a compact adapter onto a base model: the PeftModel PEFT would build, weights in, modules tied again.

The PeftModel is built the way `PeftModel.from_pretrained` builds it (same class for the task type, same config
handling), the full PEFT state dict is loaded with `set_peft_model_state_dict`, and `loradrop_trainer.apply_plan`
re-ties the shared modules (or switches the dropped ones off), so the result computes exactly what the trained model
did and, with `is_trainable=True`, trains on with the same tying. The plan is attached to the model, so
`save_compact(model, dir)` needs no plan argument.

Mode "truncate" rebuilds the trained model as it was: every module at the config's rank r, truncated modules' stored
rank-k weights zero-padded back to r, and the model built from the config without loradrop's `alpha_pattern` entries,
so each layer holds the user's `lora_alpha` and `apply_plan` sets the rank-k scaling from it, as the callback did; the
entries are then recorded in the model's config again (`save_pretrained` needs them). The zero blocks stay zero when
it trains on: their gradients are zero and the optimizer state starts empty.

PEFT modifies the base model in place, so everything is checked first: the adapter against itself (`read_compact`),
then against the base model (every module the adapter names exists with its widths, and the config puts LoRA on no
module the adapter has no weights for), and, once PEFT has built the model but before any weight is written, every
key against what PEFT built: each loads into a LoRA layer or a modules_to_save copy, never into a base weight
(`_check_destinations`). Should PEFT still fail, the base model is put back as it was (no weight of it having been
written), so a retry with the right adapter works on the same object.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, LoraConfig, PeftModel, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import Tensor, nn
from transformers.utils import logging

from loradrop_trainer import apply_plan
from loradrop_trainer.lora_layers import named_modules
from loradrop_trainer.peft_keys import LORA_SUFFIXES, PEFT_PREFIX, is_saved_module
from loradrop_trainer.plan import attach_plan

from .compact import read_compact
from .errors import BaseModelMismatchError, CompactFormatError
from .expand import expanded_state_dict
from .format import CompactAdapter, split_key
from .modes import export_mode
from .truncation import without_recorded_alpha
from .tying import plan_layers
from .validate import lora_config, lora_module, targets

logger = logging.get_logger(__name__)


def load_compact(
    base_model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Return `base_model` wrapped in a PeftModel carrying the compact adapter in the directory `path`, tied as trained.

    Like `PeftModel.from_pretrained`, this modifies `base_model` in place, but only once every check has passed: an
    adapter that is inconsistent raises `CompactFormatError`, a base model it does not fit `BaseModelMismatchError`,
    and either leaves `base_model` untouched. A missing `path` is an error, never a download: use `load_from_hub`
    for a Hub repo.
    """
    adapter = read_compact(path)
    config = lora_config(without_recorded_alpha(adapter.peft_config, adapter.plan), str(path))
    _check_base_model(base_model, adapter, config, str(path))
    # allocated only now that every shape is known to be the base model's
    state = expanded_state_dict(adapter, padded=True)
    config.inference_mode = not is_trainable
    peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
    with _undone_on_failure(base_model):
        model = peft_class(base_model, config, adapter_name)
        _check_destinations(model, state, adapter_name, str(path))
        _load_state(model, state, adapter_name, str(path))
        plan = dataclasses.replace(adapter.plan, adapter_name=adapter_name)
        layers = plan_layers(model, plan)
        apply_plan(layers, plan)
        export_mode(plan).loaded(model.peft_config[adapter_name], layers, plan)
    if not is_trainable:
        model.eval()
    attach_plan(model, plan, adapter.plan_extra)
    logger.info(f"LoRA-drop: loaded {path} ({len(plan.kept)}/{len(plan.kinds)} modules with their own LoRA).")
    return model


def _check_destinations(model: PeftModel, state: Mapping[str, Tensor], adapter_name: str, source: str) -> None:
    """Refuse, before a weight is written, a key that PEFT would load into anything but the adapter's own tensors.

    `set_peft_model_state_dict` moves the weights of modules_to_save into the copies PEFT made of those modules and
    the LoRA weights into the LoRA layers, and hands any other key as it is to `load_state_dict(strict=False)`, which
    writes it into the base model's own weight of that name. The checks before PEFT match names on the base model as
    it was; this one asks the model PEFT built (each copy's own map of the keys it loads), so no key reaches a base
    weight, and no copy goes without its weights (PEFT would fail with a bare KeyError), whatever the names.
    """
    copies = _copy_keys(model, adapter_name)
    modules = dict(named_modules(model))
    for key in state:
        parts = split_key(key)
        layer = modules.get(parts[0]) if parts is not None and parts[1] in LORA_SUFFIXES else None
        if key not in copies and not (isinstance(layer, LoraLayer) and adapter_name in layer.lora_A):
            raise CompactFormatError(
                f"The adapter at {source} stores {key!r}, which PEFT would load into this base model's own weight: it "
                "is neither a LoRA weight of a module PEFT gave LoRA nor a weight of a copy PEFT made for "
                "modules_to_save. Compact adapters never change the base model; export the adapter again."
            )
    missing = [key for key in copies if key not in state]
    if missing:
        raise CompactFormatError(
            f"The adapter at {source} does not store {missing[0]!r}, a weight of a module PEFT copies for its "
            f"modules_to_save {model.peft_config[adapter_name].modules_to_save!r}; PEFT would fail to load it. "
            "Export the adapter again."
        )


def _copy_keys(model: PeftModel, adapter_name: str) -> set[str]:
    """The keys PEFT loads into the copies it made for modules_to_save, as an adapter's state dict names them."""
    keys = set()
    for name, module in named_modules(model):
        if isinstance(module, ModulesToSaveWrapper):
            keys.update(f"{name}.{key}" for key in module.adapter_state_dict_load_map(adapter_name))
    return keys


def _load_state(model: PeftModel, state: dict, adapter_name: str, source: str) -> None:
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    except RuntimeError as err:
        raise BaseModelMismatchError(
            f"The adapter at {source} does not fit this base model ({' '.join(str(err).split())}). Load it onto "
            "the base model it was trained on."
        ) from err
    missing = [key for key in result.missing_keys if "lora_" in key and adapter_name in key]
    if result.unexpected_keys or missing:
        odd = (result.unexpected_keys or missing)[0]
        raise BaseModelMismatchError(
            f"The adapter at {source} does not fit this base model: {len(result.unexpected_keys)} of its weights "
            f"have no place in the model and {len(missing)} LoRA weights of the model are not in it (first: {odd!r}). "
            "Load it onto the base model it was trained on."
        )


@contextmanager
def _undone_on_failure(model: nn.Module) -> Iterator[None]:
    """Put `model` back as it was if the body raises: PEFT swaps its layers into it, freezes it and hooks into it (a
    trainable load with activation checkpointing hooks the input embeddings) in place. Every module's attributes and
    the contents of its own dicts (children, Parameters, buffers, hooks) are put back; no weight of it is written
    before the load is checked (`_check_destinations`), so its tensors are as they were."""
    saved = [
        (
            module,
            dict(vars(module)),
            {key: dict(value) for key, value in vars(module).items() if isinstance(value, dict)},
        )
        for module in model.modules()
    ]
    trainable = [(param, param.requires_grad) for param in model.parameters()]
    try:
        yield
    except BaseException:
        for module, attributes, contents in saved:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for key, content in contents.items():
                attributes[key].clear()
                attributes[key].update(content)
        for param, requires_grad in trainable:
            param.requires_grad_(requires_grad)
        raise


def _check_base_model(base_model: nn.Module, adapter: CompactAdapter, config: LoraConfig, source: str) -> None:
    """Refuse, before PEFT modifies it, a base model that is already adapted or that the adapter does not fit."""
    if isinstance(base_model, PeftModel) or any(isinstance(m, LoraLayer) for m in base_model.modules()):
        raise BaseModelMismatchError(
            "The base model already carries LoRA layers (a PeftModel, or a model that load_compact or get_peft_model "
            "wrapped before, which modifies it in place). Pass a freshly loaded base model."
        )
    modules = dict(base_model.named_modules())
    shapes = {key: tuple(adapter.tensors[source].shape) for source, keys in adapter.members.items() for key in keys}
    shapes.update({key: spec.shape for key, spec in adapter.dropped.items()})
    base_shapes = {PEFT_PREFIX + name: tuple(t.shape) for name, t in base_model.state_dict(keep_vars=True).items()}
    problems: dict[str, str] = {}  # the first problem of each module
    with_lora = set()
    for key, shape in shapes.items():
        module = lora_module(key, config)
        if module is None:  # a modules_to_save weight: PEFT loads it into a copy of the base module
            if base_shapes.get(key) != shape:
                problems.setdefault(key, f"it has no weight {key.removeprefix(PEFT_PREFIX)!r} of shape {list(shape)}")
            continue
        with_lora.add(module.removeprefix(PEFT_PREFIX))
        if module not in problems:
            problem = _module_problem(modules, module.removeprefix(PEFT_PREFIX), key.removeprefix(module), shape)
            if problem:
                problems[module] = problem
    for name, module in modules.items():  # every module PEFT will copy for modules_to_save needs its weights
        if name and any(is_saved_module(PEFT_PREFIX + name, entry) for entry in config.modules_to_save or ()):
            missing = [f"{PEFT_PREFIX}{name}.{pname}" for pname, _ in module.named_parameters()]
            missing = [key for key in missing if key not in shapes]
            if missing:
                raise CompactFormatError(
                    f"The adapter at {source} lists {name!r} in modules_to_save but does not store {missing[0]!r}; "
                    "PEFT would fail to load it. Export the adapter again."
                )
    lacking = [name for name in modules if name and name not in with_lora and targets(config, PEFT_PREFIX + name)]
    base = adapter.peft_config.get("base_model_name_or_path") or "the base model it was trained on"
    if problems:
        first = next(iter(problems.values()))
        raise BaseModelMismatchError(
            f"The adapter at {source} does not fit this base model: {first}"
            f"{f' (and {len(problems) - 1} more modules)' if len(problems) > 1 else ''}. Load it onto {base}."
        )
    if lacking:
        raise BaseModelMismatchError(
            f"The adapter at {source} does not fit this base model: its PEFT config puts LoRA on {len(lacking)} "
            f"modules of this model it has no weights for (first: {lacking[0]!r}). Load it onto {base}."
        )


def _module_problem(modules: dict[str, nn.Module], name: str, suffix: str, shape: tuple[int, ...]) -> str | None:
    """What keeps the LoRA tensor `suffix` of `shape` off the base model's module `name`, if anything."""
    module = modules.get(name)
    if module is None:
        return f"it has no module {name!r}"
    features = _features(module)
    if features is None:
        return f"its module {name!r} is a {type(module).__name__}, not a linear layer"
    if suffix == LORA_SUFFIXES[0] and shape[1] != features[0]:
        return f"{name!r} takes {features[0]} input features, the adapter's LoRA A expects {shape[1]}"
    if suffix == LORA_SUFFIXES[1] and shape[0] != features[1]:
        return f"{name!r} gives {features[1]} output features, the adapter's LoRA B gives {shape[0]}"
    return None


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a layer PEFT puts linear LoRA on: nn.Linear and its quantized kin, or GPT-2's Conv1D."""
    features = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if all(isinstance(n, int) for n in features):
        return features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return tuple(module.weight.shape)  # Conv1D stores its weight as (in, out)
    return None
