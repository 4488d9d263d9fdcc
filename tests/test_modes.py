"""Issue 31: a mode's rules live in its own module on each side (`loradrop_trainer.modes`, `hub_export.modes`), and a
fourth mode is one module per side, registered by its name.

The fourth mode here, "freeze", exists for this test only: the dropped modules keep their own LoRA as it is at the
switch and stop training. Its two classes below are all it takes; the plan, the re-parameterisation, the compact
format's checks, the expansion to plain PEFT, the loader and the card use it without a line of their own.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import model_logits, random_lora_b, tiny_llama, tiny_llama_base
from peft import PeftModel

import hub_export.modes
import loradrop_trainer.modes
from hub_export import expand_to_peft, load_compact, save_compact
from hub_export.compact import read_compact
from hub_export.modes import ExportMode
from loradrop_trainer import DropPlan, apply_plan, build_plan, find_lora_layers, lora_kinds
from loradrop_trainer.modes import Mode
from loradrop_trainer.report import kept_line, plan_table

ROOT = Path(__file__).resolve().parents[1]
NAMES = "|".join(loradrop_trainer.modes.REGISTRY)
# A mode compared with a string or a collection of them, a mode's name compared with anything, a table indexed by a
# mode: the forms in which a reader used to carry its own piece of what a mode means.
COMPARED = re.compile(rf"""\bmode\b ?(==|!=|not in|in) ?[(\[{{]?["']|["']({NAMES})["'] ?(==|!=)|\[[\w.]*\bmode\]""")
ALLOWED = {ROOT / "loradrop_trainer" / "config.py"}  # LoraDropConfig's validation of the settings each mode takes


def test_31_no_reader_compares_the_mode_with_a_name():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for package in ("loradrop_trainer", "hub_export")
        for path in sorted((ROOT / package).rglob("*.py"))
        if "modes" not in path.relative_to(ROOT).parts and path not in ALLOWED
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if COMPARED.search(line)
    ]
    assert found == [], "ask the plan's mode (loradrop_trainer.modes, hub_export.modes) instead:\n" + "\n".join(found)


def test_31_the_pattern_finds_what_it_forbids():
    for line in ('if plan.mode == "truncate":', "x = {}[plan.mode]", "elif cfg.mode in ('share', 'drop'):"):
        assert COMPARED.search(line), line
    for line in ('mode=data.get("mode", "share"),', "mode_of(plan.mode).truncates", '("mode", "mode", "-"),'):
        assert not COMPARED.search(line), line


class Freeze(Mode):
    """The training side of "freeze", as its module would hold it."""

    name = "freeze"
    dropped_as = "frozen"

    def source_of(self, plan, name):
        return name

    def apply(self, layers, plan, *, dropped_scaling):
        for name in plan.dropped:
            for part in (layers[name].lora_A, layers[name].lora_B):
                part[plan.adapter_name].weight.requires_grad_(False)

    def reparameterise(self, layers, plan, optimizer, *, at_switch, fresh_seed, dropped_scaling):
        apply_plan(layers, plan, dropped_scaling=dropped_scaling)
        return None


class FreezeExport(ExportMode):
    """The export side of "freeze", as its module would hold it."""

    name = "freeze"

    def dropped_clause(self, plan):
        return "were frozen at the switch, each keeping its own LoRA"

    def status(self, plan, name):
        return "frozen"

    def loaded_again(self, plan):
        return "the model as trained; `is_trainable=True` trains every module again"


@pytest.fixture
def freeze(monkeypatch):
    monkeypatch.setitem(loradrop_trainer.modes.REGISTRY, "freeze", Freeze())
    monkeypatch.setitem(hub_export.modes.REGISTRY, "freeze", FreezeExport())


def test_31_a_fourth_mode_is_one_module_per_side(freeze, tmp_path):
    model = random_lora_b(tiny_llama())
    layers = find_lora_layers(model)
    importance = {name: 1.0 + (i * 7919 % 13) for i, name in enumerate(layers)}
    plan = build_plan(importance, lora_kinds(layers), 0.6, mode="freeze")
    assert plan.dropped and DropPlan.from_dict(plan.to_dict()) == plan
    assert [plan.source_of(name) for name in plan.dropped] == plan.dropped and plan.truncated == []
    assert plan.kept_fraction(dict.fromkeys(plan.kinds, 10)) == 1.0
    assert "frozen" in plan_table(plan) and kept_line(plan).endswith("modules keep their own LoRA")

    apply_plan(layers, plan)
    frozen = {name for name, layer in layers.items() if not layer.lora_A["default"].weight.requires_grad}
    assert frozen == set(plan.dropped)

    compact = save_compact(model, tmp_path / "compact", plan=plan)  # every check of `validate` on the way out
    adapter = read_compact(compact)  # and on the way in
    assert adapter.plan.mode == "freeze" and adapter.dropped == {}
    card = (compact / "README.md").read_text(encoding="utf-8")
    assert f"the other {len(plan.dropped)} were frozen at the switch" in card and "| frozen |" in card

    expected = model_logits(model)
    plain = PeftModel.from_pretrained(tiny_llama_base(), expand_to_peft(compact, tmp_path / "peft"))
    assert torch.equal(model_logits(plain), expected)
    loaded = load_compact(tiny_llama_base(), compact, is_trainable=True)
    assert torch.equal(model_logits(loaded), expected)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if n.rsplit(".lora_", 1)[0] in plan.dropped)


def test_31_a_mode_nobody_registered_is_refused_by_name():
    with pytest.raises(ValueError, match=r"Drop plan mode 'freeze' is not one of \('share', 'drop', 'truncate'\)"):
        build_plan({"a": 1.0, "b": 0.5}, {"a": "q", "b": "q"}, 0.5, mode="freeze")
