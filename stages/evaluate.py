"""DVC entry point of the `evaluate` stage: `python stages/evaluate.py ARGS` = `pspnet evaluate ARGS` (see dvc.yaml)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
