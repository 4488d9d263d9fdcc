"""The `loradrop` command: inspect, expand, compact, push and pull LoRA-drop compact adapters.

A SOURCE is a local directory, or `hf://user/name` for a Hub repo: the Hub is reached only when asked, so a mistyped
local path is an error, never the download of whatever repo has that name. `push` and `pull` take a repo id (with
or without `hf://`). Exit codes: 0 success, 1 the operation failed (a one-line message on stderr), 2 the command
line is wrong. Hub settings (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE, the cache) and the transfer progress bars are
huggingface_hub's own. Only argparse is imported up front: `--version` and `--help` answer without loading torch.

Installed as the `loradrop` console command; without installing, `python -m hub_export.cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loradrop_trainer import __version__

from .forms import FORMS

HUB_PREFIX = "hf://"
_SOURCE_HELP = f"compact adapter directory (or a pulled repo), or {HUB_PREFIX}user/name for a Hub repo"
_REVISION_HELP = f"branch, tag or commit of a {HUB_PREFIX} source (default: main)"
_BASE_MODEL_HELP = (
    "Hub id of the base model (org/name), recorded in adapter_config.json{} in place of the local path training "
    "may have read it from"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`) and return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        _check_usage(args)
    except SystemExit as exit_:
        return 0 if exit_.code is None else int(exit_.code)
    try:
        args.command(args)
    except (OSError, ValueError) as err:  # every hub_export error is one of these
        print(f"loradrop: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loradrop",
        description="Inspect, expand and share LoRA-drop compact adapters (see hub_export). A SOURCE is a local "
        f"directory or {HUB_PREFIX}user/name; nothing is downloaded from the Hub without that prefix.",
    )
    parser.add_argument("--version", action="version", version=f"loradrop {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect", help="show the plan, sizes and format of a compact adapter", description=_inspect.__doc__
    )
    inspect.add_argument("source", metavar="SOURCE", help=_SOURCE_HELP)
    inspect.add_argument("--revision", help=_REVISION_HELP)
    inspect.set_defaults(command=_inspect, source_parser=inspect)

    expand = commands.add_parser(
        "expand", help="write a plain PEFT adapter, or the form an engine serves (--for)", description=_expand.__doc__
    )
    expand.add_argument("source", metavar="SOURCE", help=_SOURCE_HELP)
    expand.add_argument("target", metavar="DST", help="output directory (missing, empty or an earlier expansion)")
    expand.add_argument("--revision", help=_REVISION_HELP)
    expand.add_argument("--base_model", metavar="ID", help=_BASE_MODEL_HELP.format(""))
    expand.add_argument(
        "--for",
        dest="form",
        choices=FORMS,
        default="peft",
        help="; ".join(f"{name}: {what}" for name, what in FORMS.items()),
    )
    expand.add_argument("--base", metavar="DIR", help="--for merged: local directory of the base model's weights")
    expand.set_defaults(command=_expand, source_parser=expand)

    compact = commands.add_parser(
        "compact", help="compact a plain PEFT adapter saved after the switch", description=_compact.__doc__
    )
    compact.add_argument("source", metavar="SRC", help="plain PEFT adapter directory (save_model output, checkpoint-N)")
    compact.add_argument("target", metavar="DST", help="output directory (missing, empty or an earlier compact one)")
    compact.add_argument("--plan", help="the run's loradrop_plan.json (default: the one in SRC)")
    compact.add_argument("--base_model", metavar="ID", help=_BASE_MODEL_HELP.format(" and the model card"))
    compact.set_defaults(command=_compact)

    push = commands.add_parser(
        "push",
        help="upload an adapter to the Hub (plain PEFT at the root, compact in loradrop/)",
        description=_push.__doc__,
    )
    push.add_argument("source", metavar="SRC", help="compact adapter directory (or a pulled repo)")
    push.add_argument("repo_id", metavar="REPO", help="Hub repo id, e.g. user/my-adapter (created if missing)")
    push.add_argument(
        "--private",
        action="store_true",
        default=None,
        help="create the repo private; an existing public repo is refused, nothing is uploaded",
    )
    push.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    push.add_argument("--message", help="commit message")
    push.add_argument(
        "--base_model",
        metavar="ID",
        help=_BASE_MODEL_HELP.format(" and the model card")
        + "; needed when the adapter names its base by a local path",
    )
    push.set_defaults(command=_push)

    pull_ = commands.add_parser("pull", help="download an adapter from the Hub", description=_pull.__doc__)
    pull_.add_argument("repo_id", metavar="REPO", help="Hub repo id")
    pull_.add_argument("target", metavar="DST", help="output directory (missing, empty or an earlier pull)")
    pull_.add_argument("--revision", help="branch, tag or commit (default: main)")
    pull_.set_defaults(command=_pull)
    return parser


def _check_usage(args: argparse.Namespace) -> None:
    source_parser = getattr(args, "source_parser", None)
    if source_parser is not None and args.revision is not None and not args.source.startswith(HUB_PREFIX):
        source_parser.error(
            f"--revision applies to a Hub source ({HUB_PREFIX}user/name), not to the local directory {args.source}."
        )


def _source_dir(source: str, revision: str | None) -> Path:
    """The directory of a SOURCE: the local one as given, or the cached snapshot of an hf:// repo."""
    if not source.startswith(HUB_PREFIX):
        if not os.path.lexists(source):
            from .base_model import is_hub_id

            hint = f" For the Hub repo of that name, write {HUB_PREFIX}{source}." if is_hub_id(source) else ""
            raise FileNotFoundError(f"{source} does not exist.{hint}")
        return Path(source)
    from .hub import fetch_compact

    return fetch_compact(_repo_id(source), revision=revision)


def _repo_id(text: str) -> str:
    from huggingface_hub.utils import validate_repo_id

    repo_id = text.removeprefix(HUB_PREFIX)
    validate_repo_id(repo_id)
    return repo_id


def _inspect(args: argparse.Namespace) -> None:
    """Print a compact adapter's format version, plan per kind with the settings that decided it, LoRA settings and
    sizes. Reads the files with the checks that need no PEFT (format, checksum, plan against weights, sizes), so it
    answers without importing PEFT; loading and `loradrop expand` check the rest."""
    directory = _source_dir(args.source, args.revision)  # before importing torch: a wrong path answers at once
    from loradrop_trainer.modes import mode_of
    from loradrop_trainer.report import plan_settings, summary_table

    from .format import COMPACT_LAYOUT, compact_folder, read_files
    from .modes import export_mode
    from .validate import check_format

    adapter = read_files(directory)
    check_format(adapter, f"the compact adapter at {directory}")
    plan, config = adapter.plan, adapter.peft_config
    targets = ", ".join(config.get("target_modules") or []) or "-"
    folder = compact_folder(directory)
    files = [directory / (folder + name) for name in COMPACT_LAYOUT.files if (directory / (folder + name)).is_file()]
    on_disk = sum(path.stat().st_size for path in files)
    ratio = adapter.stored_bytes / adapter.plain_bytes if adapter.plain_bytes else 0.0
    print(f"{args.source}: LoRA-drop compact adapter, format version {adapter.format_version}")
    print(f"adapter {adapter.adapter_name!r}, mode {plan.mode}, threshold {plan.threshold}, switch at step {plan.step}")
    print(f"base model: {config.get('base_model_name_or_path') or 'unknown'}")
    truncated = f"; {len(plan.dropped)} truncated to rank {plan.dropped_rank}" if mode_of(plan.mode).truncates else ""
    print(f"LoRA r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, targets: {targets}{truncated}")
    print(summary_table(plan, adapter.plain_params, adapter.stored_params))
    print(f"settings: {plan_settings(plan, adapter.plan_extra.get('config'))}")
    if adapter.other_params:
        print(f"plus {adapter.other_params:,} parameters of modules trained in full (modules_to_save)")
    smaller = export_mode(plan).rank_pattern_form
    plain = "the unpruned adapter" if smaller else "a plain PEFT adapter"
    print(
        f"weights: {adapter.stored_bytes:,} bytes instead of {adapter.plain_bytes:,} for {plain} "
        f"({ratio:.1%}); {on_disk:,} bytes of files in all"
    )
    if smaller:
        print(
            "loradrop expand writes a plain PEFT adapter of this size (truncated modules through rank_pattern, which "
            "vLLM ignores); --for uniform one that every engine reads, at the unpruned size"
        )


def _expand(args: argparse.Namespace) -> None:
    """Write a compact adapter in the form an engine serves as trained: the plain PEFT adapter with rank_pattern
    (--for peft, the default), the uniform one that needs no pattern (--for uniform or vllm), or the merged model
    (--for merged --base DIR). Every check runs before anything is written."""
    if (args.form == "merged") != (args.base is not None):
        raise ValueError("--for merged needs --base DIR (the base model's local directory), and only it takes --base.")
    source = _source_dir(args.source, args.revision)  # before importing torch: a wrong path answers at once
    from .serving import export_adapter

    target = export_adapter(source, args.target, form=args.form, base_model=args.base_model, base=args.base)
    print(
        f"merged model written to {target}"
        if args.base
        else f"plain PEFT adapter written to {target} ({args.form} form)"
    )
    if args.form == "peft" and json.loads((target / "adapter_config.json").read_text("utf-8")).get("rank_pattern"):
        print("its rank_pattern is read by PEFT and llama.cpp, not by vLLM, SGLang or LoRAX: for those, --for uniform")


def _compact(args: argparse.Namespace) -> None:
    """Write the compact adapter of what a training script saved (trainer.save_model(), a checkpoint-N directory),
    after checking that every shared group's weights are equal."""
    for path in (args.source, args.plan):
        if path is not None and not os.path.lexists(path):  # before importing torch: a wrong path answers at once
            raise FileNotFoundError(f"{path} does not exist.")
    from .from_peft import compact_peft_adapter

    target = compact_peft_adapter(args.source, args.target, plan=args.plan, base_model=args.base_model)
    print(f"compact adapter written to {target}")


def _push(args: argparse.Namespace) -> None:
    """Upload a compact adapter directory to a Hub repo: the plain PEFT adapter expanded from it at the repo's root
    (PeftModel.from_pretrained(base, REPO) loads it), the compact adapter's own files in loradrop/ and the model card
    (listed), then the commit URL. Uses HF_TOKEN or the stored login."""
    from .hub import push_to_hub

    if not Path(args.source).is_dir():
        raise FileNotFoundError(f"{args.source} is not a directory; pass a compact adapter directory to push.")
    repo_id = _repo_id(args.repo_id)
    info = push_to_hub(
        args.source,
        repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.message,
        base_model=args.base_model,
    )
    print(f"{repo_id} holds the adapter's files:")
    for name in info.files:
        print(f"  {name}")
    print(info)


def _pull(args: argparse.Namespace) -> None:
    """Download a Hub repo's compact adapter into a directory laid out as the repo is (the plain PEFT adapter at the
    root, expanded locally from the checked compact one in loradrop/); it appears only once it is complete."""
    repo_id = _repo_id(args.repo_id)  # before importing torch: a wrong id answers at once
    from .hub import pull

    print(f"{repo_id} pulled into {pull(repo_id, args.target, revision=args.revision)}")


if __name__ == "__main__":
    raise SystemExit(main())
