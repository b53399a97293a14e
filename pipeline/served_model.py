"""The pyfunc face of a registered PSPNet: ``mlflow.pyfunc.load_model("models:/pspnet-NAME@best")``.

    model = mlflow.pyfunc.load_model("models:/pspnet-synthetic@best")
    labels = model.predict(images)                          # (N, H, W, 3) uint8 RGB -> (N, H, W) int64
    labels = model.predict(images, params={"protocol": "ms"})

The version's weights are our model file and its settings a JSON file (its ``artifacts/`` folder); this class
only builds the :class:`~pipeline.predict.LabelMapper` from them with :func:`pipeline.predict.labeler_from_artifacts`
(``weights_only``). MLflow stores the class itself as its small ``python_model.pkl``, which
``mlflow.pyfunc.load_model`` unpickles: people who load through MLflow trust the store, as MLflow always asks.
`pspnet predict` never does: it downloads ``artifacts/`` alone and builds the model the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.pyfunc import PythonModel

ARTIFACT_KEYS = ("model_file", "labeler")


def package(labeler: Any, model_path: Path, folder: Path) -> dict[str, Path]:
    """The artifacts of a :class:`PSPNetPyfunc` for ``labeler`` (a :class:`~pipeline.predict.LabelMapper`
    built from ``model_path``), written into ``folder``: the model file and the labeler's settings."""
    from pipeline.predict import LABELER_SETTINGS, MODEL_FILE

    files = {"model_file": Path(folder) / MODEL_FILE, "labeler": Path(folder) / LABELER_SETTINGS}
    shutil.copyfile(model_path, files["model_file"])
    files["labeler"].write_text(json.dumps(labeler.settings(), indent=2))
    return files


class PSPNetPyfunc(PythonModel):
    """Maps images to label maps under the benchmark's test protocols (``params={"protocol": "ss" | "ms"}``)."""

    def load_context(self, context: Any) -> None:
        from pipeline.predict import labeler_from_artifacts

        folders = {Path(context.artifacts[k]).parent for k in ARTIFACT_KEYS}
        if len(folders) != 1:
            raise ValueError(f"the model's artifacts lie in several folders: {sorted(map(str, folders))}")
        self.labeler = labeler_from_artifacts(folders.pop())

    def predict(self, context, model_input, params=None):  # untyped: MLflow infers a signature from hints
        protocol = (params or {}).get("protocol", "ss")
        images = torch.from_numpy(np.ascontiguousarray(model_input))
        return self.labeler(images, protocol).numpy()
