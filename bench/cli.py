"""sdc-bench: benchmarks and comparisons (the bench extra; never imported by the runtime)."""
from __future__ import annotations

import sys

from sdc_runtime.extras import require_extra
from sdc_runtime.tools import ToolParser, run_tool

PROG = "sdc-bench"


def main(argv: list[str] | None = None) -> int:
    return run_tool(PROG, lambda: _run(argv))


def _run(argv) -> int:
    require_extra("bench", PROG)  # before the parser: the subcommands' modules import the extra
    from . import coder, gpu, int8, metrics_check, photo, rd, serve, session, stages, tiles

    parser = ToolParser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ToolParser)
    for command in (stages, rd, metrics_check, tiles, serve, int8, session, photo, gpu, coder):
        command.add_parser(sub)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
