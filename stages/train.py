"""DVC entry point of the `train` stage: `python stages/train.py ARGS` = `pspnet train ARGS` (see dvc.yaml)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
