"""``refusalkit`` command line: ``main()``. Bad input: one line on stderr, exit status 2; an
interrupt (Ctrl-C): exit status 130, finished work kept; ``refusalkit run`` with a failed stage: 1."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from refusalkit.cli.commands import (
    compare,
    compress,
    evaluate,
    export,
    extract,
    info,
    orthogonalize,
    repair,
    report,
    run,
    sweep,
)
from refusalkit.cli.parser import build_parser
from refusalkit.core.errors import UserError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "extract": extract.run,
    "orthogonalize": orthogonalize.run,
    "compress": compress.run,
    "export": export.run,
    "evaluate": evaluate.run,
    "compare": compare.run,
    "repair": repair.run,
    "run": run.run,
    "report": report.run,
    "sweep": sweep.run,
    "config": info.config,
    "sources": info.sources,
}
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _quiet_libraries(quiet: bool, verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("transformers", "httpx", "huggingface_hub", "accelerate", "bitsandbytes", "lm_eval"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # no retry chatter when a hub id cannot be reached
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _quiet_libraries(args.quiet, args.verbose)
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are kept — re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
