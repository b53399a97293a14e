"""MLflow as people use it: models logged with ``mlflow.pytorch.log_model`` and registered per benchmark, the
``best`` alias, ``models:/`` URIs through pyfunc, datasets as run inputs, source tags, the experiment kind.

Everything runs against a real SQLite store in a temporary folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_params_dict
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import params_from_dict
from pipeline.model.checkpoint import save_model
from pipeline.model.pspnet import build_model
from pipeline.predict import labeler_from_file


def _publish(uri, run_id, model_path, params, benchmark="synthetic"):
    """What the evaluate stage does: the model file packaged as the pyfunc model, logged and registered."""
    import tempfile

    from pipeline.served_model import PSPNetPyfunc, package

    labeler = labeler_from_file(model_path, params, benchmark)
    with tempfile.TemporaryDirectory() as tmp:
        return tracking.publish_model(
            uri, run_id, PSPNetPyfunc(), package(labeler, model_path, Path(tmp)), benchmark
        )


pytestmark = pytest.mark.slow  # a real MLflow store, models logged and loaded (about 30 s)


@pytest.fixture()
def store(tmp_path: Path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "pspnet-synthetic", tmp_path)
    return uri, exp


def _model_file(path: Path, seed: int) -> Path:
    params = params_from_dict(tiny_params_dict())
    bench = params.benchmark("synthetic")
    torch.manual_seed(seed)
    model = build_model(bench.model, bench.data.num_classes).eval()
    save_model(
        path,
        model,
        model_config=bench.model,
        num_classes=bench.data.num_classes,
        conventions={"mean": list(bench.data.mean), "std": list(bench.data.std), "channel_order": "RGB"},
        extra={"benchmark": "synthetic"},
    )
    return path


def _images(n: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 56, 3), dtype=np.uint8)


def test_experiment_is_a_model_training_experiment(store, tmp_path: Path) -> None:
    uri, exp = store
    client = MlflowClient(uri)
    assert client.get_experiment(exp).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an experiment made before the tag existed gets it when next used
    old = client.create_experiment("old")
    tracking.ensure_experiment(uri, "old", tmp_path)
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND


def test_registry_best_alias_and_pyfunc_predict(store, tmp_path: Path) -> None:
    import mlflow.pyfunc

    uri, exp = store
    params = params_from_dict(tiny_params_dict())
    runs, paths = [], []
    for i, miou in enumerate([0.40, 0.55, 0.50]):
        run_id = tracking.start_run(uri, exp, run_name=f"r{i}", tags={}, params={})
        tracking.log_metrics(uri, run_id, {"ms/miou": miou, "ss/miou": miou - 0.01})
        tracking.finish_run(uri, run_id)
        paths.append(_model_file(tmp_path / f"m{i}.pt", seed=i))
        info = _publish(uri, run_id, paths[-1], params)
        runs.append(run_id)
        assert info["name"] == "pspnet-synthetic" and info["version"] == str(i + 1)
        assert info["best_version"] == ("1" if i == 0 else "2")  # 0.55 stays best when 0.50 arrives
    client = MlflowClient(uri)
    assert client.get_model_version_by_alias("pspnet-synthetic", "best").run_id == runs[1]
    # publishing the same run again registers nothing new
    assert _publish(uri, runs[2], paths[2], params)["version"] == "3"
    assert len(client.search_model_versions("name = 'pspnet-synthetic'")) == 3

    images = _images()
    tracking.use_store(uri)
    model = mlflow.pyfunc.load_model("models:/pspnet-synthetic@best")
    labels = model.predict(images)
    labels_ms = model.predict(images, params={"protocol": "ms"})
    meta = model.metadata
    assert meta.signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"
    assert any(r.startswith("torch==") for r in _requirements(model))
    # the registered model's labels are those of the model file it was made from, under each protocol
    direct = labeler_from_file(paths[1], params)
    assert labels.shape == (2, 40, 56) and labels.dtype == np.int64
    for k in range(2):
        assert np.array_equal(labels[k], direct.scores(images[k], "ss").argmax(0).numpy())
        assert np.array_equal(labels_ms[k], direct.scores(images[k], "ms").argmax(0).numpy())
    other = labeler_from_file(paths[0], params)
    assert not np.array_equal(labels[0], other.scores(images[0], "ss").argmax(0).numpy())  # not any model
    from pipeline.predict import labeler_from_artifacts

    loaded = labeler_from_artifacts(
        tracking.download_model_artifacts(uri, "models:/pspnet-synthetic/1", tmp_path)
    )
    assert loaded.class_names == direct.class_names


def test_registered_version_carries_description_and_tags(store, tmp_path: Path) -> None:
    """The registry's version page says which run, benchmark, numbers and protocol it holds."""
    uri, exp = store
    params = params_from_dict(tiny_params_dict())
    run_id = tracking.start_run(uri, exp, run_name="r", tags={}, params={})
    tracking.log_metrics(uri, run_id, {"ss/miou": 0.7431, "ms/miou": 0.769})
    tracking.set_tags(
        uri, run_id, {"protocol.ss": "ss", "protocol.ss.hash": "abc123", "protocol.ms.hash": "def456"}
    )
    tracking.finish_run(uri, run_id)
    info = _publish(uri, run_id, _model_file(tmp_path / "m.pt", seed=0), params)
    version = MlflowClient(uri).get_model_version("pspnet-synthetic", info["version"])
    assert version.tags == {
        "run_id": run_id,
        "benchmark": "synthetic",
        "ss_miou": "74.31",
        "ms_miou": "76.90",
        "protocol.ss": "ss",
        "protocol.ss.hash": "abc123",
        "protocol.ms.hash": "def456",
    }
    assert run_id in version.description and "synthetic" in version.description
    assert "ss mIoU 74.31 %" in version.description and "protocol hash abc123" in version.description
    assert "ms mIoU 76.90 %" in version.description and "protocol hash def456" in version.description


def _requirements(model) -> list[str]:
    from mlflow.artifacts import download_artifacts

    path = Path(download_artifacts(f"{model.metadata.artifact_path}/requirements.txt"))
    return path.read_text().split() if path.is_file() else []


def test_run_inputs_and_source_tags(store, tmp_path: Path) -> None:
    uri, exp = store
    data = tmp_path / "data" / "prepared" / "synthetic"
    data.mkdir(parents=True)
    manifest = {
        "splits": {
            "train": {"dir": "train", "rows": 24, "shards": 3, "split_hash": "a" * 64},
            "val": {"dir": "val", "rows": 8, "shards": 1, "split_hash": "b" * 64},
        },
        "dataset_hash": "c" * 64,
    }
    (data / "manifest.json").write_text(json.dumps(manifest))
    run_id = tracking.start_run(uri, exp, run_name="r", tags={}, params={})
    tracking.log_run_inputs(uri, run_id, data, benchmark="synthetic", stage="train@synthetic", root=tmp_path)
    run = MlflowClient(uri).get_run(run_id)
    found = {
        d.dataset.name: (d.dataset.digest, json.loads(d.dataset.source)["uri"], d.tags[0].value)
        for d in run.inputs.dataset_inputs
    }
    assert found == {
        "synthetic-train": ("a" * 16, "data/prepared/synthetic/train", "training"),
        "synthetic-val": ("b" * 16, "data/prepared/synthetic/val", "validation"),
    }
    assert run.data.tags["mlflow.source.name"] == "train@synthetic"
    assert run.data.tags["mlflow.source.type"] == "PROJECT"


def test_evaluate_stage_registers_and_predict_reads_models_uri(
    tiny_prepared: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The user's path: `pspnet evaluate` (the DVC stage) registers the trained run's model and sets `best`;
    `pspnet predict --model models:/pspnet-synthetic@best` labels a folder of JPEGs with it."""
    import cv2
    from conftest import write_params

    from pipeline.cli import main

    raw = tiny_params_dict()
    raw["benchmarks"]["synthetic"]["eval"]["cache_dir"] = str(tmp_path / "cache")
    params_path = write_params(tmp_path / "params.yaml", raw)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    exp = tracking.ensure_experiment(uri, "pspnet-synthetic", tmp_path)
    run_id = tracking.start_run(uri, exp, run_name="trained", tags={}, params={})
    tracking.finish_run(uri, run_id)
    model_dir = tmp_path / "models" / "synthetic"
    _model_file(model_dir / "model.pt", seed=3)
    (model_dir / "train_info.json").write_text(json.dumps({"run_id": run_id}))
    argv = ["evaluate", "--benchmark", "synthetic", "--params", str(params_path), "--model", str(model_dir)]
    assert main([*argv, "--data", str(tiny_prepared), "--out", str(tmp_path / "reports")]) == 0
    assert "registered pspnet-synthetic v1 (best: v1)" in capsys.readouterr().out
    best = MlflowClient(uri).get_model_version_by_alias("pspnet-synthetic", "best")
    assert best.run_id == run_id

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        cv2.imwrite(str(photos / f"p{i}.jpg"), _images(1, seed=10 + i)[0])
    out = tmp_path / "pred"
    argv = ["predict", str(photos), "--model", "models:/pspnet-synthetic@best", "--out", str(out)]
    assert main([*argv, "--params", str(params_path)]) == 0
    direct = labeler_from_file(model_dir / "model.pt", params_from_dict(raw))
    for i in range(2):
        rgb = cv2.cvtColor(cv2.imread(str(photos / f"p{i}.jpg")), cv2.COLOR_BGR2RGB)
        labels = cv2.imread(str(out / "labels" / f"p{i}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(labels, direct.scores(rgb, "ss").argmax(0).numpy())


class _Payload:
    """Unpickling this runs code: it writes the marker file (the attack of issue 23)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class _PayloadModule(torch.nn.Module):
    """An ``nn.Module`` whose pickle is the payload (what ``mlflow.pytorch.log_model`` stores)."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return _Payload(self.marker).__reduce__()


def _predict(tmp_path: Path, model_uri: str, params_path: Path) -> int:
    from pipeline.cli import main

    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    import cv2

    cv2.imwrite(str(photos / "p.png"), _images(1)[0])
    argv = ["predict", str(photos), "--model", model_uri, "--out", str(tmp_path / "pred"), "--params"]
    return main([*argv, str(params_path)])


def test_a_registered_version_never_runs_code_on_the_predict_users_machine(
    store, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Issue 23: `predict --model models:/...` unpickled the version (``mlflow.pytorch.load_model``), so anyone
    who could write a version or its artifacts ran code for every predict user. Now predict reads the version's
    model file with ``weights_only`` and its settings as JSON, and refuses anything else, naming it."""
    import mlflow
    import mlflow.pytorch
    from conftest import write_params

    uri, exp = store
    params_path = write_params(tmp_path / "params.yaml", tiny_params_dict())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code-ran"

    # 1. A version whose model is a pickle with a payload (a pytorch-flavour model, as predict used to load).
    run_id = tracking.start_run(uri, exp, run_name="evil", tags={}, params={})
    tracking.use_store(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            _PayloadModule(marker),
            name="model",
            serialization_format="pickle",
            pip_requirements=[
                "torch"
            ],  # no inference: MLflow would load (and so run) the model to infer them
            registered_model_name="pspnet-evil",
        )
    assert not marker.exists()
    assert _predict(tmp_path, "models:/pspnet-evil/1", params_path) == 2
    err = capsys.readouterr().err
    assert "models:/pspnet-evil/1" in err and "artifacts/model.pt" in err
    assert not marker.exists(), "predict unpickled the registered model"

    # 2. A version registered by evaluate whose model file was then replaced in the artifact store.
    run_id = tracking.start_run(uri, exp, run_name="good", tags={}, params={})
    tracking.log_metrics(uri, run_id, {"ms/miou": 0.5})
    params = params_from_dict(tiny_params_dict())
    _publish(uri, run_id, _model_file(tmp_path / "m.pt", seed=0), params)
    assert _predict(tmp_path, "models:/pspnet-synthetic@best", params_path) == 0  # the genuine one works
    (stored,) = [p for p in (tmp_path / "mlartifacts").rglob("model.pt") if p.parent.name == "artifacts"]
    torch.save({"format": "pspnet-repro/1", "state_dict": _Payload(marker)}, stored)
    assert _predict(tmp_path, "models:/pspnet-synthetic@best", params_path) == 2
    err = capsys.readouterr().err
    assert "model.pt: refusing to load with weights_only=True" in err and "registered model file" in err
    assert not marker.exists(), "predict unpickled the registered model file"

    # 3. Settings that are not ours: refused naming the key.
    settings = stored.with_name("labeler.json")
    _model_file(stored, seed=0)
    raw = json.loads(settings.read_text())
    settings.write_text(json.dumps(raw | {"std": [0, 1, 1]}))
    assert _predict(tmp_path, "models:/pspnet-synthetic@best", params_path) == 2
    assert "labeler.json: std = '[0, 1, 1]', expected 3 finite numbers > 0" in capsys.readouterr().err


def _tree(folder: Path) -> set[str]:
    return {str(f.relative_to(folder)) for f in folder.rglob("*")}


def test_predict_models_uri_from_any_folder(store, tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 26: `pspnet predict --model models:/...` from a folder that is no project, without --params: the
    version carries what it needs; a folder without a store creates no mlflow.db there, and the errors name the
    store looked in and how to point at another."""
    import cv2

    import pipeline.predict
    from pipeline.cli import main

    uri, exp = store
    params = params_from_dict(tiny_params_dict())
    run_id = tracking.start_run(uri, exp, run_name="r", tags={}, params={})
    tracking.log_metrics(uri, run_id, {"ms/miou": 0.5})
    tracking.finish_run(uri, run_id)
    _publish(uri, run_id, _model_file(tmp_path / "m.pt", seed=0), params)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cv2.imwrite(str(elsewhere / "p.png"), _images(1)[0])
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(pipeline.predict, "INSTALLED_PROJECT", tmp_path / "no-project")
    argv = ["predict", "p.png", "--model", "models:/pspnet-synthetic@best"]

    # no store here, none named: refused, naming the file it looked for; no mlflow.db created
    assert main([*argv, "--out", "pred"]) == 2
    err = capsys.readouterr().err
    assert f"no MLflow store at {elsewhere / 'mlflow.db'}" in err
    assert "--tracking-uri" in err and "MLFLOW_TRACKING_URI" in err
    assert _tree(elsewhere) == {"p.png"}

    # the store named by --tracking-uri, then by MLFLOW_TRACKING_URI: labels written, nothing else
    assert main([*argv, "--out", "pred", "--tracking-uri", uri]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main([*argv, "--out", "pred2"]) == 0
    outputs = {f"{o}/{d}/p.png" for o in ("pred", "pred2") for d in ("labels", "overlays")}
    assert _tree(elsewhere) == {"p.png", "pred", "pred2"} | outputs | {
        f"{o}/{d}" for o in ("pred", "pred2") for d in ("labels", "overlays")
    }
    capsys.readouterr()

    # a model the store does not hold: the store and how to point at another are named
    assert main(["predict", "p.png", "--model", "models:/pspnet-nope@best", "--out", "pred3"]) == 2
    err = capsys.readouterr().err
    assert "models:/pspnet-nope@best" in err and uri in err and "$MLFLOW_TRACKING_URI" in err
    assert "--tracking-uri" in err
    assert not (elsewhere / "pred3").exists() and not (elsewhere / "mlflow.db").exists()
