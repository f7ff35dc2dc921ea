"""edgezo's command line: a thin layer that builds configs, calls the library and shows progress.

Every subcommand is `cmd_<name>(args) -> (result dict, human-readable text)`; `main` prints one or the other. With
--json, human-readable output goes to stderr and the last line of stdout is one JSON object (scripts and benchmarks
read it).
"""

from __future__ import annotations

import logging
import os
import sys

from ..files import EdgezoError
from ..trainer import TrainingInterrupted
from .bench import cmd_bench
from .files import cmd_cache, cmd_convert, cmd_export, cmd_fetch, cmd_plot
from ..session import mezo_learning_rate
from .finetune import cmd_finetune, cmd_reference
from .generate import cmd_chat, cmd_eval, cmd_generate, cmd_serve
from .info import cmd_capacity, cmd_demo, cmd_doctor, cmd_memory
from .output import SayHandler, emit_json, say
from .parser import build_parser, command_line, expand_config, subcommand_parser

__all__ = ["main", "build_parser", "command_line", "subcommand_parser", "expand_config", "mezo_learning_rate",
           "cmd_finetune", "cmd_eval", "say", "emit_json"]  # what the api, tests and benchmarks use

COMMANDS = {  # subcommand -> cmd_<name>(args) -> (result dict, text)
    "fetch": cmd_fetch,
    "cache": cmd_cache,
    "finetune": cmd_finetune,
    "reference-bp": cmd_reference,
    "reference-mezo": cmd_reference,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "memory": cmd_memory,
    "capacity": cmd_capacity,
    "demo": cmd_demo,
    "doctor": cmd_doctor,
    "bench": cmd_bench,
    "export": cmd_export,
    "plot": cmd_plot,
    "convert": cmd_convert,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "edgezo"
    try:
        argv = expand_config(parser, argv)
    except EdgezoError as exc:
        say(f"edgezo {command}: error: {exc}")
        return 1
    args = parser.parse_args(argv)
    library_log = logging.getLogger("edgezo")  # the library's notices (edgezo.engine): one line each on stderr
    if not library_log.handlers:
        library_log.addHandler(SayHandler())
        library_log.propagate = False
    # a rank of a distributed run (edgezo.distributed.launch_local, torchrun) says which it is
    name = f"edgezo {args.command}" + (f": rank {os.environ['RANK']}" if "RANK" in os.environ else "")
    try:
        result, text = COMMANDS[args.command](args)
    except TrainingInterrupted as exc:
        say(f"{name}: {exc}")
        return 130
    except EdgezoError as exc:
        say(f"{name}: error: {exc}")
        return 1
    except KeyboardInterrupt:
        say(f"{name}: interrupted")
        return 130
    if args.json:
        emit_json(result)
    elif text:
        print(text)
    return 0
