"""DVC entry point of the `tune` stage: `python stages/tune.py ARGS` = `pspnet tune ARGS` (see dvc.yaml)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["tune", *sys.argv[1:]]))
