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
- patterns: every regular expression PEFT will match against module names (`check_patterns`) is one whose matching
  time is bounded, their number is bounded by the adapter's LoRA modules, and every `rank_pattern` / `alpha_pattern`
  key matches one of them (`check_entries`);
- shapes: matrices whose rank is the one the config gives the module (``r`` or ``rank_pattern``), or the plan's
  ``dropped_rank`` k for a module it truncates (mode "truncate"), one shape per kind and rank, widths bounded by
  `MAX_WIDTH`, and what is allocated without being stored bounded by what is stored (`_check_unstored`); dtypes
  floating point; weights finite;
- truncation (mode "truncate"): k is below every truncated module's rank r, and the config's ``alpha_pattern`` has,
  first among the keys that match the module, the entry LoraDropCallback records for it, with the ``lora_alpha``
  that scales it as a rank-k LoRA (the mode's `check_config`, `hub_export.modes`).

What needs the base model (do the modules exist, are the widths theirs) is checked by `hub_export.loader`. PEFT is
imported by the checks that parse the config as PEFT does, when they run: `check_format`, the part that reads the
config's own fields and needs no PEFT, is what `loradrop inspect` runs, in a fraction of the time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from loradrop_trainer.peft_keys import LORA_SUFFIXES, PEFT_PREFIX, is_saved_module

from .errors import CompactFormatError
from .format import CompactAdapter, split_key
from .modes import export_mode
from .truncation import module_value, rank_axis, truncated_keys

try:
    from re import _parser as regex_parser  # Python 3.11+: the parser `re.compile` itself uses
except ImportError:  # Python 3.10
    import sre_parse as regex_parser

if TYPE_CHECKING:
    from peft import LoraConfig

    from loradrop_trainer import DropPlan

# Wider than any layer of any released model; bounds what expanding a crafted "dropped" entry may allocate.
MAX_WIDTH = 2**20
# Longer than any module name of any released model: regular expressions are matched against these names.
MAX_NAME = 256
# PEFT matches its patterns with Python's backtracking `re`, in which "(a+)+" takes exponential time on a name that
# nearly matches. A pattern whose every repetition ("*", "+", "{m,n}") repeats a single character, with no
# backreference, takes at most about n^k steps on a name of n characters for k repetitions; untrusted patterns are
# held to that subset, with k at most MAX_REPEATS as PEFT matches them (`_PEFT_WRAPPERS`) and at most MAX_REPEATING
# patterns with repetitions of their own in one config. Names are at most MAX_NAME characters, so matching one name
# takes at most about a millisecond.
MAX_REPEATS = 3
MAX_REPEATING = 16
# Longer than any escaped module name (`MAX_NAME`, each character escaped at most once) and any pattern users write.
MAX_PATTERN = 1024
# PEFT matches the rank_pattern and alpha_pattern keys against every module it gives LoRA until one matches, about
# 5 us a match while `re` caches every key (512 patterns), ten times that once there are more: 3,000 keys on 28
# modules took 20 s. A config names each LoRA module at most twice in one field (its own key, loradrop's entry for a
# truncated module), beside a user's few entries, and PEFT ignores a key that matches no LoRA module: readers hold
# configs to that (`check_entries`), and to at most MAX_KEY_MATCHES matches in all: about 10 s within `re`'s cache,
# two minutes past it, which only adapters of hundreds of truncated modules reach (Llama-3-70B with LoRA on all
# seven kinds at the default plan: about 840 keys, 470,000 matches; a legitimate adapter is never refused for it).
ENTRIES_PER_MODULE = 2
MAX_OTHER_ENTRIES = 64
MAX_KEY_MATCHES = 2**21  # pattern keys times LoRA modules, the most regular-expression matches PEFT makes for them
# How PEFT embeds each field's patterns in the expression it matches (tuners_utils.check_target_module_exists,
# other.get_pattern_key); "{}" is the pattern.
_PEFT_WRAPPERS = {
    "target_modules": "{}",
    "exclude_modules": "{}",
    "modules_to_save": r"(^|.*\.){}($|\..*)",
    "layers_pattern": r"(?:^|.*?\.){}\.(?P<idx>\d+)\.",
    "rank_pattern": r"(.*\.)?({})$",
    "alpha_pattern": r"(.*\.)?({})$",
}
_PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")
_ONE_CHARACTER = {getattr(regex_parser, op) for op in ("LITERAL", "NOT_LITERAL", "ANY", "IN", "CATEGORY")}
_REPEATS = {
    getattr(regex_parser, op) for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(regex_parser, op)
}
_GROUPS = {getattr(regex_parser, op) for op in ("ASSERT", "ASSERT_NOT", "ATOMIC_GROUP") if hasattr(regex_parser, op)}
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
    check_entries(adapter.peft_config, lora_modules(adapter), f"The PEFT config of {where}")
    config = lora_config(adapter.peft_config, f"The PEFT config of {where}")  # its fields: `check_lora_fields`
    check_names([*adapter.plan.kinds, *adapter.members, *adapter.dropped], where)
    _check_keys(adapter, config, where)
    _check_contents(adapter, where)
    export_mode(adapter.plan).check_config(config, adapter.plan, where)
    _check_shapes(adapter, config, where)
    return config


def check_format(adapter: CompactAdapter, where: str) -> None:
    """The checks that need no PEFT: the config's ranks and scalings as its own fields give them, the module names'
    lengths, the plan against the stored tensors module by module, the sizes, and the weights' dtypes and values.
    Enough to show the adapter (`loradrop inspect`); `check_adapter` runs them with the rest before anything uses
    it."""
    check_entries(adapter.peft_config, lora_modules(adapter), f"The PEFT config of {where}")
    check_lora_fields(adapter.peft_config, f"The PEFT config of {where}")
    check_names([*adapter.plan.kinds, *adapter.members, *adapter.dropped], where)
    _check_contents(adapter, where)


def _check_contents(adapter: CompactAdapter, where: str) -> None:
    _check_mapping(adapter, where)
    _check_unstored(adapter, where)
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
    integers from 1 to `MAX_WIDTH`, `lora_alpha` and `alpha_pattern` values finite numbers, every pattern a regular
    expression PEFT can match in bounded time (`check_patterns`). Read from the config's own fields, so it needs no
    PEFT."""
    ranks = _patterned(data, "r", "rank_pattern", where)
    alphas = _patterned(data, "lora_alpha", "alpha_pattern", where)
    check_patterns(data, where)
    if not all(type(r) is int and 0 < r <= MAX_WIDTH for r in ranks):
        raise CompactFormatError(f"{where} gives LoRA ranks {ranks}; ranks are integers from 1 to {MAX_WIDTH:,}.")
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in alphas):
        raise CompactFormatError(f"{where} gives lora_alpha values {alphas}; they must be finite numbers.")


def _patterned(data: Mapping[str, Any], field: str, pattern: str, where: str) -> list[Any]:
    values = data.get(pattern, {})
    if not isinstance(values, dict):
        raise CompactFormatError(f"{where} gives {pattern}={values!r}; it must map module names to values.")
    return [data.get(field), *values.values()]


def check_patterns(data: Mapping[str, Any], where: str) -> None:
    """Refuse a regular expression of the PEFT config `data` that PEFT (and `module_value`, `targets`) could take
    minutes or more to match against a module name: one outside the subset `MAX_REPEATS` describes, or more of them
    than `MAX_REPEATING`. A list of module names, which PEFT matches without regular expressions, is never refused."""
    repeating = 0
    for field, pattern in _patterns(data):
        if isinstance(pattern, str) and len(pattern) > MAX_PATTERN:
            raise CompactFormatError(
                f"{where} gives {field} a pattern of {len(pattern):,} characters ({pattern[:40]!r}...); patterns are "
                f"at most {MAX_PATTERN:,}. Name the modules (a list), or use a shorter pattern."
            )
        try:
            own = _repetitions(pattern)
            total = _repetitions(_PEFT_WRAPPERS[field].format(pattern))
        except (RecursionError, MemoryError) as err:
            raise CompactFormatError(
                f"{where} gives {field} the pattern {pattern[:40]!r}..., which nests groups too deeply to be parsed "
                f"({type(err).__name__}). Name the modules (a list), or use a simpler pattern."
            ) from err
        except (re.error, TypeError) as err:
            raise CompactFormatError(
                f"{where} gives {field} the pattern {pattern!r}, which is no regular expression ({err}); PEFT matches "
                "it against module names."
            ) from err
        except ValueError as err:
            raise CompactFormatError(
                f"{where} gives {field} the pattern {pattern!r}, which {err}: matching such a pattern against a module "
                "name can take hours. Name the modules (a list), or use a pattern whose '*', '+' and '{m,n}' each "
                "repeat a single character."
            ) from err
        if total > MAX_REPEATS:
            raise CompactFormatError(
                f"{where} gives {field} the pattern {pattern!r}, with {own} repetitions ('*', '+', '{{m,n}}') where "
                f"at most {MAX_REPEATS - total + own} are accepted (each multiplies the time matching a module name "
                "takes). Name the modules (a list), or use a simpler pattern."
            )
        repeating += own > 0
    if repeating > MAX_REPEATING:
        raise CompactFormatError(
            f"{where} holds {repeating} regular expressions with repetitions ('*', '+', '{{m,n}}'); at most "
            f"{MAX_REPEATING} are accepted (each is matched against every module name). Name the modules instead."
        )


def lora_modules(adapter: CompactAdapter) -> set[str]:
    """The PEFT names of the adapter's LoRA modules: those it stores LoRA weights for, or lists as dropped."""
    keys = [*(key for keys in adapter.members.values() for key in keys), *adapter.dropped]
    return {module for module in map(_lora_weight_module, keys) if module is not None}


def check_entries(data: Mapping[str, Any], modules: Collection[str], where: str) -> None:
    """Refuse a PEFT config whose lists and pattern keys cost PEFT more matching than the LoRA `modules` (PEFT names)
    justify (`check_counts`), or with a `rank_pattern` / `alpha_pattern` key that matches none of them: PEFT never
    uses such a key, and only a crafted file holds thousands. Needs no PEFT."""
    check_counts(data, modules, where)
    check_patterns(data, where)  # each key a bounded regular expression before it meets a name
    used = matched_keys_only(data, modules)
    for field in _PATTERN_FIELDS:
        unused = [key for key in _pattern_keys(data, field) if key not in used.get(field, {})]
        if unused:
            raise CompactFormatError(
                f"{where} gives {field} the key {unused[0]!r}, which matches none of its {len(modules):,} LoRA "
                "modules; PEFT never uses such a key, and a crafted file holds thousands. Export the adapter again."
            )


def check_counts(data: Mapping[str, Any], modules: Collection[str], where: str) -> None:
    """Bound the entries of the config's lists and pattern fields by the number of LoRA `modules`, before any is
    matched (see `ENTRIES_PER_MODULE`)."""
    limit = ENTRIES_PER_MODULE * len(modules) + MAX_OTHER_ENTRIES
    for field in ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", *_PATTERN_FIELDS):
        value = data.get(field)
        count = len(value) if isinstance(value, (list, dict)) else 0
        if count > limit:
            raise CompactFormatError(
                f"{where} gives {field} {count:,} entries; an adapter of {len(modules):,} LoRA modules has at most "
                f"{limit:,} (PEFT matches each against every module). Export the adapter again."
            )
    keys = sum(len(_pattern_keys(data, field)) for field in _PATTERN_FIELDS)
    if keys * len(modules) > MAX_KEY_MATCHES:
        raise CompactFormatError(
            f"{where} gives {keys:,} rank_pattern and alpha_pattern keys for {len(modules):,} LoRA modules; PEFT "
            f"matches each key against every module, which past {MAX_KEY_MATCHES:,} matches takes minutes. Export the "
            "adapter again."
        )


def matched_keys_only(data: Mapping[str, Any], modules: Collection[str]) -> dict[str, Any]:
    """`data` without the `rank_pattern` and `alpha_pattern` keys that match none of the LoRA `modules` (PEFT
    names), which PEFT never uses; the writers drop them, readers refuse them. Its keys must have passed
    `check_counts` and `check_patterns`."""
    names = [name.removeprefix(PEFT_PREFIX) for name in modules]
    used = dict(data)
    for field in _PATTERN_FIELDS:
        if isinstance(data.get(field), dict):
            matchers = {key: re.compile(_PEFT_WRAPPERS[field].format(key)).match for key in data[field]}
            used[field] = {key: data[field][key] for key, match in matchers.items() if any(map(match, names))}
    return used


def _pattern_keys(data: Mapping[str, Any], field: str) -> list[Any]:
    """The keys of the pattern field `field` of `data` (none unless it is a mapping, which `check_lora_fields`
    requires)."""
    value = data.get(field)
    return list(value) if isinstance(value, dict) else []


def _patterns(data: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """`(field, pattern)` for every regular expression of the PEFT config `data` that PEFT matches against module
    names."""
    for field in ("target_modules", "exclude_modules"):
        value = data.get(field)
        if isinstance(value, str):
            yield field, value
    for field in ("modules_to_save", "layers_pattern"):
        value = data.get(field)
        for pattern in [value] if isinstance(value, str) else value or ():
            yield field, pattern
    for field in _PATTERN_FIELDS:
        for key in _pattern_keys(data, field):
            yield field, key


def _repetitions(pattern: str) -> int:
    """How many repetitions `pattern` holds; `ValueError` if one repeats more than a single character or the pattern
    refers back to a group, `re.error` (or `TypeError`) if it is no regular expression."""
    if not isinstance(pattern, str):
        raise TypeError(f"a {type(pattern).__name__}, not a string")
    return sum(1 for _ in _repeats(regex_parser.parse(pattern)))


def _repeats(items: Any) -> Iterator[None]:
    """One item per repetition of a parsed pattern (a `re` parser's subpattern), checking each."""
    for op, value in items:
        if op in _REPEATS:
            _, high, body = value
            if high > 1 and not (len(body) == 1 and body[0][0] in _ONE_CHARACTER):
                raise ValueError("repeats more than a single character (as the nested quantifiers of '(a+)+' do)")
            if high > 1:
                yield None
            else:
                yield from _repeats(body)
        elif op in (regex_parser.GROUPREF, regex_parser.GROUPREF_EXISTS):
            raise ValueError("refers back to a group")
        elif op == regex_parser.SUBPATTERN:
            yield from _repeats(value[-1])
        elif op == regex_parser.BRANCH:
            for branch in value[1]:
                yield from _repeats(branch)
        elif op in _GROUPS:  # lookarounds hold (direction, subpattern), atomic groups the subpattern itself
            yield from _repeats(value[1] if isinstance(value, tuple) else value)


def targets(config: LoraConfig, module: str) -> bool:
    """Whether PEFT puts LoRA on `module` (a PEFT module name) under `config`."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return module.startswith(PEFT_PREFIX) and bool(check_target_module_exists(config, module.removeprefix(PEFT_PREFIX)))


def lora_module(key: str, config: LoraConfig) -> str | None:
    """The PEFT module name of a LoRA A/B weight key of a module `config` targets; None for any other key."""
    parts = split_key(key)
    return parts[0] if parts is not None and parts[1] in LORA_SUFFIXES and targets(config, parts[0]) else None


def _lora_weight_module(key: str) -> str | None:
    """The module name of a LoRA A/B weight key, targeted or not; None for any other key."""
    parts = split_key(key)
    return parts[0] if parts is not None and parts[1] in LORA_SUFFIXES else None


def is_saved_module_weight(key: str, config: LoraConfig) -> bool:
    """Whether `key` is a weight of a module (or of a submodule of one) that `config` lists in modules_to_save,
    matched at module boundaries as PEFT matches them (`is_saved_module`)."""
    if not key.startswith(PEFT_PREFIX):
        return False
    path = key.split(".")[:-1]
    modules = [".".join(path[:i]) for i in range(len(PEFT_PREFIX.split(".")), len(path) + 1)]
    return any(is_saved_module(module, entry) for module in modules for entry in config.modules_to_save or ())


def check_names(names: Iterable[str], where: str) -> None:
    """Bound the module names patterns are matched against, before any is (`MAX_NAME`)."""
    for name in names:
        if len(name) > MAX_NAME:
            raise CompactFormatError(
                f"{where} names a module of {len(name):,} characters ({name[:40]!r}...); module names are at most "
                f"{MAX_NAME}. Export the adapter again."
            )


def _check_keys(adapter: CompactAdapter, config: LoraConfig, where: str) -> None:
    for name in adapter.plan.kinds:
        if not targets(config, name):
            raise CompactFormatError(
                f"{where}: its plan names {name!r}, a module its PEFT config puts no LoRA on; the plan and the config "
                "come from different adapters. Export the adapter again."
            )
    # An entry of modules_to_save that stores no weight is not checked here: PEFT lists heads the model may not have
    # (every sequence-classification adapter names `classifier`, `score` and, since PEFT 0.22, `pre_classifier`), and
    # only the base model tells which; the loader refuses an entry that matches a module and stores none of its weights.
    stored = [key for keys in adapter.members.values() for key in keys]
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
    if name in plan.truncated:
        return f"the plan gives {name!r} its own LoRA, truncated to rank {plan.dropped_rank}"
    source = plan.source_of(name)
    return f"the plan drops the LoRA of {name!r}" if source is None else f"the plan ties {name!r} to {source!r}"


def _check_shapes(adapter: CompactAdapter, config: LoraConfig, where: str) -> None:
    """Ranks and kinds of the LoRA weights' shapes, which `_check_unstored` already checked are bounded matrices."""
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
        found = shape[0] if key.endswith(LORA_SUFFIXES[0]) else shape[1]
        if key in truncated:
            rank = adapter.plan.dropped_rank
            says = f"its plan truncates {module!r} to rank {rank} (dropped_rank), all a compact adapter stores of it"
        else:
            rank = module_value(config.r, config.rank_pattern, module)
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


def _check_matrix(key: str, shape: tuple, where: str) -> None:
    if len(shape) != 2 or not all(type(n) is int and 0 < n <= MAX_WIDTH for n in shape):
        raise CompactFormatError(
            f"{where} gives {key!r} the shape {list(shape)}; a LoRA weight is a matrix of widths 1 to {MAX_WIDTH:,}. "
            "Export the adapter again."
        )


def _check_unstored(adapter: CompactAdapter, where: str) -> None:
    """Refuse sizes that expanding or loading the adapter would allocate without the weights file holding them.

    Beyond copies of the stored tensors, `expand_to_peft` allocates the LoRA of every dropped module (mode "drop", at
    the shapes the manifest lists) and `load_compact` pads every truncated module back to the rank r the config gives
    it (mode "truncate"); `inspect` reports both. Without a bound, an 85 KB file could list one dropped module of
    shape [1048576, 1048576] and make `expand` allocate 4 TiB. So the stored LoRA weights bound the rest: no module's
    rank is above the larger of its two widths (past that a LoRA factors nothing), and a dropped module's rank and
    widths are at most those the stored weights show (the modules of a kind that stores any have its shape exactly,
    `_check_shapes`; a kind dropped whole, such as narrower key/value projections, fits within the others). Read
    from the config's own fields (`check_lora_fields` checked them), so `inspect` runs it without PEFT.
    """
    stored = {key: tuple(t.shape) for key, t in adapter.tensors.items() if _lora_weight_module(key)}
    lora_shapes = [*stored.items(), *((key, tuple(spec.shape)) for key, spec in adapter.dropped.items())]
    for key, shape in lora_shapes:
        _check_matrix(key, shape, where)
    truncated = truncated_keys(adapter.plan)
    widest = max((shape[1 - rank_axis(key)] for key, shape in stored.items()), default=0)
    highest = max((shape[rank_axis(key)] for key, shape in stored.items() if key not in truncated), default=0)
    for key, spec in adapter.dropped.items():
        rank, width = spec.shape[rank_axis(key)], spec.shape[1 - rank_axis(key)]
        if rank > highest or width > widest:
            raise CompactFormatError(
                f"{where} lists dropped {key!r} with shape {list(spec.shape)}, beyond any LoRA weight it stores (rank "
                f"at most {highest}, widths at most {widest}); expanding it would allocate what the file does not "
                "show. Export the adapter again."
            )
    widths: dict[str, dict[int, int]] = {}  # module -> {axis: width}, from A's inputs and B's outputs
    for key, shape in lora_shapes:
        module = _lora_weight_module(key)
        if module is not None:
            widths.setdefault(module, {})[rank_axis(key)] = shape[1 - rank_axis(key)]
    config = adapter.peft_config
    for module, sides in widths.items():
        rank = module_value(config["r"], config.get("rank_pattern") or {}, module)
        if rank > max(sides.values()):
            raise CompactFormatError(
                f"{where}: its PEFT config gives {module!r} rank {rank}, above both its widths "
                f"({' and '.join(str(w) for w in sides.values())}); a LoRA's rank is at most the larger of the two, "
                "and loading it would allocate what the file does not hold. Export the adapter again."
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
