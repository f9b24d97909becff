"""`lattice` command line: generate | chat | serve | ppl | plugins | pull | models |
quantize.

Every user error is one line on stderr and exit code 2; no tracebacks. A reader that
closes the pipe early (`lattice plugins | head -1`) ends the command quietly with 141, the
shell's code for SIGPIPE.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from ..errors import LatticeError
from .commands import (cmd_chat, cmd_embed, cmd_generate, cmd_models, cmd_plugins, cmd_ppl,
                       cmd_pull, cmd_quantize, cmd_serve)
from .parser import build_parser
from .settings import load_settings

__all__ = ["main", "build_parser", "load_settings", "COMMANDS"]

COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "ppl": cmd_ppl,
            "plugins": cmd_plugins, "pull": cmd_pull, "models": cmd_models,
            "quantize": cmd_quantize, "embed": cmd_embed}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LatticeError as exc:
        print(f"lattice: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """stdout's reader is gone: point stdout at /dev/null so the interpreter's final flush
    of what is still buffered does not raise BrokenPipeError again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout has no file descriptor (captured): nothing to do
        pass
