"""Issue 9: adapters, directories and Hub repos treated as untrusted input, and the user's files never lost.

Each test is named after the item of issue 9 it covers (`test_1_...` to `test_9_...`, `test_small_...`). Adapters are
built without a Trainer (tiny Llama, random LoRA B, a plan from fixed importances, tied with `apply_plan`), then
crafted by editing their files the way a hostile uploader could.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    VOCAB,
    craft_compact,
    model_logits,
    one_line_error,
    random_lora_b,
    tiny_llama,
    tiny_llama_base,
    tree_bytes,
)
from hub_server import DEFAULT_USER
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import hub_export.loader
import hub_export.validate
from hub_export import (
    BaseModelMismatchError,
    CompactFileNotFoundError,
    CompactFormatError,
    RepoVisibilityError,
    TargetExistsError,
    UnsupportedFormatVersionError,
    expand_to_peft,
    load_compact,
    pull,
    push_to_hub,
    read_compact,
    save_compact,
)
from hub_export.cli import main
from hub_export.format import COMPACT_LAYOUT, COMPACT_SUBFOLDER, MANIFEST_FILE, WEIGHTS_FILE
from hub_export.remote import fetch
from hub_export.validate import check_counts
from loradrop_trainer import DropPlan, apply_plan, build_plan, find_lora_layers, lora_kinds
from loradrop_trainer.truncate import pattern_key

REPO = f"{DEFAULT_USER}/untrusted"
CONFIG_FILE = "adapter_config.json"
COMPACT_FILES = {MANIFEST_FILE, WEIGHTS_FILE, CONFIG_FILE, "README.md", "loradrop_importance.png"}
PEFT_FILES = {CONFIG_FILE, "adapter_model.safetensors"}


def _tied(mode: str, layers: int = 4) -> tuple[PeftModel, DropPlan]:
    """A tiny Llama with non-zero LoRA, re-parameterised by a plan made from fixed importances."""
    model = random_lora_b(tiny_llama(seed=0, layers=layers))
    lora = find_lora_layers(model)
    importance = {name: 1.0 + (i * 7919 % 13) for i, name in enumerate(lora)}
    plan = build_plan(importance, lora_kinds(lora), 0.6, mode=mode)
    apply_plan(lora, plan)
    return model.eval(), plan


def _export(root: Path, mode: str, layers: int = 4) -> tuple[Path, torch.Tensor]:
    model, plan = _tied(mode, layers)
    return save_compact(model, root / f"compact-{mode}-{layers}", plan=plan), model_logits(model)


@pytest.fixture(scope="module")
def share(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    return _export(tmp_path_factory.mktemp("share"), "share")


@pytest.fixture(scope="module")
def drop(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    return _export(tmp_path_factory.mktemp("drop"), "drop")


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    return _export(tmp_path_factory.mktemp("two"), "share", layers=2)


def _fingerprint(model: torch.nn.Module) -> tuple:
    """Everything a refused load must leave as it was: weights, module types and which parameters train."""
    return (
        {name: tensor.clone() for name, tensor in model.state_dict().items()},
        {name: type(module) for name, module in model.named_modules()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        sorted(model.__dict__),
    )


def _assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    state, types, grads, attrs = _fingerprint(model)
    assert types == before[1] and grads == before[2] and attrs == before[3]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[name], before[0][name]) for name in state)


def _shared_group(directory: Path) -> tuple[str, list[str]]:
    """A stored LoRA A key that several modules share, and its members."""
    members = json.loads((directory / MANIFEST_FILE).read_text())["tensors"]
    return next((key, keys) for key, keys in members.items() if len(keys) > 1 and ".lora_A." in key)


# ------------------------------------------------------------------------------------ 1. nothing but our own files


def _trainer_output(root: Path) -> Path:
    """What `Trainer.save_model()` + checkpointing leave in output_dir: adapter_config.json among much else."""
    (root / "checkpoint-5").mkdir(parents=True)
    for name in (CONFIG_FILE, "adapter_model.safetensors", "training_args.bin", "loradrop_plan.json"):
        (root / name).write_text(f"user's {name}")
    for name in (CONFIG_FILE, "optimizer.pt", "trainer_state.json"):
        (root / "checkpoint-5" / name).write_text(f"user's {name}")
    return root


def test_1_save_compact_never_replaces_a_trainer_output_dir(tmp_path):
    model, plan = _tied("share")
    out = _trainer_output(tmp_path / "out")
    before = tree_bytes(out)
    with pytest.raises(TargetExistsError, match=r"adapter_model\.safetensors, checkpoint-5/, .*training_args\.bin"):
        save_compact(model, out, plan=plan)
    assert tree_bytes(out) == before


def test_1_cli_expand_never_replaces_a_checkpoint(share, tmp_path, capsys):
    checkpoint = tmp_path / "out" / "checkpoint-500"
    checkpoint.mkdir(parents=True)
    for name in (CONFIG_FILE, "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (checkpoint / name).write_text(f"user's {name}")
    before = tree_bytes(checkpoint)
    assert main(["expand", str(share[0]), str(checkpoint)]) == 1
    assert "optimizer.pt, rng_state.pth, scheduler.pt" in one_line_error(capsys)
    assert tree_bytes(checkpoint) == before


def test_1_each_writer_replaces_only_what_it_writes(share, tmp_path):
    compact = Path(shutil.copytree(share[0], tmp_path / "compact"))
    with pytest.raises(TargetExistsError, match=r"loradrop_compact\.json"):  # a compact adapter is not a PEFT one
        expand_to_peft(share[0], compact)
    assert tree_bytes(compact) == tree_bytes(share[0])

    user_peft = expand_to_peft(share[0], tmp_path / "user-peft")
    (user_peft / "README.md").write_text("PEFT's save_pretrained writes a model card; this is the user's adapter")
    with pytest.raises(TargetExistsError, match=r"README\.md"):
        expand_to_peft(share[0], user_peft)

    previous = expand_to_peft(share[0], tmp_path / "peft")
    assert expand_to_peft(share[0], previous) == previous, "an earlier expansion is replaced"
    model, plan = _tied("share")
    assert save_compact(model, compact, plan=plan) == compact, "an earlier compact adapter is replaced"
    (tmp_path / "empty").mkdir()
    expand_to_peft(share[0], tmp_path / "empty")


def test_1_pull_never_replaces_foreign_files(hub, share, tmp_path):
    push_to_hub(share[0], REPO)
    target = _trainer_output(tmp_path / "out")
    before = tree_bytes(target)
    with pytest.raises(TargetExistsError, match=r"training_args\.bin"):
        pull(REPO, target)
    assert tree_bytes(target) == before
    pulled = pull(REPO, tmp_path / "pulled")
    assert pull(REPO, pulled) == pulled, "an earlier pull is replaced"


# ------------------------------------------------------------------------------------ 2. output inside the input


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_2_expand_into_its_own_source_is_refused(share, tmp_path, where, capsys):
    compact = Path(shutil.copytree(share[0], tmp_path / "a" / "compact"))
    before = tree_bytes(tmp_path)
    out = {"same": compact, "inside": compact / "peft", "parent": compact.parent}[where]
    with pytest.raises(TargetExistsError, match="source"):
        expand_to_peft(compact, out)
    assert main(["expand", str(compact), str(out)]) == 1
    assert "source" in one_line_error(capsys)
    assert tree_bytes(tmp_path) == before


# ------------------------------------------------------------------------------------ 3. only LoRA keys


def _add_stored(key: str, value: torch.Tensor):
    def edit(weights: dict[str, torch.Tensor], manifest: dict) -> None:
        weights[key] = value
        manifest["tensors"][key] = [key]

    return edit


@pytest.mark.parametrize("how", ["stored", "dropped", "member"])
def test_3_keys_of_base_weights_are_refused(share, drop, tmp_path, how):
    base = tiny_llama_base(seed=0)
    if how == "stored":  # a new tensor that would replace the output head
        crafted = craft_compact(
            share[0], tmp_path / "c", tensors=_add_stored("base_model.model.lm_head.weight", torch.zeros(96, 32))
        )
    elif how == "dropped":  # a manifest-only entry that would zero the final norm
        crafted = craft_compact(
            drop[0],
            tmp_path / "c",
            manifest=lambda m: m["dropped"].update(
                {"base_model.model.model.norm.weight": {"shape": [32], "dtype": "float32"}}
            ),
        )
    else:  # an existing LoRA tensor copied onto a base weight of the same shape
        key, _ = _shared_group(share[0])
        crafted = craft_compact(
            share[0],
            tmp_path / "c",
            manifest=lambda m: m["tensors"][key].append(
                "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
            ),
        )
    before = _fingerprint(base)
    for attempt in (read_compact, lambda d: load_compact(base, d), lambda d: expand_to_peft(d, tmp_path / "peft")):
        with pytest.raises(CompactFormatError, match="not a LoRA"):
            attempt(crafted)
    _assert_unchanged(base, before)
    assert not (tmp_path / "peft").exists()


# ------------------------------------------------------------------------------------ 4. own file names, regular files


def test_4_weights_file_must_be_the_formats_own_file_and_the_error_tells_nothing_about_the_disk(share, tmp_path):
    shutil.copyfile(share[0] / WEIGHTS_FILE, tmp_path / "outside.safetensors")  # right checksum, wrong place
    names = ["../outside.safetensors", str(tmp_path / "outside.safetensors"), "other.safetensors", "../nowhere"]
    messages = set()
    for i, name in enumerate(names):
        crafted = craft_compact(share[0], tmp_path / f"c{i}", manifest=lambda m, name=name: m.update(weights_file=name))
        shutil.copyfile(share[0] / WEIGHTS_FILE, crafted / "other.safetensors")
        with pytest.raises(CompactFormatError, match="weights_file") as err:
            read_compact(crafted)
        messages.add(str(err.value).replace(repr(name), "NAME").replace(str(crafted), "DIR"))
    assert len(messages) == 1, messages


@pytest.mark.parametrize("name", [MANIFEST_FILE, WEIGHTS_FILE, CONFIG_FILE])
def test_4_symlinked_files_are_refused(share, tmp_path, name):
    crafted = Path(shutil.copytree(share[0], tmp_path / "c"))
    secret = tmp_path / "elsewhere"
    shutil.move(crafted / name, secret)
    (crafted / name).symlink_to(secret)
    with pytest.raises(CompactFormatError, match="symbolic link"):
        read_compact(crafted)
    (crafted / name).unlink()
    os.mkfifo(crafted / name)  # would block a reader that opens it
    with pytest.raises(CompactFormatError, match="not a regular file"):
        read_compact(crafted)


def test_21_4_links_are_followed_only_in_huggingface_hubs_own_cache(hub, share, tmp_path):
    """Issue 21, item 4: a folder laid out like a cache snapshot (``snapshots/<commit>/`` whose files link into
    ``../../blobs/``) got the cache's exception by its folder names alone; with ``blobs`` a link to the user's home,
    push uploaded any file there and reads left the adapter's directory."""
    compact, _ = share
    push_to_hub(compact, REPO)
    # huggingface_hub's own cache, where a pushed repo keeps its compact adapter in loradrop/
    snapshot = fetch(REPO, allow_patterns=[f"{COMPACT_SUBFOLDER}/{name}" for name in sorted(COMPACT_LAYOUT.files)])
    assert (snapshot / COMPACT_SUBFOLDER / WEIGHTS_FILE).is_symlink(), "the client links snapshot files into its blobs"
    assert read_compact(snapshot).plan == read_compact(compact).plan

    home = Path(shutil.copytree(compact, tmp_path / "home"))
    (home / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    repo = tmp_path / "download" / "models--someone--adapter"
    crafted = repo / "snapshots" / "0123abc"
    crafted.mkdir(parents=True)
    (repo / "blobs").symlink_to(home)
    for name in COMPACT_FILES:
        (crafted / name).symlink_to(f"../../blobs/{'id_rsa' if name == 'README.md' else name}")
    with pytest.raises(CompactFormatError, match=r"symbolic link.*huggingface_hub's cache"):
        read_compact(crafted)
    commits = len(hub.requests_matching("POST", "/commit/"))
    with pytest.raises(CompactFormatError, match="symbolic link"):
        push_to_hub(crafted, f"{DEFAULT_USER}/leak")
    assert len(hub.requests_matching("POST", "/commit/")) == commits, "nothing was sent"


# ------------------------------------------------------------------------------------ 5. shapes and dtypes


def _first_dropped(directory: Path, part: str) -> str:
    dropped = json.loads((directory / MANIFEST_FILE).read_text())["dropped"]
    return next(key for key in dropped if f".lora_{part}." in key)


@pytest.mark.parametrize(
    "spec",
    [
        lambda r, n: {"shape": [2**40, n], "dtype": "float32"},
        lambda r, n: {"shape": [r], "dtype": "float32"},
        lambda r, n: {"shape": [r, n, 1], "dtype": "float32"},
        lambda r, n: {"shape": [2 * r, n], "dtype": "float32"},
        lambda r, n: {"shape": [r, n + 16], "dtype": "float32"},
        lambda r, n: {"shape": [r, -n], "dtype": "float32"},
        lambda r, n: {"shape": [r, True], "dtype": "float32"},
        lambda r, n: {"shape": f"{r}x{n}", "dtype": "float32"},
        lambda r, n: {"shape": [r, n], "dtype": "int64"},
        lambda r, n: {"shape": [r, n], "dtype": "Tensor"},
        lambda r, n: {"shape": [r, n], "dtype": "float32x"},
        lambda r, n: {"shape": [r, n]},
    ],
    ids=["huge", "1-D", "3-D", "rank", "width", "negative", "bool", "string", "int", "Tensor", "unknown", "no-dtype"],
)
def test_5_dropped_shapes_and_dtypes_are_checked(drop, tmp_path, spec, capsys):
    key = _first_dropped(drop[0], "A")
    r, n = json.loads((drop[0] / MANIFEST_FILE).read_text())["dropped"][key]["shape"]
    crafted = craft_compact(drop[0], tmp_path / "c", manifest=lambda m: m["dropped"].__setitem__(key, spec(r, n)))
    with pytest.raises(CompactFormatError, match=re.escape(key)):
        read_compact(crafted)
    assert main(["expand", str(crafted), str(tmp_path / "peft")]) == 1
    one_line_error(capsys)


@pytest.mark.parametrize("damage", ["nan", "inf", "int", "rank", "vector", "width"])
def test_5_stored_tensors_are_checked(share, tmp_path, damage):
    key, _ = _shared_group(share[0])
    if damage == "width":  # a width is checkable without the base model only against a module of the same kind
        plan = read_compact(share[0]).plan
        key = next(f"{name}.lora_A.weight" for name in plan.kept if plan.kinds[name] in plan.shared)

    def edit(weights: dict[str, torch.Tensor], manifest: dict) -> None:
        value = weights[key]
        weights[key] = {
            "nan": value.masked_fill(torch.rand(value.shape) < 0.1, math.nan),
            "inf": value.masked_fill(torch.rand(value.shape) < 0.1, math.inf),
            "int": value.to(torch.int32),
            "rank": torch.zeros(8, value.shape[1]),
            "vector": value.flatten(),
            "width": torch.zeros(value.shape[0], value.shape[1] + 1),
        }[damage]

    crafted = craft_compact(share[0], tmp_path / "c", tensors=edit)
    with pytest.raises(CompactFormatError, match=re.escape(key)):
        read_compact(crafted)


def test_21_10_a_dropped_module_larger_than_anything_stored_is_refused_before_allocating(drop, tmp_path, capsys):
    """Issue 21, item 10: an adapter of a few KB listed a dropped module of shape [2^20, 2^20] at a rank its config
    gave that module alone, so inspect reported terabytes and expand allocated 4 TiB for it."""
    compact, _ = drop
    key = _first_dropped(compact, "A")
    module, huge = key.removesuffix(".lora_A.weight"), 2**20

    def enormous(manifest: dict) -> None:
        for part in ("A", "B"):
            manifest["dropped"][f"{module}.lora_{part}.weight"] = {"shape": [huge, huge], "dtype": "float32"}

    crafted = craft_compact(
        compact,
        tmp_path / "c",
        manifest=enormous,
        config=lambda c: c.__setitem__("rank_pattern", {pattern_key(module): huge}),
    )
    assert (crafted / WEIGHTS_FILE).stat().st_size < 100_000
    with pytest.raises(CompactFormatError, match=r"dropped .* \[1048576, 1048576\], beyond any LoRA weight it stores"):
        read_compact(crafted)
    assert main(["inspect", str(crafted)]) == 1
    assert "beyond any LoRA weight it stores" in one_line_error(capsys)
    assert main(["expand", str(crafted), str(tmp_path / "peft")]) == 1
    assert "beyond any LoRA weight" in one_line_error(capsys) and not (tmp_path / "peft").exists()


@pytest.mark.parametrize("pattern", ["(a+)+", r"(.+)+x", r"(\w+\.?)*!"])
def test_21_11_a_catastrophic_target_modules_pattern_is_refused_at_once(share, tmp_path, pattern):
    """Issue 21, item 11: PEFT matches target_modules with Python's backtracking `re`; "(.+)+x" against the module
    names of this adapter took minutes. `inspect` (in a fresh process, as a user runs it) refuses it in one line."""
    crafted = craft_compact(share[0], tmp_path / "c", config=lambda c: c.__setitem__("target_modules", pattern))
    result = subprocess.run(
        [sys.executable, "-m", "hub_export.cli", "inspect", str(crafted)],
        capture_output=True,
        text=True,
        timeout=120,  # generous: the refusal takes a moment; matching "(.+)+x" as PEFT does takes minutes
        check=False,
    )
    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert (
        error.startswith("loradrop: error: ")
        and "target_modules" in error
        and "repeats more than a single character" in error
    )


def test_21_11_only_patterns_with_bounded_matching_time_are_accepted(share, tmp_path, capsys):
    """Patterns whose repetitions each repeat one character pass (the usual PEFT patterns); backreferences, too many
    repetitions, repeated groups in rank_pattern keys and overlong module names are refused."""
    compact, _ = share
    for pattern in [r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", r"model\.layers\.\d+\..*_proj"]:
        read_compact(
            craft_compact(
                compact, tmp_path / f"ok{len(pattern)}", config=lambda c, p=pattern: c.update(target_modules=p)
            )
        )
    refused = {
        "backreference": ({"target_modules": r"(.)\1.*_proj"}, "refers back to a group"),
        "four": ({"target_modules": r".*.*.*.*_proj"}, "with 4 repetitions"),
        "rank-key": (
            {"rank_pattern": {"(q+)+_proj": 2}},
            "rank_pattern the pattern '\\(q\\+\\)\\+_proj', which repeats more than a single",
        ),
    }
    for name, (edit, message) in refused.items():
        with pytest.raises(CompactFormatError, match=message):
            read_compact(craft_compact(compact, tmp_path / name, config=lambda c, e=edit: c.update(e)))
    long_name = craft_compact(
        compact,
        tmp_path / "long",
        manifest=lambda m: m["dropped"].update({"x" * 286 + ".lora_A.weight": {"shape": [4, 32], "dtype": "float32"}}),
    )
    with pytest.raises(CompactFormatError, match="module of 300 characters"):
        read_compact(long_name)
    assert main(["inspect", str(long_name)]) == 1  # its checks without PEFT bound the names too
    assert "module of 300 characters" in one_line_error(capsys)


# ------------------------------------------------------------------------------------ 6. plan and tensors agree


def test_6_tensors_stored_apart_from_what_the_plan_ties_are_refused(share, tmp_path):
    key, members = _shared_group(share[0])
    loner = members[1]

    def untie(weights: dict[str, torch.Tensor], manifest: dict) -> None:
        manifest["tensors"][key].remove(loner)
        manifest["tensors"][loner] = [loner]
        weights[loner] = torch.randn(weights[key].shape)

    crafted = craft_compact(share[0], tmp_path / "c", tensors=untie)
    with pytest.raises(CompactFormatError, match=rf"{re.escape(loner)}.*plan"):
        read_compact(crafted)


def test_6_a_kept_module_tied_to_another_is_refused(share, tmp_path):
    key, _ = _shared_group(share[0])
    plan = read_compact(share[0]).plan
    kept = f"{plan.kept[0]}.lora_A.weight"

    def tie(weights: dict[str, torch.Tensor], manifest: dict) -> None:
        del weights[kept]
        del manifest["tensors"][kept]
        manifest["tensors"][key].append(kept)

    crafted = craft_compact(share[0], tmp_path / "c", tensors=tie)
    with pytest.raises(CompactFormatError, match=re.escape(kept)):
        read_compact(crafted)


def test_6_a_dropped_module_with_stored_weights_is_refused(drop, tmp_path):
    key = _first_dropped(drop[0], "B")

    def store(weights: dict[str, torch.Tensor], manifest: dict) -> None:
        shape = manifest["dropped"].pop(key)["shape"]
        weights[key] = torch.randn(shape)
        manifest["tensors"][key] = [key]

    crafted = craft_compact(drop[0], tmp_path / "c", tensors=store)
    with pytest.raises(CompactFormatError, match=re.escape(key)):
        read_compact(crafted)


# ------------------------------------------------------------------------------------ 7. the base model stays untouched


def test_7_a_base_model_with_more_layers_is_refused_untouched_and_a_retry_works(share, two_layers):
    base = tiny_llama_base(seed=0)
    before = _fingerprint(base)
    with pytest.raises(BaseModelMismatchError, match=r"no weights for.*'model\.layers\.[23]\."):
        load_compact(base, two_layers[0])
    _assert_unchanged(base, before)
    torch.testing.assert_close(model_logits(load_compact(base, share[0])), share[1], rtol=0, atol=0)


def _remove_module_from_plan(manifest: dict) -> None:
    plan = manifest["plan"]
    name = plan["kept"][-1]
    renamed = re.sub(r"layers\.\d+", "layers.9", name)
    plan["kinds"][renamed] = plan["kinds"].pop(name)
    plan["kept"][-1] = renamed
    plan["importance"][renamed] = plan["importance"].pop(name)


@pytest.mark.parametrize(
    "edit",
    [
        {"config": lambda c: c.update(r=8)},
        {"config": lambda c: c.update(use_dora=True)},
        {"config": lambda c: c.update(lora_bias=True)},
        {"config": lambda c: c.update(init_lora_weights="pissa")},
        {"config": lambda c: c.update(target_modules=["q_proj"])},
        {"config": lambda c: c.update(rank_pattern={"k_proj": 2})},
        {"manifest": _remove_module_from_plan},
    ],
    ids=["r", "use_dora", "lora_bias", "pissa", "targets", "rank_pattern", "plan-module"],
)
def test_7_an_inconsistent_adapter_is_refused_before_touching_the_model(share, tmp_path, edit):
    base = tiny_llama_base(seed=0)
    before = _fingerprint(base)
    crafted = craft_compact(share[0], tmp_path / "c", **edit)
    with pytest.raises(CompactFormatError):
        load_compact(base, crafted)
    _assert_unchanged(base, before)
    torch.testing.assert_close(model_logits(load_compact(base, share[0])), share[1], rtol=0, atol=0)


def test_7_a_failure_after_peft_injected_its_layers_is_undone(share, monkeypatch):
    base = tiny_llama_base(seed=0)
    before = _fingerprint(base)

    def fail(*args, **kwargs):
        raise RuntimeError("late failure")

    monkeypatch.setattr(hub_export.loader, "apply_plan", fail)
    with pytest.raises(RuntimeError, match="late failure"):
        load_compact(base, share[0])
    _assert_unchanged(base, before)
    monkeypatch.undo()
    torch.testing.assert_close(model_logits(load_compact(base, share[0])), share[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ 8. the Hub only when asked


def test_8_a_missing_local_path_is_an_error_not_a_download(hub, share, tmp_path, monkeypatch, capsys):
    hub.create_repo("out/compact")
    hub.commit("out/compact", tree_bytes(share[0]))  # someone owns the namespace "out" on the Hub
    monkeypatch.chdir(tmp_path)
    hub.clear_requests()
    with pytest.raises(CompactFileNotFoundError, match=r"out/compact does not exist.*load_from_hub"):
        load_compact(tiny_llama_base(seed=0), "out/compact")
    with pytest.raises(CompactFileNotFoundError, match="does not exist"):
        expand_to_peft("out/compact", tmp_path / "peft")
    for command in (["inspect", "out/compact"], ["expand", "out/compact", "peft"]):
        assert main(command) == 1
        assert "hf://out/compact" in one_line_error(capsys)
    assert hub.requests == [], "nothing may reach the Hub without an explicit hf:// or a Hub function"

    assert main(["inspect", "hf://out/compact"]) == 0
    assert "format version 1" in capsys.readouterr().out
    assert main(["expand", "hf://out/compact", "peft"]) == 0
    assert sorted(tree_bytes(tmp_path / "peft")) == sorted(PEFT_FILES)


def test_8_revision_with_a_local_directory_is_a_usage_error(share, tmp_path, capsys):
    assert main(["inspect", str(share[0]), "--revision", "v1"]) == 2
    assert "--revision" in capsys.readouterr().err
    assert main(["expand", str(share[0]), str(tmp_path / "peft"), "--revision", "v1"]) == 2
    assert not (tmp_path / "peft").exists()


# ------------------------------------------------------------------------------------ 9. push only the adapter


def test_9_push_uploads_only_the_adapter_files_and_lists_them(hub, share, tmp_path, capsys):
    local = Path(shutil.copytree(share[0], tmp_path / "local"))
    (local / "notes.txt").write_text("private notes")
    (tmp_path / "secret").write_text("hf_secret_token")
    (local / "secret.txt").symlink_to(tmp_path / "secret")
    (local / "checkpoint-3").mkdir()
    (local / "checkpoint-3" / "optimizer.pt").write_text("state")
    url = push_to_hub(local, REPO)
    expected = sorted({"README.md"} | PEFT_FILES | {f"loradrop/{name}" for name in COMPACT_FILES - {"README.md"}})
    assert url.files == expected and url == f"{hub.endpoint}/{REPO}/commit/{hub.head(REPO)}"
    assert sorted(set(hub.files_at(REPO)) - {".gitattributes"}) == expected

    assert main(["push", str(local), f"{DEFAULT_USER}/cli"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{hub.endpoint}/{DEFAULT_USER}/cli/commit/{hub.head(f'{DEFAULT_USER}/cli')}"
    assert sorted(line.strip() for line in out[1:-1]) == expected
    for repo in (REPO, f"{DEFAULT_USER}/cli"):
        assert not any(b"hf_secret_token" in data for data in hub.files_at(repo).values()), "a link's target stays"


def test_9_an_adapter_file_that_is_a_symlink_is_not_pushed(hub, share, tmp_path):
    local = Path(shutil.copytree(share[0], tmp_path / "local"))
    (tmp_path / "secret").write_text("hf_secret_token")
    (local / "loradrop_importance.png").unlink()
    (local / "loradrop_importance.png").symlink_to(tmp_path / "secret")
    with pytest.raises(CompactFormatError, match=r"loradrop_importance\.png.*symbolic link"):
        push_to_hub(local, REPO)
    assert hub.requests_matching("POST", "/commit/") == []
    (local / "loradrop_importance.png").unlink()
    (local / "README.md").unlink()
    (local / "README.md").symlink_to(tmp_path / "secret")
    push_to_hub(local, REPO)  # the repo's card is written anew for the repo, never read from the directory
    assert not any(b"hf_secret_token" in data for data in hub.files_at(REPO).values())


# ------------------------------------------------------------------------------------ smaller items


def test_small_inspect_of_a_file_says_it_is_not_a_directory(share, capsys):
    assert main(["inspect", str(share[0] / MANIFEST_FILE)]) == 1
    assert "not a directory" in one_line_error(capsys)


def test_small_format_version_true_is_refused(share, tmp_path):
    crafted = craft_compact(share[0], tmp_path / "c", manifest=lambda m: m.update(format_version=True))
    with pytest.raises(UnsupportedFormatVersionError, match="version True"):
        read_compact(crafted)


@pytest.mark.parametrize(
    "edit",
    [
        lambda plan: plan.update(mode="bogus"),
        lambda plan: plan["importance"].update({next(iter(plan["importance"])): math.nan}),
        lambda plan: plan["importance"].update({next(iter(plan["importance"])): -0.5}),
        lambda plan: plan["importance"].pop(next(iter(plan["importance"]))),
    ],
    ids=["mode", "nan", "negative", "missing"],
)
def test_small_bad_plans_are_refused(share, tmp_path, edit):
    payload = json.loads((share[0] / MANIFEST_FILE).read_text())["plan"]
    edit(payload)
    with pytest.raises(ValueError):
        DropPlan.from_dict(payload)
    crafted = craft_compact(share[0], tmp_path / "c", manifest=lambda m: edit(m["plan"]))
    with pytest.raises(CompactFormatError, match="plan"):
        read_compact(crafted)


@pytest.mark.parametrize("error_code", ["EntryNotFound", None])
def test_small_a_file_missing_on_the_hub_is_reported_as_missing(hub, share, tmp_path, error_code):
    push_to_hub(share[0], REPO)
    hub.fail_next(rf"/resolve/.*/{WEIGHTS_FILE}$", 404, count=10, error_code=error_code, message="Entry not found")
    with pytest.raises(CompactFileNotFoundError, match=rf"{WEIGHTS_FILE}.*(missing|lacks)"):
        pull(REPO, tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["push", "--help"]])
def test_small_version_and_help_import_no_ml_library(argv):
    code = (
        "import sys\nfrom hub_export.cli import main\n"
        f"assert main({argv!r}) == 0\n"
        "heavy = sorted({'torch', 'transformers', 'peft', 'huggingface_hub'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("loradrop " if argv == ["--version"] else "usage: loradrop")


def test_21_18_a_directory_of_the_users_own_readme_or_config_is_not_replaced(share, tmp_path):
    """Issue 21, item 18: a README.md (or an adapter_config.json) alone is no output of this library's."""
    compact, _ = share
    readme = tmp_path / "notes"
    readme.mkdir()
    (readme / "README.md").write_text("my notes")
    with pytest.raises(TargetExistsError, match=r"holds README\.md, which are no files of a compact adapter"):
        save_compact(load_compact(tiny_llama_base(), compact), readme)
    config = tmp_path / "config"
    config.mkdir()
    (config / "adapter_config.json").write_text("{}")
    with pytest.raises(TargetExistsError, match=r"holds adapter_config\.json"):
        expand_to_peft(compact, config)
    assert (readme / "README.md").read_text() == "my notes" and (config / "adapter_config.json").read_text() == "{}"
    assert expand_to_peft(compact, tmp_path / "peft") and expand_to_peft(compact, tmp_path / "peft"), (
        "its own: replaced"
    )


def test_21_16_modules_to_save_without_their_weights_are_refused(share, tmp_path):
    """Issue 21, item 16: a modules_to_save entry whose weights the adapter lacks gave a raw KeyError from
    load_compact. Only the base model tells whether such an entry names a module (issue 27: PEFT 0.22 lists
    `pre_classifier` in every classification adapter, with no weights on a model without one), so the loader refuses
    it and the checks without a model (inspect, expand) let it pass."""
    compact, _ = share
    listed = craft_compact(compact, tmp_path / "listed", config=lambda c: c.__setitem__("modules_to_save", ["lm_head"]))
    base = tiny_llama_base()
    before = _fingerprint(base)
    with pytest.raises(CompactFormatError, match=r"lists 'lm_head' in modules_to_save but does not store"):
        load_compact(base, listed)
    _assert_unchanged(base, before)

    def one_of_four(weights: dict, manifest: dict) -> None:  # the entry matches four layers; only one is stored
        key = "base_model.model.model.layers.0.input_layernorm.weight"
        weights[key] = torch.ones(32)
        manifest["tensors"][key] = [key]

    partial = craft_compact(
        compact,
        tmp_path / "partial",
        tensors=one_of_four,
        config=lambda c: c.__setitem__("modules_to_save", ["input_layernorm"]),
    )
    with pytest.raises(CompactFormatError, match=r"'model\.layers\.1\.input_layernorm'.*does not store"):
        load_compact(base, partial)
    _assert_unchanged(base, before)


def test_27_1_a_modules_to_save_entry_that_matches_no_module_loads_everywhere(share, tmp_path):
    """Issue 27, item 1: PEFT 0.22 adds `pre_classifier` to the modules_to_save of every classification adapter, with
    no weights when the model has no such module, and loads such an adapter as it is; so do load_compact, expand and
    plain PEFT on the expansion, with the trained logits."""
    compact, logits = share
    listed = craft_compact(
        compact, tmp_path / "listed", config=lambda c: c.__setitem__("modules_to_save", ["pre_classifier"])
    )
    torch.testing.assert_close(model_logits(load_compact(tiny_llama_base(), listed)), logits, rtol=0, atol=0)
    expanded = expand_to_peft(listed, tmp_path / "peft")
    plain = PeftModel.from_pretrained(tiny_llama_base(), expanded).eval()
    torch.testing.assert_close(model_logits(plain), logits, rtol=0, atol=0)


def test_21_13_a_full_disk_while_writing_is_one_line_and_replaces_nothing(share, tmp_path, monkeypatch, capsys):
    """Issue 21, item 13: safetensors reports a full disk as its own error type, which came out as a traceback."""
    compact, _ = share
    expand_to_peft(compact, tmp_path / "peft")
    before = tree_bytes(tmp_path / "peft")

    def full_disk(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'
        )

    monkeypatch.setattr("hub_export.files.save_file", full_disk)
    assert main(["expand", str(compact), str(tmp_path / "peft")]) == 1
    error = one_line_error(capsys)
    assert "Could not write" in error and "No space" in error and "nothing was replaced" in error
    assert tree_bytes(tmp_path / "peft") == before


def test_21_3_pull_rebuilds_the_plain_adapter_and_never_takes_the_repos(hub, share, tmp_path):
    """A repo may ship a plain PEFT adapter that computes something else than its compact one (here with a base-model
    key, which PEFT would write into the base weights): a pull expands the checked compact adapter instead, whether
    the repo keeps the plain copy at its root or, as pushed before, in peft/."""
    honest = tree_bytes(expand_to_peft(share[0], tmp_path / "honest"))
    hostile = expand_to_peft(share[0], tmp_path / "hostile")
    weights = load_file(hostile / "adapter_model.safetensors")
    weights["base_model.model.model.embed_tokens.weight"] = torch.zeros(VOCAB, 32)
    save_file(weights, hostile / "adapter_model.safetensors", metadata={"format": "pt"})
    push_to_hub(share[0], REPO)
    hub.commit(REPO, tree_bytes(hostile))  # the root's plain adapter replaced behind the compact one's back
    old = f"{DEFAULT_USER}/pushed-before"
    hub.create_repo(old)
    hub.commit(old, {**tree_bytes(share[0]), **{f"peft/{name}": data for name, data in tree_bytes(hostile).items()}})
    for repo in (REPO, old):
        pulled = pull(repo, tmp_path / repo.replace("/", "-"))
        assert {name: (pulled / name).read_bytes() for name in honest} == honest, repo
        assert not (pulled / "peft").exists()
        plain = PeftModel.from_pretrained(tiny_llama_base(seed=0), str(pulled))
        torch.testing.assert_close(model_logits(plain), share[1], rtol=0, atol=0)


@pytest.mark.parametrize("asked", [True, False], ids=["private-into-public", "public-into-private"])
def test_21_7_a_push_refuses_a_repo_of_the_other_visibility(hub, share, capsys, asked):
    hub.create_repo(REPO, private=not asked)
    hub.clear_requests()
    found = "public" if asked else "private"
    with pytest.raises(RepoVisibilityError, match=f"{REPO} is a {found} repo.*nothing was uploaded"):
        push_to_hub(share[0], REPO, private=asked)
    if asked:
        assert main(["push", str(share[0]), REPO, "--private"]) == 1
        assert "is a public repo, but the push asks for a private one" in one_line_error(capsys)
    assert hub.requests_matching("POST", "") == [], "nothing is created, branched or committed"
    assert set(hub.files_at(REPO)) == {".gitattributes"} and hub.repo(REPO).private is not asked
    push_to_hub(share[0], REPO)  # the visibility left unset pushes into the repo as it is
    push_to_hub(share[0], REPO, private=not asked)
    assert hub.repo(REPO).private is not asked and "README.md" in hub.files_at(REPO)


def _norm_saved_as(entry: str):
    """Crafted: modules_to_save [entry] and weights for the base model's final norm (5.0 where it holds 1.0)."""

    def edit(config: dict) -> None:
        config["modules_to_save"] = [entry]

    def store(weights: dict, manifest: dict) -> None:
        key = "base_model.model.model.norm.weight"
        weights[key] = torch.full((32,), 5.0)
        manifest["tensors"][key] = [key]

    return {"config": edit, "tensors": store}


def test_28_2_a_modules_to_save_entry_never_loads_into_the_base_models_own_weights(
    share, tmp_path, monkeypatch, capsys
):
    """Issue 28, item 2: `modules_to_save=["orm"]` with weights under `model.norm`: a plain suffix match took the entry
    to cover `model.norm`, PEFT (which matches at module boundaries) wrapped nothing, and `load_state_dict` wrote the
    "saved" norm into the base model's own weight. The entry is matched as PEFT matches it, and, after PEFT has built
    the model, every key must load into a LoRA layer or a modules_to_save copy, checked before anything is written:
    even with the validator's name rule loosened back to plain suffixes, nothing reaches the base model."""
    compact, logits = share
    crafted = craft_compact(compact, tmp_path / "orm", **_norm_saved_as("orm"))
    base = tiny_llama_base()
    before = _fingerprint(base)
    for attempt in (read_compact, lambda d: load_compact(base, d), lambda d: expand_to_peft(d, tmp_path / "peft")):
        with pytest.raises(CompactFormatError, match=r"'base_model\.model\.model\.norm\.weight'"):
            attempt(crafted)
    assert main(["expand", str(crafted), str(tmp_path / "peft")]) == 1
    assert "model.norm.weight" in one_line_error(capsys) and not (tmp_path / "peft").exists()
    _assert_unchanged(base, before)

    def suffix(name: str, entry: str) -> bool:  # the rule before issue 27
        return name.endswith(entry)

    monkeypatch.setattr(hub_export.validate, "is_saved_module", suffix)
    with pytest.raises(CompactFormatError, match=r"model\.norm\.weight'.*would load into this base model's own weight"):
        load_compact(base, crafted)
    _assert_unchanged(base, before)
    monkeypatch.undo()

    # "base_layer" names no module of the base model, but PEFT, matching after it put LoRA in, copies every LoRA
    # layer's base layer: the adapter stores none of their weights, which PEFT failed on with a bare KeyError
    listed = craft_compact(compact, tmp_path / "base_layer", config=lambda c: c.update(modules_to_save=["base_layer"]))
    with pytest.raises(CompactFormatError, match=r"does not store '.*\.base_layer\.weight', a weight of a module PEFT"):
        load_compact(base, listed)
    _assert_unchanged(base, before)
    model = load_compact(base, compact)
    torch.testing.assert_close(model_logits(model), logits, rtol=0, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(model_logits(model), model_logits(tiny_llama_base()), rtol=0, atol=0)


def test_28_3_a_refused_load_leaves_the_base_models_weights_as_they_were(share, tmp_path, monkeypatch):
    """Issue 28, item 3: item 2's trick plus an entry whose weight PEFT cannot place (a `q_proj` weight, which PEFT
    moves below LoRA's `base_layer`): the crafted norm was written, then the load refused for the unexpected key, and
    the rollback put the module tree back but not the norm's values, so the genuine adapter loaded onto the same base
    model afterwards was off. Every key is now checked against what PEFT built before any is written (the name rule
    of the validator is loosened to plain suffixes here so that the crafted keys reach that check), and the rollback
    puts back every module's own state, the hooks PEFT adds included."""
    compact, logits = share
    query = "base_model.model.model.layers.0.self_attn.q_proj.weight"

    def store(weights: dict, manifest: dict) -> None:
        _norm_saved_as("orm")["tensors"](weights, manifest)
        weights[query] = torch.zeros(32, 32)
        manifest["tensors"][query] = [query]

    crafted = craft_compact(
        compact, tmp_path / "c", tensors=store, config=lambda c: c.update(modules_to_save=["orm", "_proj"])
    )
    monkeypatch.setattr(hub_export.validate, "is_saved_module", lambda name, entry: name.endswith(entry))
    base = tiny_llama_base()
    before = _fingerprint(base)
    with pytest.raises((CompactFormatError, BaseModelMismatchError)):
        load_compact(base, crafted)
    _assert_unchanged(base, before)
    monkeypatch.undo()
    torch.testing.assert_close(model_logits(load_compact(base, compact)), logits, rtol=0, atol=0)

    # a trainable load with activation checkpointing hooks the input embeddings before the weights are checked
    base = tiny_llama_base()
    base.activation_checkpointing_enable()
    hooks = {name: dict(module._forward_hooks) for name, module in base.named_modules()}
    before = _fingerprint(base)
    listed = craft_compact(compact, tmp_path / "listed", config=lambda c: c.update(modules_to_save=["base_layer"]))
    with pytest.raises(CompactFormatError, match="base_layer"):
        load_compact(base, listed, is_trainable=True)
    _assert_unchanged(base, before)
    assert {name: dict(module._forward_hooks) for name, module in base.named_modules()} == hooks


def test_28_5_pattern_keys_are_bounded_by_the_adapters_modules_and_each_must_match_one(share, tmp_path, capsys):
    """Issue 28, item 5: 3,000 literal rank_pattern keys (47 KB) took read_compact from 0.01 s to 20 s on this 28-module
    adapter (PEFT matches every key against every module, recompiling each once `re`'s cache is full), hours for a
    large one. The entries are bounded by the adapter's modules and a key that matches none of them is refused, at
    once, by every reader; the writers leave such keys out (PEFT never uses them)."""
    compact, logits = share
    many = {f"model.layers.{i}.self_attn.q_proj": 4 for i in range(3000)}
    crafted = craft_compact(compact, tmp_path / "many", config=lambda c: c.update(rank_pattern=many))
    unused = craft_compact(compact, tmp_path / "unused", config=lambda c: c.update(rank_pattern={"lm_head": 8}))
    start = time.perf_counter()
    with pytest.raises(CompactFormatError, match=r"rank_pattern 3,000 entries; an adapter of 28 LoRA modules"):
        read_compact(crafted)
    for command in (["inspect", str(crafted)], ["expand", str(crafted), str(tmp_path / "peft")]):
        assert main(command) == 1
        assert "3,000 entries" in one_line_error(capsys)
    assert time.perf_counter() - start < 3
    modules = [f"base_model.model.layers.{i}.proj" for i in range(1500)]  # a large adapter: 3,064 entries a field
    keys = {f"layers\\.{i}\\.proj": 2 for i in range(600)}
    check_counts({"rank_pattern": keys, "alpha_pattern": keys}, modules, "a config")  # 1,800,000 matches: it passes
    many = {f"layers\\.{i}\\.proj": 2 for i in range(1400)}
    with pytest.raises(CompactFormatError, match=r"1,400 rank_pattern and alpha_pattern keys .* past 2,097,152"):
        check_counts({"rank_pattern": many}, modules, "a config")
    with pytest.raises(CompactFormatError, match=r"rank_pattern the key 'lm_head', which matches none of its 28"):
        load_compact(tiny_llama_base(), unused)
    assert main(["inspect", str(unused)]) == 1
    assert "matches none" in one_line_error(capsys)

    model, plan = _tied("share")
    model.peft_config["default"].rank_pattern = {"lm_head": 8}  # the user's, matching no LoRA module: PEFT ignores it
    written = save_compact(model, tmp_path / "written", plan=plan)
    assert read_compact(written).peft_config["rank_pattern"] == {}
    torch.testing.assert_close(model_logits(load_compact(tiny_llama_base(), written)), logits, rtol=0, atol=0)


@pytest.mark.parametrize("depth", [600, 505])
def test_28_7_deeply_nested_patterns_and_json_are_one_line_errors(share, tmp_path, capsys, depth):
    """Issue 28, item 7: a pattern nested about 600 groups deep, or a manifest of deeply nested JSON, ended `inspect`
    and `expand` with a RecursionError traceback. Patterns are bounded in length, JSON files in size and nesting, and
    what still recurses too deeply where input is parsed is a one-line error."""
    compact, _ = share
    nested = "(" * depth + "q_proj" + ")" * depth  # 600 is over the length bound; 505 within it, too deep to parse
    pattern = craft_compact(compact, tmp_path / "pattern", config=lambda c: c.update(target_modules=nested))
    manifest = Path(shutil.copytree(compact, tmp_path / "manifest"))
    text = (manifest / MANIFEST_FILE).read_text()
    (manifest / MANIFEST_FILE).write_text(text[: text.rindex("}")] + f', "x": {"[" * 100 * depth}{"]" * 100 * depth}}}')
    for crafted, message in ((pattern, "target_modules"), (manifest, "nests its JSON")):
        for command in (["inspect", str(crafted)], ["expand", str(crafted), str(tmp_path / "peft")]):
            assert main(command) == 1
            assert message in one_line_error(capsys)
    (manifest / MANIFEST_FILE).write_text(json.dumps({**json.loads(text), "x": json.loads("[" * 40 + "]" * 40)}))
    with pytest.raises(CompactFormatError, match="more than 32 levels deep"):
        read_compact(manifest)
    with open(manifest / MANIFEST_FILE, "wb") as huge:  # sparse: no disk used
        huge.truncate(64 * 2**20 + 1)
    with pytest.raises(CompactFormatError, match=r"holds 67,108,865 bytes, more than"):
        read_compact(manifest)


def _first_kind(value):
    def edit(manifest: dict) -> None:
        kinds = manifest["plan"]["kinds"]
        kinds[next(iter(kinds))] = value

    return edit


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"manifest": _first_kind(["q_proj"])}, "kinds"),
        ({"manifest": _first_kind(3)}, "kinds"),
        ({"manifest": lambda m: m["plan"].update(threshold="0.9")}, "threshold"),
        ({"manifest": lambda m: m["plan"].update(config=[1])}, "config"),
        ({"manifest": lambda m: m.update(adapter_name=5)}, "adapter_name"),
        ({"config": lambda c: c.update(target_modules=[1, "q_proj"])}, "target_modules"),
        ({"config": lambda c: c.update(target_modules=5)}, "target_modules"),
        ({"config": lambda c: c.update(layers_pattern=5)}, "layers_pattern"),
        ({"config": lambda c: c.update(modules_to_save="lm_head")}, "modules_to_save"),
        ({"config": lambda c: c.update(base_model_name_or_path={"id": "org/name"})}, "base_model_name_or_path"),
        ({"config": lambda c: c.update(use_rslora="yes")}, "use_rslora"),
    ],
    ids=[
        "kinds-list",
        "kinds-number",
        "threshold",
        "extra-config",
        "adapter_name",
        "targets-int",
        "targets-number",
        "layers_pattern",
        "modules_to_save-string",
        "base-dict",
        "use_rslora",
    ],
)
def test_28_8_fields_of_the_wrong_json_type_are_refused_where_they_are_read(share, tmp_path, capsys, edit, field):
    """Issue 28, item 8: plan kinds that are lists or numbers, non-string target_modules entries or layers_pattern,
    a base_model_name_or_path that is a dict ended `inspect` / `expand` with a TypeError traceback, or were written on
    into the expanded config. Every field is checked for the JSON type PEFT (or the plan) holds there, where it is
    read, in one line that names it."""
    crafted = craft_compact(share[0], tmp_path / "c", **edit)
    for command in (["inspect", str(crafted)], ["expand", str(crafted), str(tmp_path / "peft")]):
        assert main(command) == 1
        assert field in one_line_error(capsys)
    assert not (tmp_path / "peft").exists()
    with pytest.raises(CompactFormatError, match=field):
        load_compact(tiny_llama_base(), crafted)
