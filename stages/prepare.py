"""DVC entry point of the `prepare` stage: `python stages/prepare.py ARGS` = `pspnet prepare ARGS` (see dvc.yaml)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prepare", *sys.argv[1:]]))
