"""Checking a compact adapter against itself before anything uses it, since anyone may have written it.

A loader that trusted the manifest would load whatever keys it names into the base model (a final norm, an output
head), allocate whatever shapes it lists, and tie modules one way while the expanded copy computes another. So
`read_compact` (and `save_compact`, so that it never writes what would be refused) checks, with the PEFT config
parsed as PEFT parses it:

- config: plain LoRA, without the PEFT features a LoRA-drop adapter never has (DoRA, lora_bias, ...), and no
  initialisation that rewrites base weights when the adapter is loaded (PiSSA, OLoRA, LoftQ, ...);
- keys: only ``<module>.lora_A.weight``/``<module>.lora_B.weight`` of modules the PEFT config targets, and the
  weights of modules it lists in ``modules_to_save`` (a classifier head, which PEFT loads into a copy of its own);
  every module of the plan is targeted;
- mapping: every module of the plan stores, shares or drops its LoRA exactly as `DropPlan.source_of` says, and any
  other module stands alone;
- shapes: matrices whose rank is the one the config gives the module (``r`` or ``rank_pattern``), or the plan's
  ``dropped_rank`` k for a module it truncates (mode "truncate"), one shape per kind and rank, widths bounded by
  `MAX_WIDTH`; dtypes floating point; weights finite;
- truncation (mode "truncate"): k is below every truncated module's rank r, and the config's ``alpha_pattern`` has,
  first among the keys that match the module, the entry LoraDropCallback records for it, with the ``lora_alpha``
  that scales it as a rank-k LoRA (`check_truncation`).

What needs the base model (do the modules exist, are the widths theirs) is checked by `hub_export.loader`. PEFT is
imported by the checks that parse the config as PEFT does, when they run: `check_format`, the part that reads the
config's own fields and needs no PEFT, is what `loradrop inspect` runs, in a fraction of the time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from loradrop_trainer.peft_keys import LORA_SUFFIXES, PEFT_PREFIX

from .errors import CompactFormatError
from .format import CompactAdapter, split_key
from .truncation import module_rank, recorded_alpha_keys, truncated_keys

if TYPE_CHECKING:
    from peft import LoraConfig

    from loradrop_trainer import DropPlan

# The heads PEFT adds to modules_to_save by itself for a task type, whether or not the model has them (BERT has a
# `classifier`, Llama a `score`): a name of these without stored weights is PEFT's doing, not an inconsistency.
_AUTOMATIC_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# Wider than any layer of any released model; bounds what expanding a crafted "dropped" entry may allocate.
MAX_WIDTH = 2**20
# PEFT features that change what a LoRA layer holds or computes; LoRA-drop trains and stores plain LoRA only.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "lora_bias",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "aLoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "target_parameters": "LoRA on parameters",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "megatron_config": "Megatron layers",
}
# Initialisations that only draw A and B (which the stored weights then replace). The others rewrite the base
# model's weights (PiSSA, OLoRA, LoftQ, CorDA) or need data (EVA) when the adapter is loaded.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal")


def check_adapter(adapter: CompactAdapter, where: str) -> LoraConfig:
    """Raise `CompactFormatError` for the first problem of `adapter` (see the module docstring); return its config.

    Args:
        adapter: the adapter as read from its files (or about to be written).
        where: names the adapter in messages ("the compact adapter at out/compact").
    """
    config = lora_config(adapter.peft_config, f"The PEFT config of {where}")
    _check_keys(adapter, config, where)
    check_format(adapter, where)
    check_truncation(config, adapter.plan, where)
    _check_shapes(adapter, config, where)
    return config


def check_format(adapter: CompactAdapter, where: str) -> None:
    """The checks that need no PEFT: the config's ranks and scalings as its own fields give them, the plan against
    the stored tensors module by module, and the weights' dtypes and values. Enough to show the adapter (`loradrop
    inspect`); `check_adapter` runs them with the rest before anything uses it."""
    check_lora_fields(adapter.peft_config, f"The PEFT config of {where}")
    _check_mapping(adapter, where)
    check_weights(adapter.tensors, where)


def lora_config(data: Mapping[str, Any], where: str) -> LoraConfig:
    """The `LoraConfig` PEFT would build from `data`, refused if it asks for more than plain LoRA."""
    from peft import LoraConfig

    kwargs = {key: value for key, value in data.items() if key != "runtime_config"}
    try:
        config = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**kwargs))
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise CompactFormatError(f"{where} is not a LoRA config PEFT can load ({err}).") from err
    if not isinstance(config, LoraConfig):
        raise CompactFormatError(f"{where} describes a {type(config).__name__}; compact adapters hold LoRA only.")
    features = [label for name, label in _UNSUPPORTED.items() if getattr(config, name, None)]
    if features:
        raise CompactFormatError(f"{where} asks for {', '.join(features)}; LoRA-drop adapters hold plain LoRA only.")
    if config.init_lora_weights not in _PLAIN_INITS:
        raise CompactFormatError(
            f"{where} sets init_lora_weights={config.init_lora_weights!r}, which rewrites the base model's weights (or "
            "needs data) whenever the adapter is loaded; LoRA-drop adapters hold plain LoRA. Convert it to a plain "
            "LoRA adapter first (PEFT's save_pretrained(path_initial_model_for_weight_conversion=...))."
        )
    check_lora_fields(data, where)
    if not all(isinstance(name, str) for name in config.modules_to_save or ()):
        raise CompactFormatError(f"{where} lists modules_to_save {config.modules_to_save!r}; they must be names.")
    return config


def check_lora_fields(data: Mapping[str, Any], where: str) -> None:
    """Refuse ranks and `lora_alpha` values that are not what PEFT's config fields hold: `r` and `rank_pattern` values
    integers from 1 to `MAX_WIDTH`, `lora_alpha` and `alpha_pattern` values finite numbers, pattern keys regular
    expressions. Read from the config's own fields, so it needs no PEFT."""
    ranks = _patterned(data, "r", "rank_pattern", where)
    alphas = _patterned(data, "lora_alpha", "alpha_pattern", where)
    if not all(type(r) is int and 0 < r <= MAX_WIDTH for r in ranks):
        raise CompactFormatError(f"{where} gives LoRA ranks {ranks}; ranks are integers from 1 to {MAX_WIDTH:,}.")
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in alphas):
        raise CompactFormatError(f"{where} gives lora_alpha values {alphas}; they must be finite numbers.")


def _patterned(data: Mapping[str, Any], field: str, pattern: str, where: str) -> list[Any]:
    values = data.get(pattern, {})
    if not isinstance(values, dict):
        raise CompactFormatError(f"{where} gives {pattern}={values!r}; it must map module names to values.")
    for key in values:  # PEFT (and `module_rank`, `check_truncation`) match them as regular expressions
        try:
            re.compile(key)
        except (re.error, TypeError) as err:
            raise CompactFormatError(
                f"{where} gives {pattern} the key {key!r}, which is no regular expression ({err}); PEFT matches these "
                "keys against module names."
            ) from err
    return [data.get(field), *values.values()]


def targets(config: LoraConfig, module: str) -> bool:
    """Whether PEFT puts LoRA on `module` (a PEFT module name) under `config`."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return module.startswith(PEFT_PREFIX) and bool(check_target_module_exists(config, module.removeprefix(PEFT_PREFIX)))


def lora_module(key: str, config: LoraConfig) -> str | None:
    """The PEFT module name of a LoRA A/B weight key of a module `config` targets; None for any other key."""
    parts = split_key(key)
    return parts[0] if parts is not None and parts[1] in LORA_SUFFIXES and targets(config, parts[0]) else None


def _saved_under(key: str, name: str) -> bool:
    """Whether the weight `key` belongs to a module whose name ends with the modules_to_save entry `name`."""
    path = key.removeprefix(PEFT_PREFIX).split(".")[:-1]
    return any(".".join(path[:i]).endswith(name) for i in range(1, len(path) + 1))


def is_saved_module_weight(key: str, config: LoraConfig) -> bool:
    """Whether `key` is a weight of a module `config` lists in modules_to_save (matched as PEFT matches them)."""
    return key.startswith(PEFT_PREFIX) and any(_saved_under(key, name) for name in config.modules_to_save or ())


def _check_keys(adapter: CompactAdapter, config: LoraConfig, where: str) -> None:
    for name in adapter.plan.kinds:
        if not targets(config, name):
            raise CompactFormatError(
                f"{where}: its plan names {name!r}, a module its PEFT config puts no LoRA on; the plan and the config "
                "come from different adapters. Export the adapter again."
            )
    stored = [key for keys in adapter.members.values() for key in keys]
    heads = _AUTOMATIC_HEADS.get(str(config.task_type), ())
    for name in config.modules_to_save or ():
        saved = any(_saved_under(key, name) for key in stored)
        if not saved and name not in heads:
            raise CompactFormatError(
                f"{where} lists {name!r} in modules_to_save but stores no weight of it; PEFT would look for them when "
                "loading (and fail). Export the adapter again."
            )
    for key in [*stored, *adapter.dropped]:
        dropped = key in adapter.dropped
        if lora_module(key, config) is None and (dropped or not is_saved_module_weight(key, config)):
            raise CompactFormatError(
                f"{where} names {key!r}, which is not a LoRA A/B weight of a module its PEFT config targets"
                f"{'' if dropped else ' (nor a weight of a module it lists in modules_to_save)'}. Compact adapters "
                "hold nothing else: never base-model weights, with which a crafted file would change the model it is "
                "loaded onto."
            )


def _check_mapping(adapter: CompactAdapter, where: str) -> None:
    plan = adapter.plan
    holder: dict[str, str] = {}  # PEFT key -> the stored key whose tensor it takes
    for source, keys in adapter.members.items():
        if not keys or keys[0] != source:
            raise CompactFormatError(f"{where}: tensors[{source!r}] must list {source!r} first; export it again.")
        for key in keys:
            if key in holder or key in adapter.dropped:
                raise CompactFormatError(f"{where} maps {key!r} twice; the manifest is corrupt. Export it again.")
            holder[key] = source
    in_plan = {name + suffix for name in plan.kinds for suffix in LORA_SUFFIXES}
    for name in plan.kinds:
        source = plan.source_of(name)
        for suffix in LORA_SUFFIXES:
            key = name + suffix
            wanted = None if source is None else source + suffix
            if holder.get(key) != wanted or (wanted is None and key not in adapter.dropped):
                raise CompactFormatError(
                    f"{where}: {key!r} is {_found(key, holder, adapter.dropped)}, but {_plan_says(plan, name)}; the "
                    "plan and the stored tensors disagree (load_compact and the expanded adapter would compute "
                    "different things). Export the adapter again."
                )
    for key, source in holder.items():
        if key not in in_plan and key != source:
            raise CompactFormatError(
                f"{where}: {key!r} is stored with {source!r}, but only modules of the plan share LoRA weights. "
                "Export the adapter again."
            )
    for key in adapter.dropped:
        if key not in in_plan:
            raise CompactFormatError(f"{where} lists {key!r} as dropped, but its plan does not name that module.")
    outside = {split_key(key)[0] for key in holder if key not in in_plan and split_key(key) is not None}
    for name in sorted(outside):
        missing = [name + suffix for suffix in LORA_SUFFIXES if name + suffix not in holder]
        if missing and any(name + suffix in holder for suffix in LORA_SUFFIXES):
            raise CompactFormatError(f"{where} stores one half of the LoRA of {name!r} but not {missing[0]!r}.")


def _found(key: str, holder: Mapping[str, str], dropped: Mapping[str, Any]) -> str:
    if key in dropped:
        return "listed as dropped"
    source = holder.get(key)
    if source is None:
        return "not in the adapter"
    return "stored on its own" if source == key else f"stored with {source!r}"


def _plan_says(plan: DropPlan, name: str) -> str:
    if name in plan.kept:
        return f"the plan gives {name!r} its own LoRA"
    if plan.mode == "truncate":
        return f"the plan gives {name!r} its own LoRA, truncated to rank {plan.dropped_rank}"
    source = plan.source_of(name)
    return f"the plan drops the LoRA of {name!r}" if source is None else f"the plan ties {name!r} to {source!r}"


def _check_shapes(adapter: CompactAdapter, config: LoraConfig, where: str) -> None:
    for key, spec in adapter.dropped.items():
        if not _is_float_dtype(spec.dtype):
            raise CompactFormatError(f"{where} gives dropped {key!r} dtype {spec.dtype!r}; LoRA weights are floats.")
    shapes = {key: tuple(adapter.tensors[source].shape) for source, keys in adapter.members.items() for key in keys}
    shapes.update({key: spec.shape for key, spec in adapter.dropped.items()})
    truncated = truncated_keys(adapter.plan)
    first_of_kind: dict[tuple[str, str, int], tuple[str, tuple]] = {}
    for key, shape in shapes.items():
        module = lora_module(key, config)
        if module is None:
            continue  # a modules_to_save weight: its shape is the base model's, checked when loading onto it
        if len(shape) != 2 or not all(type(n) is int and 0 < n <= MAX_WIDTH for n in shape):
            raise CompactFormatError(
                f"{where} gives {key!r} the shape {list(shape)}; a LoRA weight is a matrix of widths 1 to "
                f"{MAX_WIDTH:,}. Export the adapter again."
            )
        found = shape[0] if key.endswith(LORA_SUFFIXES[0]) else shape[1]
        if key in truncated:
            rank = adapter.plan.dropped_rank
            says = f"its plan truncates {module!r} to rank {rank} (dropped_rank), all a compact adapter stores of it"
        else:
            rank = module_rank(config.r, config.rank_pattern, module)
            says = f"its PEFT config gives {module!r} rank {rank} (r or rank_pattern)"
        if found != rank:
            raise CompactFormatError(
                f"{where}: {key!r} has rank {found}, but {says}; the plan, the config and the weights come from "
                "different adapters. Export it again."
            )
        kind = adapter.plan.kinds.get(module)
        if kind is not None:
            other, other_shape = first_of_kind.setdefault((kind, key.removeprefix(module), rank), (key, shape))
            if other_shape != shape:
                raise CompactFormatError(
                    f"{where}: {key!r} has shape {list(shape)}, but {other!r} of the same kind ({kind}) and rank has "
                    f"{list(other_shape)}; the modules of one kind have one shape. Export the adapter again."
                )


def check_truncation(
    config: LoraConfig, plan: DropPlan, where: str, error: type[ValueError] = CompactFormatError
) -> None:
    """Mode "truncate": refuse a plan whose `dropped_rank` k is not below a truncated module's rank r, and a config
    that does not scale every truncated module as a rank-k LoRA.

    The adapter's config is the model's, at rank r everywhere: what PEFT builds from it computes the truncated
    modules' LoRA only with the `alpha_pattern` entry LoraDropCallback records for each of them, the `lora_alpha`
    that makes PEFT's rank-r scaling the rank-k one. It must be the first key PEFT finds for the module, and its
    value the one the user's own `lora_alpha` (or `alpha_pattern`) gives.
    """
    if plan.mode != "truncate":
        return
    from peft.utils.other import get_pattern_key

    from loradrop_trainer.truncate import alpha_at_rank

    k, ours = plan.dropped_rank, recorded_alpha_keys(plan)
    theirs = {key: value for key, value in config.alpha_pattern.items() if key not in ours}
    for key, name in ours.items():
        r, short = module_rank(config.r, config.rank_pattern, name), name.removeprefix(PEFT_PREFIX)
        if k >= r:
            raise error(
                f"{where}: its plan truncates {name!r} to rank {k} (dropped_rank), but its PEFT config gives that "
                f"module rank {r}; truncation keeps fewer ranks than r. The plan and the config come from different "
                "adapters: export the adapter again."
            )
        alpha = theirs.get(get_pattern_key(theirs.keys(), short), config.lora_alpha)
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
            f"{where}: its plan truncates {name!r} to rank {k}, but the alpha_pattern of its PEFT config {found}; "
            f"LoraDropCallback records {key!r}: {wanted!r} there at the switch, so that PEFT scales the rank-{r} "
            f"module as a rank-{k} LoRA. The config was saved before the switch or by another run than the plan's: "
            "export the adapter again from the model (or a checkpoint) saved after the switch, with the plan of "
            "the same run."
        )


# The dtypes adapter weights are trained and saved in; others (float8, integers) are refused before any arithmetic,
# since torch implements neither comparison nor isfinite for some of them.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_weights(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise `CompactFormatError` for the first tensor of an unsupported dtype or with NaN or infinite values."""
    for key, tensor in tensors.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            raise CompactFormatError(
                f"{where} stores {key!r} as {tensor.dtype}; adapter weights are float32, bfloat16, float16 or float64. "
                "Save the adapter in one of those."
            )
        if not bool(torch.isfinite(tensor).all()):
            raise CompactFormatError(
                f"{where} stores NaN or infinite values in {key!r} (not finite); the model it came from had diverged."
            )


def _is_float_dtype(name: object) -> bool:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point
