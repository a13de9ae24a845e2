"""The ``dmae-certify`` command line. Each sub-module registers its own sub-commands.

Sub-modules import their heavy dependencies (torch, FastAPI, Celery) lazily inside the
command functions, so ``dmae-certify --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

# Modules that define ``register(subparsers)``; each adds its commands.
COMMAND_MODULES = (
    "cli.certify",  # certify, predict
    "cli.train",  # train pretrain | finetune
    "cli.service",  # serve, worker, keys, db
    "cli.bench",  # bench
    "cli.verify",  # verify
    "cli.submit",  # submit (a client of a running service)
)

# The model every command uses when none is named: local ``certify``/``predict``
# (``--checkpoint``) and ``submit`` without ``--model`` or ``--sigma``.
DEFAULT_MODEL = "digits-s0.25"


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that states each option's default, unless the help already speaks of it or there is
    none to state (a flag, None, an empty string)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.default not in (None, "", argparse.SUPPRESS)
        if action.option_strings and action.nargs != 0 and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with :class:`DefaultsFormatter`; its sub-command parsers, made with
    ``add_subparsers``, are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dmae-certify",
        description="Certified robustness for DMAE-smoothed image classifiers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:  # user errors: message, not traceback
        print(f"dmae-certify {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
