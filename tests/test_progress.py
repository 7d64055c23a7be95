"""What a study prints: trial lines, a throttled status line, and none of Ray's chatter
(unit tests on hand-made trials, then a real tiny Tune study on a local Ray instance)."""

import io
import logging
import pickle
import sys
from types import SimpleNamespace

import pytest

from matxfer.progress import (
    StudyProgress,
    format_elapsed,
    format_metric,
    format_params,
    quiet_ray_output,
)


def trial(tid: str, status: str = "RUNNING", config: dict | None = None,
          result: dict | None = None, error_file: str | None = None):
    return SimpleNamespace(trial_id=tid, status=status, config=config or {},
                           last_result=result or {}, error_file=error_file)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_progress(clock=None, **kw) -> tuple[StudyProgress, io.StringIO]:
    out = io.StringIO()
    args = {"fold": 0, "metric_name": "val_mae", "mode": "min", "n_trials": 4, "epochs": 2,
            "interval_s": 15.0, "stream": out, **kw}
    progress = StudyProgress(**args, clock=clock or Clock())
    progress.setup(total_num_samples=4)
    return progress, out


def test_params_show_off_switches_and_any_searched_key_compactly():
    assert format_params({"l2sp_on": False, "bss_on": True, "bss": 3.1e-3}) == \
        "l2sp off, bss 3.1e-03"
    assert format_params({"l2sp_on": True, "l2sp": 1.2e-4, "bss_on": False}) == \
        "l2sp 1.2e-04, bss off"
    assert format_params({"l2sp_on": True, "l2sp": 0.0288}) == "l2sp 2.9e-02"
    assert format_params({"lr": 3e-4, "lr_decay_on": True, "lr_decay": 0.5, "freeze_blocks": 1,
                          "lp_epochs": 20, "pooling": "max"}) == \
        "lr 3.0e-04, lr_decay 0.5, freeze_blocks 1, lp_epochs 20, pooling max"
    assert format_params({}) == ""


def test_metric_and_elapsed_formats():
    assert [format_metric(v) for v in (21.034, 20.5, 0.91234, 1234.4)] == \
        ["21.03", "20.50", "0.9123", "1234"]
    assert [format_elapsed(s) for s in (45.9, 75, 7380)] == ["45s", "1m15s", "2h03m"]


def test_trial_lines_say_done_stopped_by_asha_or_failed_with_the_reason(tmp_path):
    progress, out = make_progress()
    t1 = trial("a", config={"l2sp_on": True, "l2sp": 1.2e-4, "bss_on": False})
    t2 = trial("b", config={"l2sp_on": False, "bss_on": True, "bss": 3.1e-3})
    err = tmp_path / "error.txt"
    err.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "ray.exceptions.RayTaskError: wrapped\nRuntimeError: CUDA out of memory\n")
    t3 = trial("c", config={"l2sp_on": True, "l2sp": 2e-5, "bss_on": False},
               error_file=str(err))
    trials = [t1, t2, t3]
    # ASHA's STOP at epoch 1 of 2 marks the result done before callbacks see it
    t2.last_result = {"best_val": 25.1, "best_epoch": 1, "epoch": 1, "done": True}
    progress.on_trial_result(0, trials, t2, t2.last_result)
    progress.on_trial_complete(0, trials, t2)
    # a full run: ASHA's STOP at max_t is no early stop
    t1.last_result = {"best_val": 21.034, "best_epoch": 2, "epoch": 2, "done": True}
    progress.on_trial_result(0, trials, t1, t1.last_result)
    progress.on_trial_complete(0, trials, t1)
    progress.on_trial_error(0, trials, t3)
    assert out.getvalue().splitlines() == [
        "fold 0: trial 2/4 stopped by ASHA at epoch 1: val_mae 25.10 "
        "(l2sp off, bss 3.1e-03, best epoch 1)",
        "fold 0: trial 1/4 done: val_mae 21.03 (l2sp 1.2e-04, bss off, best epoch 2)",
        "fold 0: trial 3/4 failed: RuntimeError: CUDA out of memory (l2sp 2.0e-05, bss off)",
    ]


def test_status_line_waits_for_the_interval_then_reports_counts_and_best():
    clock = Clock()
    progress, out = make_progress(clock)
    done = trial("a", "TERMINATED", {"l2sp_on": False, "bss_on": True, "bss": 3.1e-3},
                 {"best_val": 20.5, "best_epoch": 2})
    running = trial("b", "RUNNING", {"l2sp_on": True, "l2sp": 1e-3, "bss_on": False},
                    {"best_val": 22.0, "best_epoch": 1})
    trials = [done, running, trial("c", "PENDING")]
    progress.outcomes["a"] = "done"
    clock.t += 14.9
    progress.on_step_end(1, trials)
    assert out.getvalue() == ""  # a short study stays quiet
    clock.t += 60.1  # 1m15s after the start
    progress.on_step_end(2, trials)
    clock.t += 5
    progress.on_step_end(3, trials)  # at most one line per interval
    clock.t += 30
    progress.on_step_end(4, trials)  # nothing changed: no line before the heartbeat (60 s)
    clock.t += 25
    progress.on_step_end(5, trials)  # 60 s after the last line: a heartbeat
    trials[2].status = "RUNNING"
    clock.t += 15
    progress.on_step_end(6, trials)  # a change shows after one interval
    assert out.getvalue().splitlines() == [
        "fold 0 [1m15s]: 1 running, 1 pending, 1 finished, 0 stopped, 0 failed; "
        "best val_mae 20.50 (l2sp off, bss 3.1e-03, epoch 2)",
        "fold 0 [2m15s]: 1 running, 1 pending, 1 finished, 0 stopped, 0 failed; "
        "best val_mae 20.50 (l2sp off, bss 3.1e-03, epoch 2)",
        "fold 0 [2m30s]: 2 running, 1 finished, 0 stopped, 0 failed; "
        "best val_mae 20.50 (l2sp off, bss 3.1e-03, epoch 2)"]
    clock.t += 60
    progress.on_step_end(7, [trial("a", "TERMINATED"), trial("b", "ERROR")])
    assert len(out.getvalue().splitlines()) == 3  # nothing left running: no status line


def test_status_line_picks_the_best_by_mode_and_counts_restored_trials():
    progress, _ = make_progress(mode="max")
    trials = [trial("a", "TERMINATED", result={"best_val": 0.80, "best_epoch": 3}),
              trial("b", "RUNNING", result={"best_val": 0.91, "best_epoch": 1}),
              trial("c", "ERROR")]
    line = progress.status_line(trials, 5)
    assert line == ("fold 0 [5s]: 1 running, 1 finished, 0 stopped, 1 failed; "
                    "best val_mae 0.9100 (epoch 1)")


def test_progress_callback_pickles_without_its_stream():
    progress, out = make_progress(clock=None)
    progress = StudyProgress(0, "val_mae", "min", stream=out)
    progress.outcomes["x"] = "done"
    copy = pickle.loads(pickle.dumps(progress))
    assert copy.stream is None and copy.outcomes == {"x": "done"}
    assert copy.metric_name == "val_mae"


class _Kept(logging.Handler):
    """Collects the records that pass a logger's filters (on the logger itself: once Ray is
    initialised in this process its loggers no longer propagate to the root)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_quiet_output_drops_ray_noise_and_keeps_everything_else(capsys):
    kept = _Kept()
    names = ("ray.tune.tune", "optuna.storages._in_memory")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:  # a Ray instance started earlier in this process may raise the level
        logging.getLogger(name).addHandler(kept)
        logging.getLogger(name).setLevel(logging.WARNING)
    table = ("╭────────────╮\n│ Configuration for experiment     x   │\n├─────╮\n"
             "│ Search algorithm                 SearchGenerator │\n│ Scheduler   ASHA │\n"
             "│ Number of trials                 2 │\n╰────────────╯\n")
    with quiet_ray_output():
        print(table)
        print("\nView detailed results here: /tmp/ray/x")
        print("To visualize your results with TensorBoard, run: `tensorboard --logdir /tmp`")
        print("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on "
              "node: abc with address: 1.2.3.4, which is 4x the maximum expected")
        print("fold 0: trial 1/2 done: val_mae 9.445")
        print("\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task")
        print("")
        logging.getLogger("ray.tune.tune").warning(
            "Wrote the latest version of all result files and experiment state to '/x'")
        logging.getLogger("ray.tune.tune").warning("Trial task failed for trial x")
        logging.getLogger("optuna.storages._in_memory").warning(
            "A new study created in memory with name: optuna")
    captured = capsys.readouterr()
    assert captured.out == ("fold 0: trial 1/2 done: val_mae 9.445\n"
                            "\x1b[33m(raylet)\x1b[0m A worker died or was killed while "
                            "executing a task\n")
    for name in names:
        logging.getLogger(name).removeHandler(kept)
        logging.getLogger(name).setLevel(levels[name])
    assert kept.messages == ["Trial task failed for trial x"]


def test_quiet_output_restores_stdout_and_the_loggers_even_after_an_error():
    before = sys.stdout
    with pytest.raises(ValueError), quiet_ray_output():
        assert sys.stdout is not before
        raise ValueError
    assert sys.stdout is before
    assert logging.getLogger("ray.tune.tune").filters == []
    assert logging.getLogger("optuna.storages._in_memory").filters == []


# ---------------------------------------------------------------- a real local Ray instance


def _epochs(config: dict) -> None:
    """A tiny trial: 2 'epochs' whose validation error is config["x"] (lower is better)."""
    from ray import tune

    for epoch in (1, 2):
        tune.report({"best_val": config["x"] / epoch, "best_epoch": epoch, "epoch": epoch})


@pytest.mark.cluster
def test_real_study_prints_trial_lines_and_none_of_rays_chatter(local_ray, tmp_path, capsys):
    """Sequential trials x = 1, 3, 4 under ASHA (grace 1, max 2 epochs): trial 1 runs both
    epochs, trials 2 and 3 are below the median at epoch 1 and stopped."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    progress = StudyProgress(0, "val_mae", "min", epochs=2, interval_s=600)
    with quiet_ray_output():
        results = tune.Tuner(
            _epochs, param_space={"x": tune.grid_search([1.0, 3.0, 4.0])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=1,
                scheduler=ASHAScheduler(metric="best_val", mode="min", max_t=2,
                                        grace_period=1, reduction_factor=2)),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="tiny",
                                      verbose=0, callbacks=[progress])).fit()
    assert len(results) == 3
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "fold 0: trial 1/3 done: val_mae 0.5000 (x 1, best epoch 2)",
        "fold 0: trial 2/3 stopped by ASHA at epoch 1: val_mae 3.000 (x 3, best epoch 1)",
        "fold 0: trial 3/3 stopped by ASHA at epoch 1: val_mae 4.000 (x 4, best epoch 1)",
    ]
