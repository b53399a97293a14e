"""The one console line per trial that sweeps and studies print instead of Tune's tables (issue 26)."""

from __future__ import annotations

from types import SimpleNamespace

from pipeline.sweeps.trials import TrialProgress


def _trial(config: dict, last: dict, trial_id: str = "a1b2c_00001") -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config=config, last_result=last, path="/r/trial")


def test_sweep_lines_show_the_searched_values_iteration_and_metric(capsys) -> None:
    progress = TrialProgress("tune", ("aux_weight", "base_lr", "reduction"), ("val/miou",), 160)
    progress.setup(total_num_samples=4)
    point = {"aux_weight": 0.4, "base_lr": 0.00243091, "reduction": 0.25, "bench": {"model": {"depth": 50}}}
    trial = _trial(point, {"iteration": 40, "val/miou": 0.412})
    progress.on_trial_result(0, [], trial, trial.last_result)
    progress.on_trial_complete(0, [], trial)
    progress.on_trial_error(0, [], trial)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "[tune] trial a1b2c_00001 aux_weight=0.4 base_lr=0.002431 reduction=0.25: iteration 40/160, val mIoU 41.20"
    )
    assert lines[1].startswith(
        "[tune] 1/4 done: aux_weight=0.4 base_lr=0.002431 reduction=0.25: iteration 40/160"
    )
    assert "(stopped early)" in lines[1]
    assert (
        lines[2]
        == "[tune] 2/4 FAILED: aux_weight=0.4 base_lr=0.002431 reduction=0.25 (its error: /r/trial/error.txt)"
    )
    assert "bench" not in "".join(lines) and "depth" not in "".join(lines)  # never the configuration dict


def test_study_lines_show_cell_seed_and_scores_once_per_trial(capsys) -> None:
    progress = TrialProgress(
        "study synthetic-aux", ("cell", "seed"), ("ss/miou", "ms/miou"), each_result=False
    )
    progress.setup(total_num_samples=6)
    last = {"iteration": 250, "ss/miou": 0.6012, "ms/miou": 0.623, "reused": 1.0}
    trial = _trial({"cell": "aux-0.4", "seed": 1, "study": {"cells": {}}}, last)
    progress.on_trial_result(0, [], trial, last)  # a study's one report: no line of its own
    progress.on_trial_complete(0, [], trial)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(
        "[study synthetic-aux] 1/6 done: aux-0.4 seed 1: 250 iterations, ss mIoU 60.12, ms mIoU 62.30 "
        "(reused a finished run)"
    )
