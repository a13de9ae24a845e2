"""The ``dmae-certify`` command line. Each sub-module registers its own sub-commands.

Sub-modules import their heavy dependencies (torch, FastAPI, Celery) lazily inside the
command functions, so ``dmae-certify --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define ``register(subparsers)``; each adds its commands.
COMMAND_MODULES = (
    "app.cli.certify",  # certify, predict
    "app.cli.train",  # train pretrain | finetune
    "app.cli.service",  # serve, worker, keys, db
    "app.cli.bench",  # bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
