"""DVC entry point of the `fetch` stage: `python stages/fetch.py ARGS` = `pspnet fetch ARGS` (see dvc.yaml)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["fetch", *sys.argv[1:]]))
