"""The `loradrop` command: inspect, expand, push and pull LoRA-drop compact adapters.

Exit codes: 0 success, 1 the operation failed (a one-line message on stderr), 2 the command line is wrong. Hub
settings (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE, the cache) and the transfer progress bars are huggingface_hub's own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hub_export import expand_to_peft, pull, push_to_hub, read_compact
from hub_export.remote import local_dir

from . import __version__
from .report import summary_table


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`) and return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
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
        description="Inspect, expand and share LoRA-drop compact adapters (see hub_export).",
    )
    parser.add_argument("--version", action="version", version=f"loradrop {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect", help="show the plan, sizes and format of a compact adapter", description=_inspect.__doc__
    )
    inspect.add_argument("source", metavar="PATH_OR_REPO", help="compact adapter directory or Hub repo id")
    inspect.add_argument("--revision", help="branch, tag or commit of a Hub repo (default: main)")
    inspect.set_defaults(command=_inspect)

    expand = commands.add_parser("expand", help="write a plain PEFT adapter", description=_expand.__doc__)
    expand.add_argument("source", metavar="SRC", help="compact adapter directory or Hub repo id")
    expand.add_argument("target", metavar="DST", help="output directory (missing, empty or a previous adapter)")
    expand.add_argument("--revision", help="branch, tag or commit of a Hub repo (default: main)")
    expand.set_defaults(command=_expand)

    push = commands.add_parser("push", help="upload a compact adapter to the Hub", description=_push.__doc__)
    push.add_argument("source", metavar="SRC", help="compact adapter directory")
    push.add_argument("repo_id", metavar="REPO", help="Hub repo id, e.g. user/my-adapter (created if missing)")
    push.add_argument("--private", action="store_true", default=None, help="create the repo private")
    push.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    push.add_argument(
        "--expanded", action="store_true", help="also upload the plain PEFT adapter in the peft/ subfolder"
    )
    push.add_argument("--message", help="commit message")
    push.set_defaults(command=_push)

    pull_ = commands.add_parser("pull", help="download a compact adapter from the Hub", description=_pull.__doc__)
    pull_.add_argument("repo_id", metavar="REPO", help="Hub repo id")
    pull_.add_argument("target", metavar="DST", help="output directory (missing, empty or a previous adapter)")
    pull_.add_argument("--revision", help="branch, tag or commit (default: main)")
    pull_.set_defaults(command=_pull)
    return parser


def _inspect(args: argparse.Namespace) -> None:
    """Print a compact adapter's format version, plan per kind, LoRA settings and sizes."""
    directory = local_dir(args.source, revision=args.revision)
    adapter = read_compact(directory)
    plan, config = adapter.plan, adapter.peft_config
    targets = ", ".join(config.get("target_modules") or []) or "-"
    on_disk = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    ratio = adapter.stored_bytes / adapter.plain_bytes if adapter.plain_bytes else 0.0
    print(f"{args.source}: LoRA-drop compact adapter, format version {adapter.format_version}")
    print(f"adapter {adapter.adapter_name!r}, mode {plan.mode}, threshold {plan.threshold}, switch at step {plan.step}")
    print(f"base model: {config.get('base_model_name_or_path') or 'unknown'}")
    print(f"LoRA r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, targets: {targets}")
    print(summary_table(plan, adapter.plain_params, adapter.stored_params))
    print(
        f"weights: {adapter.stored_bytes:,} bytes instead of {adapter.plain_bytes:,} for a plain PEFT adapter "
        f"({ratio:.1%}); {on_disk:,} bytes of files in all"
    )


def _expand(args: argparse.Namespace) -> None:
    """Write the plain PEFT adapter of a compact one (loads with peft.PeftModel.from_pretrained)."""
    target = expand_to_peft(local_dir(args.source, revision=args.revision), args.target)
    print(f"plain PEFT adapter written to {target}")


def _push(args: argparse.Namespace) -> None:
    """Upload a compact adapter directory to a Hub repo and print the commit URL. Uses HF_TOKEN or the stored login."""
    if not Path(args.source).is_dir():
        raise FileNotFoundError(f"{args.source} is not a directory; pass a compact adapter directory to push.")
    print(
        push_to_hub(
            args.source,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.message,
            expanded=args.expanded,
        )
    )


def _pull(args: argparse.Namespace) -> None:
    """Download a compact adapter from the Hub into a directory that appears only once it is complete."""
    print(f"{args.repo_id} pulled into {pull(args.repo_id, args.target, revision=args.revision)}")


if __name__ == "__main__":
    raise SystemExit(main())
