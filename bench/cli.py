"""sdc-bench entry point."""
import sys


def main(argv=None) -> int:
    sys.stderr.write("sdc-bench: error: no benchmark commands yet\n")
    return 2
