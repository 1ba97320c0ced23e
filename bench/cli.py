"""sdc-bench: benchmarks and comparisons (the bench extra; never imported by the runtime)."""
from __future__ import annotations

import argparse
import sys

from sdc_runtime.errors import SdcError
from sdc_runtime.extras import missing_modules

NEEDS = ("tqdm", "matplotlib", "scipy", "imagecodecs", "imagequant")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like the other tools
        sys.stderr.write(f"sdc-bench: error: {message}\n")
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    missing = missing_modules(*NEEDS)
    if missing:
        sys.stderr.write(f"sdc-bench: error: needs the bench extra (missing: {', '.join(missing)}):"
                         " pip install 'sdcodec[bench]'\n")
        return 1
    from . import int8, rd, serve, session, stages, tiles

    parser = _Parser(prog="sdc-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    stages.add_parser(sub)
    rd.add_parser(sub)
    tiles.add_parser(sub)
    serve.add_parser(sub)
    int8.add_parser(sub)
    session.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (SdcError, OSError) as exc:  # a bad model set, or a file that is missing or unreadable
        sys.stderr.write(f"sdc-bench: error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
