"""DVC entry point of the `pretrained` stage: `python stages/pretrained.py ARGS` = `pspnet pretrained ARGS`.

Downloads, verifies and converts the ImageNet backbones that `model.pretrained` names (see dvc.yaml and
pipeline/model/backbones.py BACKBONES for the URLs and checksums).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pretrained", *sys.argv[1:]]))
