"""The README.md model card of a compact adapter: Hub metadata, what was pruned, how it was trained, how to load it.

The card is rendered from the adapter alone (no dates, no paths of the machine that wrote it), so saving the same
adapter twice gives the same bytes and a re-push uploads nothing. The base model appears (in the metadata, the title
and the snippets) only as a Hub id. A compact adapter directory gets the card of that directory; a Hub repo (and a
pull of one) the card of the repo, whose snippets name the repo by its id and load its root with plain PEFT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from loradrop_trainer.modes import mode_of
from loradrop_trainer.peft_keys import PEFT_PREFIX
from loradrop_trainer.report import plan_settings, plan_table

from .base_model import names_local_path, recorded_base
from .format import CompactAdapter
from .forms import VLLM_MAX_RANKS
from .modes import export_mode

if TYPE_CHECKING:
    from loradrop_trainer import DropPlan

TAGS = ("lora", "lora-drop", "peft")
# `hub_export` is the `loradrop` package's (setup.py), which is installed from a clone of its repository.
INSTALL = "pip install .  # in a clone of the loradrop repository: installs the loradrop package, with hub_export"

# The transformers class that loads the base model of an adapter of each PEFT task_type (the snippets; the merged form).
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
_SETTINGS = (  # (LoraDropConfig field, label, shown when the field is None)
    ("normalize", "normalize (over which modules the threshold applies)", "-"),
    ("score", "score (what a scored micro-batch measures)", "-"),
    ("aggregate", "aggregate (how scored micro-batches add up)", "-"),
    ("restart", "restart (LoRA re-initialised at the switch)", "-"),
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


def model_card(adapter: CompactAdapter, chart_file: str, repo_id: str | None = None) -> ModelCard:
    """The model card of `adapter`, whose importance chart is the file `chart_file` (a path relative to the card).

    Without `repo_id`, the card of a compact adapter directory; with it, the card of the Hub repo `repo_id`, which
    holds the plain PEFT adapter at its root and the compact one in ``loradrop/`` (`hub_export.hub`). Its metadata
    (library_name, base_model, tags, license) is huggingface_hub's `ModelCardData`, and the card is built and saved as
    PEFT builds its own (`ModelCard.from_template`, `card.save`).
    """
    base = recorded_base(adapter.peft_config)
    base = None if base is None or names_local_path(base) else base  # a local path means nothing to readers
    data = ModelCardData(
        library_name="peft", base_model=base, tags=list(TAGS), license=adapter.plan_extra.get("license")
    )
    return ModelCard.from_template(
        data,
        template_str=_TEMPLATE,
        intro=_intro(adapter, repo_id),
        size=_size_table(adapter, repo_id),
        plan=_plan_tables(adapter),
        settings=_settings_table(adapter),
        chart_file=chart_file,
        how_to_load=_how_to_load(adapter, base, repo_id) if repo_id else _how_to_load_directory(adapter, base),
    )


def _intro(adapter: CompactAdapter, repo_id: str | None) -> str:
    plan, mode = adapter.plan, export_mode(adapter.plan)
    patterned = ", or their rank_pattern entry" if adapter.peft_config.get("rank_pattern") else ""
    own = f" at their full rank (r={adapter.peft_config.get('r')}{patterned})" if _truncates(plan) else ""
    pruned = (
        f"A LoRA adapter pruned with [LoRA-drop](https://arxiv.org/abs/2402.07721): {len(plan.kept)} of "
        f"{len(plan.kinds)} LoRA modules keep their own weights{own}, the other {len(plan.dropped)} "
        f"{mode.dropped_clause(plan)} (mode `{plan.mode}`)."
    )
    if repo_id is None:
        return f"{pruned} It is stored in the `loradrop` compact format, version {adapter.format_version}."
    small = (
        "; in `rank_pattern/` as the smallest plain PEFT adapter, truncated modules at their rank through "
        "`rank_pattern`, which PEFT and llama.cpp read (vLLM does not)"
        if mode.rank_pattern_form
        else ""
    )
    return (
        f"{pruned} This repo holds it at its root as a plain PEFT adapter with one rank for every module and each "
        "module's scaling folded into its weights (no `rank_pattern` or `alpha_pattern`), which PEFT and "
        "`merge_and_unload` compute as trained, and so do the engines that ignore those fields (vLLM, llama.cpp) "
        f"where they serve it (How to load){small}; "
        f"and in `loradrop/` in the `loradrop` compact format, version {adapter.format_version}, which stores each "
        "shared or truncated LoRA once (and nothing of a dropped one) and loads the model as it was trained."
    )


def _size_table(adapter: CompactAdapter, repo_id: str | None) -> str:
    ratio = adapter.stored_bytes / adapter.plain_bytes if adapter.plain_bytes else 0.0
    smaller = export_mode(adapter.plan).rank_pattern_form
    plain = "unpruned PEFT adapter" if smaller else "plain PEFT adapter" + (" (this repo's root)" if repo_id else "")
    compact = "compact adapter (`loradrop/`)" if repo_id else "this compact adapter"
    table = (
        "| | LoRA parameters | weight bytes |\n|---|---:|---:|\n"
        f"| {plain} | {adapter.plain_params:,} | {adapter.plain_bytes:,} |\n"
        f"| {compact} | {adapter.stored_params:,} | {adapter.stored_bytes:,} ({ratio:.1%}) |"
    )
    if adapter.other_params:
        table += (
            f"\n\nBoth also hold {adapter.other_params:,} parameters of modules trained in full (`modules_to_save`)."
        )
    if smaller:
        where = "in `rank_pattern/`" if repo_id else "`loradrop expand` writes"
        table += (
            f"\n\nThe plain PEFT adapter {where} is as small as the compact one: it gives the truncated modules rank "
            f"{adapter.plan.dropped_rank} through `rank_pattern`."
        )
    if repo_id:
        table += "\n\nThe uniform adapter at the root holds every module at the adapter's rank: the unpruned size."
    return table


def _plan_tables(adapter: CompactAdapter) -> str:
    plan = adapter.plan
    modules = ["| module | kind | importance | LoRA |", "|---|---|---:|---|"]
    for name, kind in plan.kinds.items():
        status = "own" if name in plan.kept else export_mode(plan).status(plan, name)
        modules.append(f"| `{_short(name)}` | {kind} | {plan.importance[name]:.4f} | {status} |")
    settings = plan_settings(plan, adapter.plan_extra.get("config"))
    return (
        "Importance is each module's share of the summed squared LoRA output over the first steps (normalised to 1); "
        f"the most important modules were kept until their importance reached {plan.threshold}. The settings that "
        f"decided the plan, and the data it rests on: `{settings}`.\n\n"
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
    if _truncates(plan):
        rows.append(f"| LoRA-drop dropped_rank (rank of truncated modules) | `{plan.dropped_rank}` |")
    if plan.step is not None:
        rows.append(f"| switch at optimizer step | {plan.step} |")
    if plan.scored is not None:
        scored = f"{plan.scored['micro_batches']:,} micro-batches, {plan.scored['tokens']:,} tokens"
        rows.append(f"| importance measured on | {scored} |")
    rows += [f"| {key} | {_value(adapter.peft_config[key])} |" for key in _LORA_SETTINGS if key in adapter.peft_config]
    return "\n".join(rows)


def _how_to_load(adapter: CompactAdapter, base: str | None, repo_id: str) -> str:
    """The repo card's snippets, naming the repo by its id: plain PEFT at the root first, then the line that serves
    it in each engine whose rules it meets (`_engine_lines`), then `hub_export`."""
    auto, base_id = _auto_class(adapter), base or "<base model id>"
    loaded = export_mode(adapter.plan).loaded_again(adapter.plan)
    small = (
        "\n\nThe smallest plain adapter, in `rank_pattern/`, loads the same way with PEFT (to float32 rounding: a "
        "rank-1 product sums in another order than a zero-padded one):\n\n"
        "```python\n"
        "from peft import PeftModel\n"
        f"from transformers import {auto}\n\n"
        f'base = {auto}.from_pretrained("{base_id}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="rank_pattern")\n'
        "```"
        if export_mode(adapter.plan).rank_pattern_form
        else ""
    )
    return (
        "The repo's root is a plain PEFT adapter that needs no `rank_pattern` or `alpha_pattern`; PEFT computes the "
        "trained model from it (and `model.merge_and_unload()` merges it into the base):\n\n"
        "```python\n"
        "from peft import PeftModel\n"
        f"from transformers import {auto}\n\n"
        f'base = {auto}.from_pretrained("{base_id}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
        "```"
        f"{small}{_engine_lines(adapter, base_id, repo_id)}\n\n"
        f"The compact adapter in `loradrop/` loads with `hub_export` ({loaded}), which comes with the "
        "`loradrop` package:\n\n"
        f"```bash\n{INSTALL}\n```\n\n"
        "```python\n"
        f"from transformers import {auto}\n\n"
        "from hub_export import load_from_hub\n\n"
        f'base = {auto}.from_pretrained("{base_id}")\n'
        f'model = load_from_hub(base, "{repo_id}")\n'
        "```\n\n"
        f"`loradrop inspect hf://{repo_id}` shows the plan and the settings; `loradrop pull {repo_id} <directory>` "
        "downloads the compact adapter and writes the plain ones again from it."
    )


def _engine_lines(adapter: CompactAdapter, base_id: str, repo_id: str) -> str:
    """The one line that serves the root in vLLM and in llama.cpp, where the adapter meets their rules: a causal LM
    with nothing trained in full (both refuse `modules_to_save`), and for vLLM a rank it accepts. Otherwise the card
    says why there is none, so it never offers a line that computes something else or fails."""
    if adapter.peft_config.get("task_type") != "CAUSAL_LM":
        return ""
    if adapter.peft_config.get("modules_to_save"):
        return (
            "\n\nvLLM and llama.cpp refuse adapters that train modules in full (`modules_to_save`), as this one does: "
            "serve it with PEFT, or merged (`loradrop expand hf://{repo} <directory> --for merged --base <base "
            "directory>`).".replace("{repo}", repo_id)
        )
    rank = adapter.uniform_rank
    vllm_rank = next((allowed for allowed in VLLM_MAX_RANKS if allowed >= rank), None)
    vllm = (
        f"\n\nvLLM (the root; it reads `lora_alpha / r` for every module):\n\n```bash\nvllm serve {base_id} "
        f"--enable-lora --max-lora-rank {vllm_rank} --lora-modules loradrop={repo_id}\n```"
        if vllm_rank is not None
        else f"\n\nvLLM serves LoRA ranks up to {VLLM_MAX_RANKS[-1]}; this adapter's is {rank}."
    )
    return (
        f"{vllm}\n\nllama.cpp (the root, downloaded; its converter reads `lora_alpha` and each tensor's rank, nothing "
        "else of the config):\n\n```bash\n"
        f"python convert_lora_to_gguf.py $(hf download {repo_id} adapter_config.json adapter_model.safetensors) "
        "--base <base model directory> "
        "--outfile adapter.gguf\n```\n\nthen `llama-cli -m <base model>.gguf --lora adapter.gguf`."
    )


def _how_to_load_directory(adapter: CompactAdapter, base: str | None) -> str:
    """The snippets of a compact adapter directory's card: `load_compact`, or plain PEFT after `loradrop expand`."""
    auto, base_id = _auto_class(adapter), base or "<base model id>"
    return (
        f"With `hub_export`, from the `loradrop` package ({export_mode(adapter.plan).loaded_again(adapter.plan)})"
        ":\n\n"
        "```python\n"
        f"from transformers import {auto}\n\n"
        "from hub_export import load_compact\n\n"
        f'base = {auto}.from_pretrained("{base_id}")\n'
        'model = load_compact(base, "<this directory>")\n'
        "```\n\n"
        "With plain PEFT, expand it first (`loradrop expand <this directory> <peft directory>`), or push it "
        "(`loradrop push <this directory> <user/name>`): the repo's root is the plain PEFT adapter, and its card "
        "shows the snippets with the repo's id. For engines that ignore `rank_pattern` and `alpha_pattern` (vLLM, "
        "SGLang, LoRAX), expand it with `--for uniform` (every module at one rank and one scaling); "
        "`--for merged --base <base model directory>` writes the merged model.\n\n"
        "```python\n"
        "from peft import PeftModel\n"
        f"from transformers import {auto}\n\n"
        f'base = {auto}.from_pretrained("{base_id}")\n'
        'model = PeftModel.from_pretrained(base, "<peft directory>")\n'
        "```"
    )


def _auto_class(adapter: CompactAdapter) -> str:
    return AUTO_CLASSES.get(str(adapter.peft_config.get("task_type")), "AutoModel")


def _truncates(plan: DropPlan) -> bool:
    """Whether the plan's dropped modules keep their own LoRA at its `dropped_rank`, which the card then states."""
    return mode_of(plan.mode).truncates


def _short(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) or "-"
    return "-" if value is None else f"`{value}`"
