"""The README.md model card of a compact adapter: Hub metadata, what was pruned, how it was trained, how to load it.

The card is rendered from the adapter alone (no dates, no paths of the machine that wrote it), so saving the same
adapter twice gives the same bytes and a re-push uploads nothing. The base model appears (in the metadata, the title
and the snippets) only as a Hub id.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from loradrop_trainer.peft_keys import PEFT_PREFIX
from loradrop_trainer.report import plan_table

from .base_model import names_local_path, recorded_base
from .format import CompactAdapter

TAGS = ("lora", "lora-drop", "peft")

_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
_SETTINGS = (  # (LoraDropConfig field, label, shown when the field is None)
    ("alpha", "alpha (fraction of steps collecting importance)", "-"),
    ("threshold", "threshold T (cumulative importance kept)", "-"),
    ("mode", "mode", "-"),
    ("shared_init", "shared LoRA initialisation", "-"),
    ("min_kept", "min kept per kind", "-"),
    ("target", "modules taking part", "all"),
    ("exclude", "modules left out", "none"),
)
_LORA_SETTINGS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias")
_TEMPLATE = """---
{{ card_data }}
---

# LoRA-drop adapter{% if base_model %} for {{ base_model }}{% endif %}

{{ intro }}

## Size

{{ size }}

## Plan

{{ plan }}

## Training

{{ settings }}

![LoRA-drop importance by layer and kind]({{ chart_file }})

## How to load

{{ how_to_load }}
"""


def model_card(adapter: CompactAdapter, chart_file: str) -> ModelCard:
    """The model card of `adapter`, whose importance chart is the file `chart_file` next to it.

    Its metadata (library_name, base_model, tags, license) is huggingface_hub's `ModelCardData`, and the card is
    built and saved as PEFT builds its own (`ModelCard.from_template`, `card.save`).
    """
    base = recorded_base(adapter.peft_config)
    base = None if base is None or names_local_path(base) else base  # a local path means nothing to readers
    data = ModelCardData(
        library_name="peft", base_model=base, tags=list(TAGS), license=adapter.plan_extra.get("license")
    )
    return ModelCard.from_template(
        data,
        template_str=_TEMPLATE,
        intro=_intro(adapter),
        size=_size_table(adapter),
        plan=_plan_tables(adapter),
        settings=_settings_table(adapter),
        chart_file=chart_file,
        how_to_load=_how_to_load(adapter, base),
    )


def _intro(adapter: CompactAdapter) -> str:
    plan = adapter.plan
    rest = {
        "share": "share one LoRA per kind",
        "drop": "have their LoRA removed",
        "truncate": f"are truncated to rank {plan.dropped_rank}, each keeping its own LoRA cut by SVD at the switch",
    }[plan.mode]
    patterned = ", or their rank_pattern entry" if adapter.peft_config.get("rank_pattern") else ""
    own = f" at their full rank (r={adapter.peft_config.get('r')}{patterned})" if plan.mode == "truncate" else ""
    return (
        f"A LoRA adapter pruned with [LoRA-drop](https://arxiv.org/abs/2402.07721): {len(plan.kept)} of "
        f"{len(plan.kinds)} LoRA modules keep their own weights{own}, the other {len(plan.dropped)} {rest} "
        f"(mode `{plan.mode}`). It is stored in the `loradrop` compact format, version {adapter.format_version}."
    )


def _size_table(adapter: CompactAdapter) -> str:
    ratio = adapter.stored_bytes / adapter.plain_bytes if adapter.plain_bytes else 0.0
    truncate = adapter.plan.mode == "truncate"
    table = (
        "| | LoRA parameters | weight bytes |\n|---|---:|---:|\n"
        f"| {'unpruned' if truncate else 'plain'} PEFT adapter | {adapter.plain_params:,} | {adapter.plain_bytes:,} |\n"
        f"| this compact adapter | {adapter.stored_params:,} | {adapter.stored_bytes:,} ({ratio:.1%}) |"
    )
    if adapter.other_params:
        table += (
            f"\n\nBoth also hold {adapter.other_params:,} parameters of modules trained in full (`modules_to_save`)."
        )
    if truncate:
        table += (
            f"\n\nThe plain PEFT adapter `loradrop expand` writes is as small as this one: it gives the truncated "
            f"modules rank {adapter.plan.dropped_rank} through `rank_pattern`."
        )
    return table


def _plan_tables(adapter: CompactAdapter) -> str:
    plan = adapter.plan
    modules = ["| module | kind | importance | LoRA |", "|---|---|---:|---|"]
    for name, kind in plan.kinds.items():
        if name in plan.kept:
            status = "own"
        elif plan.mode == "drop":
            status = "dropped"
        elif plan.mode == "truncate":
            status = f"truncated to rank {plan.dropped_rank}"
        elif plan.source_of(name) == name:
            status = f"shared: its LoRA serves the {len(plan.shared[kind])} modules of its group"
        else:
            status = f"shared: uses the LoRA of `{_short(plan.source_of(name))}`"
        modules.append(f"| `{_short(name)}` | {kind} | {plan.importance[name]:.4f} | {status} |")
    return (
        "Importance is each module's share of the summed squared LoRA output over the first steps (normalised to 1); "
        f"the most important modules were kept until their importance reached {plan.threshold}.\n\n"
        + plan_table(plan)
        + "\n\n<details><summary>Every module</summary>\n\n"
        + "\n".join(modules)
        + "\n\n</details>"
    )


def _settings_table(adapter: CompactAdapter) -> str:
    plan, config = adapter.plan, adapter.plan_extra.get("config") or {}
    rows = ["| setting | value |", "|---|---|"]
    rows += [
        f"| LoRA-drop {label} | {none if config[key] is None else _value(config[key])} |"
        for key, label, none in _SETTINGS
        if key in config
    ]
    if "threshold" not in config:
        rows.append(f"| LoRA-drop threshold T | {plan.threshold} |")
    if plan.mode == "truncate":
        rows.append(f"| LoRA-drop dropped_rank (rank of truncated modules) | `{plan.dropped_rank}` |")
    if plan.step is not None:
        rows.append(f"| switch at optimizer step | {plan.step} |")
    rows += [f"| {key} | {_value(adapter.peft_config[key])} |" for key in _LORA_SETTINGS if key in adapter.peft_config]
    return "\n".join(rows)


def _how_to_load(adapter: CompactAdapter, base: str | None) -> str:
    auto = _AUTO_CLASSES.get(str(adapter.peft_config.get("task_type")), "AutoModel")
    base_id = base or "<base model id>"
    again = (
        f"the model as trained, truncated modules at rank r with zeros past rank {adapter.plan.dropped_rank}; "
        "`is_trainable=True` continues training at the same ranks"
        if adapter.plan.mode == "truncate"
        else "ties the shared modules again; `is_trainable=True` continues training with the same tying"
    )
    plain = (
        " (truncated modules at their rank through `rank_pattern`; its logits agree with the trained model's up to "
        "float32 rounding)"
        if adapter.plan.mode == "truncate"
        else ""
    )
    return (
        f"With `loradrop` ({again}):\n\n"
        "```python\n"
        f"from transformers import {auto}\n"
        "from hub_export import load_from_hub\n\n"
        f'base = {auto}.from_pretrained("{base_id}")\n'
        'model = load_from_hub(base, "<this repo id>")  # or load_compact(base, "<local directory>")\n'
        "```\n\n"
        f"With plain PEFT, expand the adapter first (`loradrop expand hf://<this repo id> <output directory>`{plain}), "
        "or load the `peft` subfolder if the repo was pushed with `--expanded`:\n\n"
        "```python\n"
        "from peft import PeftModel\n"
        f"from transformers import {auto}\n\n"
        f'base = {auto}.from_pretrained("{base_id}")\n'
        'model = PeftModel.from_pretrained(base, "<this repo id>", subfolder="peft")\n'
        "```"
    )


def _short(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) or "-"
    return "-" if value is None else f"`{value}`"
