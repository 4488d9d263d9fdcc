"""Mode "truncate" through hub_export: the compact adapter stores truncated modules at rank k and loads back to the
trained model exactly, the expansion is a plain PEFT adapter at the reduced size (`rank_pattern`), what does not come
from the plan's run after its switch is refused, and the model card, `loradrop inspect` and the Hub say what happened.

Two runs per module, read afterwards: a tiny Llama (r=4, truncated to rank 1) saving checkpoints around the switch,
and a tiny BERT classifier (r=4 with `rank_pattern` r=8 for `query`, a user `alpha_pattern` for `value`, truncated to
rank 2) whose classifier is saved in full (`modules_to_save`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import (
    SHARING,
    TokenDataset,
    craft_compact,
    model_logits,
    one_line_error,
    random_lora_b,
    tiny_bert,
    tiny_bert_base,
    tiny_llama,
    tiny_llama_base,
    training_args,
    tree_bytes,
)
from hub_server import DEFAULT_USER
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer

from hub_export import (
    CompactFormatError,
    PlanError,
    compact_peft_adapter,
    expand_to_peft,
    load_compact,
    load_from_hub,
    push_to_hub,
    read_compact,
    save_compact,
)
from hub_export.cli import main as loradrop
from hub_export.compact import WEIGHTS_FILE
from hub_export.format import CARD_FILE
from hub_export.validate import check_patterns
from loradrop_trainer import LoraDropCallback, build_plan, find_lora_layers, lora_kinds
from loradrop_trainer.lora_layers import lora_parameters
from loradrop_trainer.peft_keys import PEFT_PREFIX
from loradrop_trainer.reparam import reparameterise
from loradrop_trainer.report import PLAN_FILE
from loradrop_trainer.truncate import alpha_at_rank, pattern_key, rank_scaling, record_truncation

CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
REPO = f"{DEFAULT_USER}/tiny-truncate"
# Expanded logits against the trained ones, relative to the largest logit: a rank-k product in place of a zero-padded
# rank-r one sums in another float32 order (measured ~3e-7 on the tiny Llama); a wrong scaling or rank is >= 1e-2.
EXPANSION_RTOL = 1e-5


@dataclasses.dataclass
class Run:
    """A finished truncate-mode run: the trained model, its callback, the Trainer output dir and the compact export."""

    model: PeftModel
    callback: LoraDropCallback
    output_dir: Path
    compact: Path
    logits: torch.Tensor
    base: Callable[[], torch.nn.Module]


def _train(root: Path, model: PeftModel, base: Callable[[], torch.nn.Module], task: str, rank: int) -> Run:
    callback = LoraDropCallback(alpha=0.25, dropped_rank=rank, **{**SHARING, "mode": "truncate"})  # switch at step 3
    args = training_args(root, save_strategy="steps", save_steps=2, max_steps=12)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(task=task), callbacks=[callback])
    trainer.train()
    trainer.save_model()
    assert callback.plan.mode == "truncate" and callback.plan.dropped and callback.plan.kept
    compact = save_compact(model, root / "compact")
    return Run(model, callback, Path(args.output_dir), compact, model_logits(model), base)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Run:
    return _train(tmp_path_factory.mktemp("llama"), tiny_llama(), tiny_llama_base, "causal", rank=1)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Run:
    model = tiny_bert(rank_pattern={"query": 8}, alpha_pattern={"value": 16})
    return _train(tmp_path_factory.mktemp("bert"), model, tiny_bert_base, "classify", rank=2)


@pytest.fixture(params=["llama", "bert"])
def run(request) -> Run:
    return request.getfixturevalue(request.param)


def _relative_difference(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(largest absolute difference, that over the largest absolute logit)."""
    diff = float((logits - reference).abs().max())
    return diff, diff / float(reference.abs().max())


def _assert_zero_blocks(model, plan) -> None:
    """Every truncated module holds rank r with zeros past rank k; every module's leading part is not all zero."""
    layers, k = find_lora_layers(model), plan.dropped_rank
    for name in plan.dropped:
        a, b = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
        assert a.shape[0] == b.shape[1] == layers[name].r["default"] > k
        assert not a[k:].any() and not b[:, k:].any(), name
        assert a[:k].any() and b[:, :k].any(), name


# ---------------------------------------------------------------------------------------------- the compact adapter


def test_compact_round_trip_gives_the_trained_model_exactly(run, tmp_path):
    """Truncated modules are stored at rank k; load_compact rebuilds rank r with zero blocks, the trained scaling and
    the recorded alpha_pattern, so the logits are the trained ones bit for bit and saving again changes no byte."""
    plan, k = run.callback.plan, run.callback.plan.dropped_rank
    adapter = read_compact(run.compact)
    for name in plan.dropped:
        assert adapter.tensors[f"{name}.lora_A.weight"].shape[0] == k
        assert adapter.tensors[f"{name}.lora_B.weight"].shape[1] == k
    trained = find_lora_layers(run.model)
    for name in plan.kept:
        assert adapter.tensors[f"{name}.lora_A.weight"].shape[0] == trained[name].r["default"]
    alpha_pattern = adapter.peft_config["alpha_pattern"]
    assert list(alpha_pattern)[: len(plan.dropped)] == [pattern_key(name) for name in plan.dropped], "ours first"

    loaded = load_compact(run.base(), run.compact)
    torch.testing.assert_close(model_logits(loaded), run.logits, rtol=0, atol=0)
    layers = find_lora_layers(loaded)
    _assert_zero_blocks(loaded, plan)
    for name in plan.kinds:
        assert layers[name].scaling["default"] == trained[name].scaling["default"], name
    for name in plan.dropped:
        assert layers[name].scaling["default"] == rank_scaling(layers[name], "default", k)
        assert layers[name].lora_alpha["default"] == trained[name].lora_alpha["default"], "the user's lora_alpha"
    assert loaded.peft_config["default"].alpha_pattern == run.model.peft_config["default"].alpha_pattern
    assert loaded.loradrop_plan == plan
    assert tree_bytes(save_compact(loaded, tmp_path / "again")) == tree_bytes(run.compact)


def test_compact_size_is_the_kept_fraction(run, tmp_path):
    """Stored parameters are the callback's count after the switch, plain ones (truncated modules at rank r) its count
    before; the compact file leaves out of the plain PEFT adapter the trained model saves exactly the LoRA bytes past
    rank k. (On models this small the safetensors header, one entry per tensor in both files, is a good part of the
    files, so the ratio of whole files sits above the kept fraction.)"""
    callback, adapter = run.callback, read_compact(run.compact)
    assert adapter.stored_params == callback.lora_params_after < adapter.plain_params == callback.lora_params_before
    layers = find_lora_layers(run.model)
    sizes = {name: sum(p.numel() for p in lora_parameters(layer, "default")) for name, layer in layers.items()}
    fraction = callback.plan.kept_fraction(sizes, {name: layer.r["default"] for name, layer in layers.items()})
    assert fraction == callback.lora_params_after / callback.lora_params_before
    other = 4 * adapter.other_params  # the classifier the BERT run trains in full is in both
    assert (adapter.stored_bytes - other) / (adapter.plain_bytes - other) == pytest.approx(fraction, rel=1e-12)
    run.model.save_pretrained(tmp_path / "plain")
    plain = (tmp_path / "plain" / PEFT_WEIGHTS).stat().st_size
    compact = (run.compact / WEIGHTS_FILE).stat().st_size
    assert plain - compact == pytest.approx(adapter.plain_bytes - adapter.stored_bytes, rel=0.02)
    print(
        f"\n{type(run.model.get_base_model()).__name__}: LoRA bytes {adapter.stored_bytes - other:,} / "
        f"{adapter.plain_bytes - other:,} = {fraction:.4f} (kept fraction); weights files {compact:,} / {plain:,} = "
        f"{compact / plain:.4f}"
    )


def test_save_model_output_and_a_checkpoint_after_the_switch_compact(llama, tmp_path, capsys):
    """`loradrop compact` of what the unmodified script saved: trainer.save_model()'s output loads with the trained
    logits exactly, and a checkpoint after the switch with that checkpoint's own (plain PEFT) logits."""
    assert loradrop(["compact", str(llama.output_dir), str(tmp_path / "final")]) == 0
    final = read_compact(tmp_path / "final")
    assert final.plan == llama.callback.plan
    from_model = read_compact(llama.compact)
    assert final.tensors.keys() == from_model.tensors.keys()
    assert all(torch.equal(final.tensors[key], from_model.tensors[key]) for key in final.tensors)
    torch.testing.assert_close(
        model_logits(load_compact(llama.base(), tmp_path / "final")), llama.logits, rtol=0, atol=0
    )

    checkpoint = llama.output_dir / "checkpoint-4"
    assert llama.callback.plan.step < 4 and (checkpoint / PLAN_FILE).is_file()
    compact = compact_peft_adapter(checkpoint, tmp_path / "checkpoint-4")
    plain = PeftModel.from_pretrained(llama.base(), str(checkpoint))
    torch.testing.assert_close(model_logits(load_compact(llama.base(), compact)), model_logits(plain), rtol=0, atol=0)
    _assert_zero_blocks(load_compact(llama.base(), compact), llama.callback.plan)


def test_a_checkpoint_from_before_the_switch_is_refused_naming_a_truncated_module(llama, tmp_path, capsys):
    """checkpoint-2 holds full-rank LoRA everywhere (the switch is at step 3): storing rank k of it would change it.
    Refused by the CLI in one line (exit 1) and by the Python API, naming a truncated module; nothing is written."""
    before, plan = llama.output_dir / "checkpoint-2", llama.callback.plan
    assert not (before / PLAN_FILE).exists()
    argv = ["compact", str(before), str(tmp_path / "compact"), "--plan", str(llama.output_dir / PLAN_FILE)]
    assert loradrop(argv) == 1
    error = one_line_error(capsys)
    assert "mode 'truncate'" in error and "is not zero past rank 1" in error and "before the switch" in error
    named = re.search(r"'([^']+)\.lora_[AB]\.weight' is not zero", error)
    assert named and named[1] in plan.dropped, "the error names a module the plan truncates"
    assert not (tmp_path / "compact").exists()
    with pytest.raises(PlanError, match=r"mode 'truncate'.*is not zero past rank 1"):
        compact_peft_adapter(before, tmp_path / "compact", plan=llama.output_dir / PLAN_FILE)
    assert not (tmp_path / "compact").exists()


def test_a_model_that_was_not_truncated_is_refused(llama, tmp_path):
    with pytest.raises(PlanError, match=r"mode 'truncate'.*is not zero past rank 1"):
        save_compact(tiny_llama(), tmp_path / "untruncated", plan=llama.callback.plan)
    assert not (tmp_path / "untruncated").exists()


def test_a_saved_adapter_without_the_recorded_scaling_is_refused(llama, tmp_path, capsys):
    """An adapter saved with the scaling recorded in alpha_pattern (PEFT's own save_pretrained, as checkpoints were
    written before issue 30) whose zero blocks fit, but whose config lacks the entry of one truncated module (saved by
    other means than the run's): PEFT would compute something else than the trained model."""
    source = tmp_path / "checkpoint"
    PeftModel.save_pretrained(llama.model, str(source))  # the class's method: the scaling recorded, nothing folded
    (source / "README.md").unlink()
    shutil.copy(llama.output_dir / PLAN_FILE, source)
    config = json.loads((source / CONFIG_FILE).read_text())
    name = llama.callback.plan.dropped[-1]
    del config["alpha_pattern"][pattern_key(name)]
    (source / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PlanError, match=rf"{re.escape(repr(name))} to rank 1, but the alpha_pattern .* has no entry"):
        compact_peft_adapter(source, tmp_path / "compact")
    assert loradrop(["compact", str(source), str(tmp_path / "compact")]) == 1
    assert "has no entry for it" in one_line_error(capsys)
    assert not (tmp_path / "compact").exists()


# ---------------------------------------------------------------------------------------------- expansion


def test_expansion_is_a_plain_peft_adapter_at_the_reduced_size(run, tmp_path):
    """rank_pattern gives truncated modules rank k ahead of the user's entries, loradrop's alpha_pattern entries are
    gone (the user's stay), and vanilla PEFT computes the trained logits up to float32 summation order."""
    plan, k = run.callback.plan, run.callback.plan.dropped_rank
    out = expand_to_peft(run.compact, tmp_path / "peft")
    config = json.loads((out / CONFIG_FILE).read_text())
    ours = [pattern_key(name) for name in plan.dropped]
    assert list(config["rank_pattern"])[: len(ours)] == ours and all(config["rank_pattern"][key] == k for key in ours)
    user = run.model.peft_config["default"]
    assert {key: v for key, v in config["rank_pattern"].items() if key not in ours} == dict(user.rank_pattern or {})
    assert not set(ours) & set(config["alpha_pattern"])
    assert config["alpha_pattern"] == {key: v for key, v in user.alpha_pattern.items() if key not in ours}
    weights = load_file(out / PEFT_WEIGHTS)
    compact = read_compact(run.compact)
    assert weights.keys() == {key for keys in compact.members.values() for key in keys}
    assert all(torch.equal(weights[key], compact.tensors[key]) for key in compact.tensors), "the stored tensors"
    assert (out / PEFT_WEIGHTS).stat().st_size == pytest.approx((run.compact / WEIGHTS_FILE).stat().st_size, rel=0.01)

    plain = PeftModel.from_pretrained(run.base(), str(out))
    layers, trained = find_lora_layers(plain), find_lora_layers(run.model)
    for name in plan.dropped:
        assert layers[name].r["default"] == k and layers[name].scaling["default"] == trained[name].scaling["default"]
    for name in plan.kept:
        assert layers[name].r["default"] == trained[name].r["default"]
        assert layers[name].scaling["default"] == trained[name].scaling["default"]
    logits = model_logits(plain)
    diff, relative = _relative_difference(logits, run.logits)
    print(f"\nexpanded vs trained logits: max abs {diff:.3e}, relative to the largest logit {relative:.3e}")
    assert relative < EXPANSION_RTOL
    torch.testing.assert_close(logits, run.logits, rtol=0, atol=EXPANSION_RTOL * float(run.logits.abs().max()))
    assert tree_bytes(expand_to_peft(run.compact, tmp_path / "peft2")) == tree_bytes(out), "expansion is deterministic"


def test_a_user_alpha_pattern_key_matching_a_truncated_module_does_not_change_what_any_export_computes(tmp_path):
    """PEFT's save_pretrained writes alpha_pattern sorted, and takes the first key that matches. A user key that
    matches a truncated module (here one naming layer 0's k_proj) must still come after loradrop's, which sort first:
    the Trainer's own plain adapter, the compact adapter and its expansion all compute what the trained model did."""
    user_key = r"layers\.0\.self_attn\.k_proj"
    model = tiny_llama(alpha_pattern={user_key: 8})
    callback = LoraDropCallback(alpha=0.25, dropped_rank=1, **{**SHARING, "mode": "truncate"})
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(), callbacks=[callback])
    trainer.train()
    trainer.save_model()
    name = "base_model.model.model.layers.0.self_attn.k_proj"
    assert name in callback.plan.dropped
    saved = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())["alpha_pattern"]
    assert list(saved)[-1] == user_key, "PEFT sorted the keys: loradrop's come first"
    compact = compact_peft_adapter(tmp_path / "out", tmp_path / "compact")
    assert next(iter(read_compact(compact).peft_config["alpha_pattern"])) == pattern_key(name)
    trained = model_logits(model)
    saved_by_trainer = PeftModel.from_pretrained(tiny_llama_base(), str(tmp_path / "out"))
    torch.testing.assert_close(model_logits(saved_by_trainer), trained, rtol=0, atol=0)
    torch.testing.assert_close(model_logits(load_compact(tiny_llama_base(), compact)), trained, rtol=0, atol=0)
    plain = PeftModel.from_pretrained(tiny_llama_base(), str(expand_to_peft(compact, tmp_path / "peft")))
    assert _relative_difference(model_logits(plain), trained)[1] < EXPANSION_RTOL


def test_rslora_truncation_exports_with_its_own_scaling(tmp_path):
    """With rsLoRA a rank-k LoRA is scaled by lora_alpha / sqrt(k): the recorded alpha_pattern, load_compact and the
    expansion's rank_pattern all follow it (a model truncated without a Trainer, k=2 of r=4)."""
    model = random_lora_b(tiny_llama(use_rslora=True))
    layers = find_lora_layers(model)
    importance = {name: 1.0 + (i * 7919 % 13) for i, name in enumerate(layers)}
    plan = build_plan(importance, lora_kinds(layers), 0.6, mode="truncate", dropped_rank=2)
    reparameterise(layers, plan, None, at_switch=True)
    record_truncation(model.peft_config["default"], layers, plan)
    name = plan.dropped[0]
    assert layers[name].scaling["default"] == 8 / math.sqrt(2)
    assert model.peft_config["default"].alpha_pattern[pattern_key(name)] == pytest.approx(8 / math.sqrt(2) * 2)
    trained = model_logits(model)
    compact = save_compact(model, tmp_path / "compact", plan=plan)
    torch.testing.assert_close(model_logits(load_compact(tiny_llama_base(), compact)), trained, rtol=0, atol=0)
    plain = PeftModel.from_pretrained(tiny_llama_base(), str(expand_to_peft(compact, tmp_path / "peft")))
    assert find_lora_layers(plain)[name].scaling["default"] == 8 / math.sqrt(2)
    assert _relative_difference(model_logits(plain), trained)[1] < EXPANSION_RTOL


# ---------------------------------------------------------------------------------------------- training on


def test_trainable_load_trains_on_with_the_zero_blocks_zero(llama, tmp_path):
    """load_compact(is_trainable=True) continues at the same ranks: the leading parts train, the zero blocks get zero
    gradients and stay exactly zero, and the result compacts and loads again with its own logits."""
    loaded = load_compact(llama.base(), llama.compact, is_trainable=True)
    plan, layers = llama.callback.plan, find_lora_layers(loaded)
    before = {name: layers[name].lora_B["default"].weight.detach().clone() for name in plan.kinds}
    Trainer(model=loaded, args=training_args(tmp_path, max_steps=4), train_dataset=TokenDataset()).train()
    assert all(not torch.equal(layers[name].lora_B["default"].weight, before[name]) for name in plan.dropped)
    _assert_zero_blocks(loaded, plan)
    for name in plan.dropped:
        assert layers[name].scaling["default"] == rank_scaling(layers[name], "default", plan.dropped_rank)
    logits = model_logits(loaded)
    again = save_compact(loaded, tmp_path / "again")
    torch.testing.assert_close(model_logits(load_compact(llama.base(), again)), logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- untrusted input


def _truncated_key(run: Run, part: str = "A") -> str:
    return f"{run.callback.plan.dropped[0]}.lora_{part}.weight"


def _full_rank(weights: dict[str, torch.Tensor], key: str) -> None:
    """The truncated module's weight at rank r (k leading rows, zeros after): what the trained model holds."""
    value = weights[key]
    weights[key] = torch.cat([value, torch.zeros(3, value.shape[1])]) if ".lora_A." in key else value


def _alpha_key(key: str) -> str:
    """The alpha_pattern (and rank_pattern) key of the module of the weight `key`."""
    return pattern_key(key.rsplit(".lora_", 1)[0])


def _user_key_first(config: dict) -> None:
    """A user entry that matches every k_proj put ahead of loradrop's (PEFT would take it for them)."""
    config["alpha_pattern"] = {r".*k_proj": 8, **config["alpha_pattern"]}


@pytest.mark.parametrize(
    ("craft", "message"),
    [
        (lambda key: {"tensors": lambda w, _: _full_rank(w, key)}, r"has rank 4, but its plan truncates .* to rank 1"),
        (
            lambda key: {"tensors": lambda w, _: w.__setitem__(key, w[key].masked_fill(w[key] != 0, math.nan))},
            "NaN or infinite",
        ),
        (
            lambda key: {"tensors": lambda w, _: w.__setitem__(key, torch.full_like(w[key], math.inf))},
            "NaN or infinite",
        ),
        (
            lambda key: {"manifest": lambda m: m["plan"].__setitem__("dropped_rank", 8)},
            r"to rank 8 \(dropped_rank\), but its PEFT config gives that module rank 4",
        ),
        (
            lambda key: {"manifest": lambda m: m["plan"].__setitem__("dropped_rank", 4)},
            r"to rank 4 \(dropped_rank\), but its PEFT config gives that module rank 4",
        ),
        (
            lambda key: {"config": lambda c: c["alpha_pattern"].pop(_alpha_key(key))},
            "has no entry for it",
        ),
        (
            lambda key: {
                "config": lambda c: c["alpha_pattern"].__setitem__(pattern_key(key.rsplit(".lora_", 1)[0]), 8)
            },
            "maps it to lora_alpha 8",
        ),
        (lambda key: {"config": _user_key_first}, r"has '\.\*k_proj' first among the keys that match it"),
        (
            lambda key: {
                "config": lambda c: c.__setitem__("rank_pattern", {pattern_key(key.rsplit(".lora_", 1)[0]): 1})
            },
            "but its PEFT config gives that module rank 1",
        ),
        (lambda key: {"config": lambda c: c["alpha_pattern"].__setitem__("(", 8)}, "no regular expression"),
    ],
    ids=[
        "rank-r-tensor",
        "nan",
        "inf",
        "dropped_rank-above-r",
        "dropped_rank-equal-r",
        "missing-alpha",
        "wrong-alpha",
        "user-key-first",
        "rank_pattern-k",
        "not-a-regex",
    ],
)
def test_crafted_truncate_adapters_are_refused(llama, tmp_path, capsys, craft, message):
    """Each edit of a truncate-mode compact adapter is refused by read_compact, load_compact (leaving the base model
    as it was) and `loradrop expand` (one line, nothing written)."""
    plan = llama.callback.plan
    key = (
        _truncated_key(llama)
        if "k_proj" not in message
        else next(f"{name}.lora_A.weight" for name in plan.dropped if name.endswith("k_proj"))
    )
    crafted = craft_compact(llama.compact, tmp_path / "crafted", **craft(key))
    _refused_and_base_untouched(llama, crafted, message)
    assert loradrop(["expand", str(crafted), str(tmp_path / "peft")]) == 1
    one_line_error(capsys)
    assert not (tmp_path / "peft").exists()


def test_21_10_a_truncated_module_padded_beyond_its_widths_is_refused_before_allocating(llama, tmp_path):
    """Issue 21, item 10: load_compact pads each truncated module back to the rank r its config gives it; a config
    giving one module r = 4096 (with the alpha_pattern entry that makes it consistent) made it allocate 4096 x width
    for a module 32 wide. No module's rank is above the larger of its widths."""
    module = llama.callback.plan.dropped[0]
    key, r = pattern_key(module), 4096

    def rank_4096(config: dict) -> None:
        config["rank_pattern"] = {key: r, **(config.get("rank_pattern") or {})}
        config["alpha_pattern"][key] = alpha_at_rank(config["lora_alpha"], r, llama.callback.plan.dropped_rank, False)

    crafted = craft_compact(llama.compact, tmp_path / "crafted", config=rank_4096)
    _refused_and_base_untouched(llama, crafted, rf"gives {re.escape(repr(module))} rank 4096, above both its widths")


def _refused_and_base_untouched(llama, crafted, message: str) -> None:
    """`read_compact` and `load_compact` refuse `crafted` with `message`, the base model's weights as they were."""
    with pytest.raises(CompactFormatError, match=message):
        read_compact(crafted)
    base = llama.base()
    state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    with pytest.raises(CompactFormatError, match=message):
        load_compact(base, crafted)
    assert all(torch.equal(tensor, state[name]) for name, tensor in base.state_dict().items())


# ---------------------------------------------------------------------------------------------- card, inspect, Hub


def test_card_and_inspect_say_truncated_to_rank_k(bert, capsys):
    plan, adapter = bert.callback.plan, read_compact(bert.compact)
    card = (bert.compact / CARD_FILE).read_text()
    assert f"the other {len(plan.dropped)} are truncated to rank 2" in card and "(mode `truncate`)" in card
    name = plan.dropped[0].removeprefix("base_model.model.")
    assert re.search(rf"^\| `{re.escape(name)}` \| .* \| truncated to rank 2 \|$", card, re.M)
    assert "shared:" not in card and "| dropped |" not in card
    assert f"| unpruned PEFT adapter | {adapter.plain_params:,} | {adapter.plain_bytes:,} |" in card
    assert "| LoRA-drop dropped_rank (rank of truncated modules) | `2` |" in card
    assert loradrop(["inspect", str(bert.compact)]) == 0
    out = capsys.readouterr().out
    assert "mode truncate" in out and f"{len(plan.dropped)} truncated to rank 2" in out
    assert re.search(r"^\| kind +\| modules \| kept \| truncated \| importance \|$", out, re.M)
    before, after = bert.callback.lora_params_before, bert.callback.lora_params_after
    assert f"LoRA parameters {before:,} -> {after:,}" in out and f"{len(plan.dropped)} are truncated to rank 2" in out
    assert "for the unpruned adapter" in out


def test_22_1_push_and_load_from_hub_and_the_repo_root_in_plain_peft(hub, llama):
    """Through the test Hub: load_from_hub gives the trained logits exactly; the repo's root (issue 22, item 1) is the
    uniform form since issue 30, every module at rank r with no pattern, and loads in vanilla PEFT with the trained
    logits exactly; rank_pattern/ loads at rank k, with the trained logits up to the expansion's float32 rounding."""
    push_to_hub(llama.compact, REPO)
    loaded = load_from_hub(llama.base(), REPO)
    torch.testing.assert_close(model_logits(loaded), llama.logits, rtol=0, atol=0)
    _assert_zero_blocks(loaded, llama.callback.plan)
    root = PeftModel.from_pretrained(llama.base(), REPO)
    assert {layer.r["default"] for layer in find_lora_layers(root).values()} == {4}
    assert not root.peft_config["default"].alpha_pattern and not root.peft_config["default"].rank_pattern
    torch.testing.assert_close(model_logits(root), llama.logits, rtol=0, atol=0)
    small = PeftModel.from_pretrained(llama.base(), REPO, subfolder="rank_pattern")
    assert all(find_lora_layers(small)[name].r["default"] == 1 for name in llama.callback.plan.dropped)
    assert _relative_difference(model_logits(small), llama.logits)[1] < EXPANSION_RTOL


# A user's own pattern outside the subset readers accept (four repetitions): training takes it, and so must export.
_LAYER_MODULES = [f"self_attn.{kind}" for kind in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"mlp.{kind}" for kind in ("gate_proj", "up_proj", "down_proj")
]
UNBOUNDED_TARGETS = r"^(?!.*vision).*\.layers\.\d+\..*_proj$"


def unbounded_lora() -> LoraConfig:
    """A user's LoRA whose `target_modules` readers refuse (more than 3 repetitions), with patterns of its own."""
    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=UNBOUNDED_TARGETS,
        rank_pattern={r"layers\.0\..*_proj": 8},
        alpha_pattern={r"layers\.1\..*_proj": 16},
        task_type="CAUSAL_LM",
    )


def test_a_users_pattern_readers_refuse_is_exported_as_the_modules_it_selected(tmp_path, caplog):
    """Readers hold an adapter's regular expressions to a subset whose matching time is bounded (issue 21, item 11),
    which a user's own `target_modules` can fall outside of. Exporting the trained model (save_compact, `loradrop
    compact` of save_model's output) records the modules by name instead, with each module's own rank and lora_alpha,
    so the export loads back to the trained logits exactly and expands to a plain adapter PEFT builds the same model
    from."""
    lora = unbounded_lora()
    with caplog.at_level("WARNING"):
        run = _train(tmp_path, get_peft_model(tiny_llama_base(), lora), tiny_llama_base, "causal", rank=1)
    assert "It records instead the 28 LoRA modules by name" in caplog.text
    with pytest.raises(CompactFormatError, match="with 4 repetitions"):
        check_patterns(run.model.peft_config["default"].to_dict(), "the trained model's config")

    config = read_compact(run.compact).peft_config
    trained = find_lora_layers(run.model)
    assert sorted(PEFT_PREFIX + name for name in config["target_modules"]) == sorted(trained)
    assert config["rank_pattern"] == {re.escape(f"model.layers.0.{name}"): 8 for name in _LAYER_MODULES}
    ours = [pattern_key(name) for name in run.callback.plan.dropped]
    assert list(config["alpha_pattern"])[: len(ours)] == ours, "the recorded alphas first, as the callback put them"
    theirs = {key: alpha for key, alpha in config["alpha_pattern"].items() if key not in ours}
    assert theirs == {re.escape(f"model.layers.1.{name}"): 16 for name in _LAYER_MODULES}, "truncated ones too"
    loaded = load_compact(tiny_llama_base(), run.compact)
    torch.testing.assert_close(model_logits(loaded), run.logits, rtol=0, atol=0)
    for name, layer in find_lora_layers(loaded).items():
        assert (layer.r["default"], layer.scaling["default"]) == (
            trained[name].r["default"],
            trained[name].scaling["default"],
        )

    assert loradrop(["compact", str(run.output_dir), str(tmp_path / "from_output")]) == 0
    assert read_compact(tmp_path / "from_output").peft_config == config
    plain = PeftModel.from_pretrained(tiny_llama_base(), str(expand_to_peft(run.compact, tmp_path / "plain")))
    assert _relative_difference(model_logits(plain), run.logits)[1] < EXPANSION_RTOL


def test_a_saved_adapters_refused_patterns_are_never_matched_when_spelled_out(llama, tmp_path, capsys):
    """`loradrop compact` of a directory whose config has patterns readers refuse spells them out from what the files
    show, never by matching them (the directory is as untrusted as any adapter): ranks from the stored lora_A, so a
    crafted `rank_pattern` key is dropped unmatched; an `alpha_pattern` key outside the subset is refused at once."""
    source = tmp_path / "out"
    shutil.copytree(llama.output_dir, source, ignore=shutil.ignore_patterns("checkpoint-*"))
    config_path = source / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config.update(target_modules=UNBOUNDED_TARGETS, rank_pattern={"(a+)+_proj": 2})
    config_path.write_text(json.dumps(config))
    assert loradrop(["compact", str(source), str(tmp_path / "ranks")]) == 0
    written = read_compact(tmp_path / "ranks").peft_config
    assert (
        written["rank_pattern"] == {}
        and written["alpha_pattern"] == read_compact(llama.compact).peft_config["alpha_pattern"]
    ), "the truncated modules' scaling unfolded from lora_B and recorded as the callback records it"
    torch.testing.assert_close(
        model_logits(load_compact(llama.base(), tmp_path / "ranks")), llama.logits, rtol=0, atol=0
    )

    config["alpha_pattern"]["(a+)+_proj"] = 3.0
    config_path.write_text(json.dumps(config))
    assert loradrop(["compact", str(source), str(tmp_path / "alphas")]) == 1
    refused = "alpha_pattern the pattern '(a+)+_proj', which repeats more than a single character"
    assert refused in one_line_error(capsys)
    assert not (tmp_path / "alphas").exists()


def test_28_4_a_run_pruning_some_modules_is_spelled_out_with_all_its_lora_modules(tmp_path):
    """Issue 28, item 4: with `LoraDropConfig(target=...)` and a `target_modules` pattern readers refuse, the
    spelled-out config named only the plan's modules, the others dropped out, and `save_compact` / `loradrop compact`
    failed at the end of training with a message about base-model weights. Every LoRA module of the adapter is
    spelled out, with its rank and lora_alpha."""
    lora = unbounded_lora()
    model = get_peft_model(tiny_llama_base(), lora)
    callback = LoraDropCallback(alpha=0.25, target=["self_attn"], **{**SHARING, "mode": "truncate"})
    args = training_args(tmp_path, max_steps=8)
    Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    assert callback.plan.dropped and all("self_attn" in name for name in callback.plan.kinds)
    compact = save_compact(model, tmp_path / "compact")
    config = read_compact(compact).peft_config
    assert sorted(PEFT_PREFIX + name for name in config["target_modules"]) == sorted(find_lora_layers(model))
    assert config["rank_pattern"] == {re.escape(f"model.layers.0.{name}"): 8 for name in _LAYER_MODULES}
    torch.testing.assert_close(
        model_logits(load_compact(tiny_llama_base(), compact)), model_logits(model), rtol=0, atol=0
    )
    model.save_pretrained(tmp_path / "saved")
    shutil.copy(Path(args.output_dir) / PLAN_FILE, tmp_path / "saved" / PLAN_FILE)
    assert loradrop(["compact", str(tmp_path / "saved"), str(tmp_path / "from_saved")]) == 0
    assert read_compact(tmp_path / "from_saved").peft_config == config
