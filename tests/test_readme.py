"""The README agrees with itself, with the code and with the results files it quotes (issue 22, items 6 and 7)."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

from loradrop_trainer import LoraDropConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# all-MiniLM-L6-v2, the quickstart's model: (in, out) features of each LoRA kind, and its classifier head (trained in
# full through modules_to_save: 384 x 2 weights and 2 biases).
MINILM_WIDTHS = {
    "query": (384, 384),
    "key": (384, 384),
    "value": (384, 384),
    "attention.output.dense": (384, 384),
    "intermediate.dense": (384, 1536),
    "output.dense": (1536, 384),
    "pooler.dense": (384, 384),
}
MINILM_HEAD = 384 * 2 + 2


def _flat(text: str) -> str:
    """A README paragraph on one line, as it reads (its lines are wrapped at 120 characters)."""
    return " ".join(text.split())


def _setup_extras() -> set[str]:
    """The extras setup.py declares, read from its source (building it would need setuptools' machinery)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    call = next(
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    extras = next(keyword.value for keyword in call.keywords if keyword.arg == "extras_require")
    return set(ast.literal_eval(extras))


def test_22_6_the_readme_installs_into_an_existing_environment_with_extras_that_exist():
    """Issue 22, item 6: the fresh-machine commands come first, then the line for the environment one already has,
    and every extra the README tells to install is one setup.py declares."""
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    setup = "python3 -m venv .venv && . .venv/bin/activate && bash .ci/install.sh"
    assert [line.startswith(setup) for line in first_block[:2]] == [True, True]
    assert any(line.startswith("pip install . ") for line in first_block[2:])
    named = set(re.findall(r'"\.\[(\w+)\]"', README))
    assert {"deepspeed", "qlora"} <= named <= _setup_extras()


def _headline() -> tuple[str, str]:
    """The sentence that introduces the README's first plan block, and the block."""
    head, block = README.split("LoRA-drop plan at step", 1)
    return head.rsplit("\n\n", 2)[-2], "LoRA-drop plan at step" + block.split("```", 1)[0]


def test_22_7_the_headline_plan_is_made_with_the_settings_stated_next_to_it():
    """Issue 22, item 7: the plan the README shows under `LoraDropCallback()` states its settings, and they are the
    defaults, which are the quickstart's (the run that printed it): its switch step is theirs."""
    from recipes import quickstart

    sentence, block = _headline()
    assert "`LoraDropCallback()`" in sentence
    stated = dict(re.findall(r"`(\w+)=([^`]+)`", sentence))
    flags = vars(quickstart.parse_args([]))
    defaults = LoraDropConfig()
    for name in ("alpha", "threshold", "normalize", "mode", "dropped_rank"):
        assert ast.literal_eval(stated[name]) == getattr(defaults, name) == flags[name], name
    assert stated["r"] == str(flags["lora_r"]) and f"for {flags['max_steps']} steps" in sentence
    assert f"LoRA-drop plan at step {defaults.switch_step(flags['max_steps'])}:" in block
    assert f"(threshold {defaults.threshold})" in block and f"truncated to rank {defaults.dropped_rank}" in block


def test_22_7_the_readme_quotes_one_quickstart_run_whose_numbers_add_up():
    """Issue 22, item 7: the headline table, its parameter line, the Recipes entry and the sizes of the compact
    adapter quote the same run, and each number follows from the table and MiniLM's shapes at r=8."""
    _, block = _headline()
    rows = re.findall(r"^\| ([\w.]+) +\| +(\d+) \| +(\d+) \| +(\d+) \| +([\d.]+) \|$", block, re.M)
    assert [row[0] for row in rows] == list(MINILM_WIDTHS)
    modules, kept, truncated = (sum(int(row[i]) for row in rows) for i in (1, 2, 3))
    assert modules == kept + truncated == 37 and abs(sum(float(row[4]) for row in rows) - 1) < 0.005
    width = {kind: sum(MINILM_WIDTHS[kind]) for kind in MINILM_WIDTHS}
    before = sum(int(row[1]) * 8 * width[row[0]] for row in rows)
    after = sum((int(row[2]) * 8 + int(row[3]) * 1) * width[row[0]] for row in rows)
    line = f"LoRA parameters {before:,} -> {after:,} ({after / before:.1%}); {kept}/{modules} modules keep"
    assert line in block and f"{truncated} are truncated to rank 1" in block
    recipes = _flat(README.split("## Recipes", 1)[1].split("\n- ", 2)[1])
    assert f"{before:,} -> {after:,} ({after / before:.1%}), {kept} of {modules} modules keep rank 8" in recipes
    stored, plain = 4 * (after + MINILM_HEAD), 4 * (before + MINILM_HEAD)  # float32 LoRA and classifier head
    sizes = f"{stored:,} bytes against {plain:,} for the unpruned"
    assert sizes in recipes and f"{stored / plain:.1%}" in recipes
    measured = _flat(README.split("Measured on the quickstart's adapter", 1)[1].split("\n\n", 1)[0])
    assert sizes.replace(" for the unpruned", "") in measured and f"keeps {after / before:.1%} of the LoRA" in measured


@pytest.mark.parametrize("section", ["front", "quality"])
def test_22_7_the_result_sections_are_rendered_from_the_results_files(section, monkeypatch):
    """Issue 22, item 7: the README's results tables are what benchmarks/ renders from the committed runs."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = __import__(section)
    sys.modules.pop(section)  # benchmarks/ names its modules plainly: leave no "front" or "quality" behind
    rows = [json.loads(line) for line in (ROOT / f"benchmarks/results/{section}_runs.jsonl").read_text().splitlines()]
    table = module.markdown(module.points(rows) if section == "front" else module.summarise(rows))
    start, end = f"<!-- {section}:start -->\n", f"<!-- {section}:end -->"
    assert README.split(start, 1)[1].split(end, 1)[0] == f"{table}\n\n![{section}](benchmarks/results/{section}.png)\n"


def test_20_the_overhead_table_is_rendered_from_the_h200_results(monkeypatch):
    """Issue 20: the README's step-time table is `benchmarks/overhead.py summarise` of the committed H200 runs."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    overhead = __import__("overhead")
    sys.modules.pop("overhead")
    results = ROOT / "benchmarks/results/overhead"
    paths = [str(path) for folder in ("h200_pinned", "cpu_host") for path in sorted((results / folder).glob("*.json"))]
    table = "\n".join(overhead.summarise(paths))
    assert f"\n{table}\n" in README


def test_27_2_ci_runs_exactly_the_readme_test_command_in_a_fresh_environment():
    """Issue 27, item 2: CI was green on a machine that still had an older PEFT installed; `.ci/run` is the README's
    test command, which creates the virtual environment it installs into."""
    readme_command = README.split("```bash\n", 1)[1].splitlines()[1]
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] not in "#"]
    assert ci_commands[-1] == readme_command and "pytest" in readme_command and "python3 -m venv" in readme_command
