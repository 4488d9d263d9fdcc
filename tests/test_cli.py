"""The `loradrop` command: exit codes and output of inspect/expand/push/pull, called through `main([...])`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TokenDataset, one_line_error, tiny_llama, tiny_llama_base, training_args, tree_bytes
from hub_server import DEFAULT_USER
from peft import PeftModel
from transformers import Trainer

from hub_export import save_compact
from hub_export.cli import main
from loradrop_trainer import LoraDropCallback

REPO = f"{DEFAULT_USER}/cli-adapter"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    args = training_args(root)
    model = tiny_llama()
    Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[LoraDropCallback(alpha=0.2)]).train()
    return save_compact(model, root / "compact", plan=args.output_dir)


def test_inspect_prints_plan_sizes_and_version(compact, capsys):
    assert main(["inspect", str(compact)]) == 0
    out = capsys.readouterr().out
    assert "format version 1" in out and "mode truncate" in out and "threshold 0.5" in out
    assert "q_proj" in out and "down_proj" in out and "modules keep their full-rank LoRA" in out
    assert "bytes instead of" in out


def _imported_after(code: str, *names: str) -> list[str]:
    """Which of `names` a fresh Python process has imported after running `code` (from this checkout)."""
    check = f"import sys\n{code}\nprint('imported:', *[name for name in {names!r} if name in sys.modules])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1].split()[1:]


def test_22_6_inspect_of_a_compact_adapter_does_not_import_peft(compact):
    """Issue 22, item 6: `loradrop inspect` reads the files with the checks that need no PEFT (seconds to import, and
    bitsandbytes with it); only torch, for the weights, is imported."""
    code = f"from hub_export.cli import main\nassert main(['inspect', {str(compact)!r}]) == 0"
    assert _imported_after(code, "peft", "bitsandbytes", "transformers") == []


def test_22_6_importing_the_packages_imports_no_bitsandbytes():
    """Issue 22, item 6: neither package imports bitsandbytes (PEFT does, so neither imports PEFT either) when only
    settings, plans, the compact format or the command's help are needed: it is for 4-bit models, and prints
    warnings on import."""
    code = (
        "import loradrop_trainer, hub_export, hub_export.cli\n"
        "from loradrop_trainer import DropPlan, LoraDropConfig\n"
        "from hub_export import CompactAdapter\n"
        "LoraDropConfig(score='relative', aggregate='rank')\n"
        "assert hub_export.cli.main(['inspect', '--help']) == 0"
    )
    assert _imported_after(code, "bitsandbytes", "peft") == []


@pytest.mark.parametrize(
    "command",
    [["inspect", "missing"], ["expand", "missing", "out"], ["compact", "missing", "out"], ["pull", "a/b/c", "o"]],
)
def test_27_n5_a_wrong_path_is_answered_without_importing_torch(command, tmp_path):
    """Issue 27, newcomer item 5: saying that a path does not exist took up to 48 s under load, importing torch and
    transformers first."""
    code = f"import os\nos.chdir({str(tmp_path)!r})\nfrom hub_export.cli import main\nassert main({command!r}) == 1"
    assert _imported_after(code, "torch", "peft") == []


def test_inspect_bad_path_fails_with_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    error = one_line_error(capsys)
    assert "does not exist" in error and "hf://" not in error, "issue 21, item 14: no hf:// for an absolute path"
    assert main(["inspect", "someone/adapter"]) == 1  # reads as a repo id: the hint says how to ask for the Hub
    assert "write hf://someone/adapter" in one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 1
    assert "not a LoRA-drop compact adapter" in one_line_error(capsys)


def test_expand_writes_a_plain_peft_adapter(compact, tmp_path, capsys):
    assert main(["expand", str(compact), str(tmp_path / "peft")]) == 0
    assert "plain PEFT adapter written to" in capsys.readouterr().out
    model = PeftModel.from_pretrained(tiny_llama_base(seed=0), str(tmp_path / "peft"))
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 96)


def test_expand_refuses_a_directory_of_other_files(compact, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    assert main(["expand", str(compact), str(tmp_path / "busy")]) == 1
    assert "holds notes.txt" in one_line_error(capsys)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep"


def test_push_then_pull(hub, compact, tmp_path, capsys):
    assert main(["push", str(compact), REPO, "--private", "--revision", "dev", "--message", "v1"]) == 0
    url = capsys.readouterr().out.splitlines()[-1]
    assert url == f"{hub.endpoint}/{REPO}/commit/{hub.head(REPO, 'dev')}"
    assert hub.repo(REPO).private and hub.repo(REPO).commits[hub.head(REPO, "dev")].title == "v1"
    assert "adapter_model.safetensors" in hub.files_at(REPO, "dev")

    assert main(["pull", REPO, str(tmp_path / "pulled"), "--revision", "dev"]) == 0
    assert "pulled into" in capsys.readouterr().out
    assert tree_bytes(tmp_path / "pulled") == {k: v for k, v in hub.files_at(REPO, "dev").items() if k[0] != "."}
    assert main(["inspect", f"hf://{REPO}", "--revision", "dev"]) == 0
    assert "format version 1" in capsys.readouterr().out


def test_push_failures(hub, compact, tmp_path, monkeypatch, capsys):
    assert main(["push", str(tmp_path / "missing"), REPO]) == 1
    assert "is not a directory" in one_line_error(capsys)
    local = Path(shutil.copytree(compact, tmp_path / "local"))
    monkeypatch.setenv("HF_TOKEN", "hf_invalid")
    assert main(["push", str(local), REPO]) == 1
    assert "authentication failed" in one_line_error(capsys)
    assert tree_bytes(local) == tree_bytes(compact)


def test_push_and_expand_name_the_base_model_by_its_hub_id(hub, compact, tmp_path, capsys):
    local = Path(shutil.copytree(compact, tmp_path / "local"))
    config = json.loads((local / "adapter_config.json").read_text())
    (local / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path)}))
    assert main(["push", str(local), REPO]) == 1
    assert "--base_model org/name" in one_line_error(capsys)
    assert main(["push", str(local), REPO, "--base_model", "org/tiny-llama"]) == 0
    for name in ("adapter_config.json", "loradrop/adapter_config.json"):
        assert json.loads(hub.files_at(REPO)[name])["base_model_name_or_path"] == "org/tiny-llama"
    assert "base_model: org/tiny-llama" in hub.files_at(REPO)["README.md"].decode()
    assert main(["expand", str(local), str(tmp_path / "peft"), "--base_model", "org/tiny-llama"]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "org/tiny-llama"
    )
    assert main(["expand", str(local), str(tmp_path / "peft2"), "--base_model", str(tmp_path)]) == 1
    assert "not a Hub model id" in one_line_error(capsys)


def test_pull_of_a_missing_repo_leaves_no_directory(hub, tmp_path, capsys):
    assert main(["pull", f"{DEFAULT_USER}/missing", str(tmp_path / "dst")]) == 1
    assert "does not exist" in one_line_error(capsys)
    assert list(tmp_path.glob("*dst*")) == []


@pytest.mark.parametrize("command", [[], ["inspect"], ["expand"], ["push"], ["pull"]])
def test_help(command, capsys):
    assert main([*command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: loradrop {' '.join(command)}".rstrip())


@pytest.mark.parametrize("argv", [[], ["bogus"], ["expand", "only-one"], ["push", "src", "repo", "--bogus"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: loradrop" in capsys.readouterr().err


def test_22_5_the_local_path_warning_names_the_command_line_flag(compact, tmp_path, caplog):
    """Issue 22, item 5: on the command line, the warning about a base model named by a local path names the flag
    that fixes it (`--base_model org/name`), not only the Python keyword."""
    from helpers import craft_compact

    local = craft_compact(compact, tmp_path / "local", config=lambda c: c.update(base_model_name_or_path=str(tmp_path)))
    with caplog.at_level("WARNING"):
        assert main(["expand", str(local), str(tmp_path / "peft")]) == 0
    assert "--base_model org/name" in caplog.text


def test_27_n3_compact_of_a_directory_without_an_adapter_says_what_it_holds(tmp_path, capsys):
    """Issue 27, newcomer item 3: the quickstart's output directory of before (a plan, results, compact/) was called
    an incomplete adapter to download or export again."""
    (tmp_path / "compact").mkdir()
    (tmp_path / "loradrop_plan.json").write_text("{}")
    assert main(["compact", str(tmp_path), str(tmp_path / "compact2")]) == 1
    error = one_line_error(capsys)
    assert "holds no PEFT adapter (no adapter_config.json; it holds compact/, loradrop_plan.json)" in error
    assert "trainer.save_model(DIR)" in error and not (tmp_path / "compact2").exists()
