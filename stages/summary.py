"""DVC entry point of the `summary` stage: `python stages/summary.py ARGS` = `pspnet summary ARGS`."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["summary", *sys.argv[1:]]))
