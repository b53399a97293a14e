"""DVC entry point of the `study` stage: `python stages/study.py ARGS` = `pspnet study ARGS` (see dvc.yaml)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["study", *sys.argv[1:]]))
