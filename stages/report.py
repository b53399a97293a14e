"""DVC entry point of the `report` stage: `python stages/report.py ARGS` = `pspnet report ARGS` (see dvc.yaml)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["report", *sys.argv[1:]]))
