"""What a study prints while it runs: one line per finished trial, a status line at most
every `interval_s` seconds, and none of Ray's own chatter during `Tuner.fit()`."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from ray import tune


def format_value(value: object) -> str:
    """A searched value in 2-3 significant digits: 3.1e-03, 2.9e-02, 0.5, 12, max."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value == 0 or 0.1 <= abs(value) < 1e3:
        return f"{value:.3g}"
    return f"{value:.1e}"


def format_params(config: dict) -> str:
    """A trial's searched values, compactly: `l2sp off, bss 3.1e-03, pooling max`. An Optuna
    switch `<name>_on: False` shows as `<name> off` (its value is not proposed then)."""
    parts, seen = [], set()
    for key, value in config.items():
        name = key[:-3] if key.endswith("_on") and isinstance(value, bool) else key
        if name in seen:
            continue
        if config.get(f"{name}_on") is False:
            parts.append(f"{name} off")
        elif name in config:
            parts.append(f"{name} {format_value(config[name])}")
        else:
            continue  # a switch that is on, its value not (yet) in the config
        seen.add(name)
    return ", ".join(parts)


def format_metric(value: float) -> str:
    """4 significant digits with trailing zeros: 21.03, 20.50, 0.9123, 1234."""
    return f"{value:#.4g}".rstrip(".")


def format_elapsed(seconds: float) -> str:
    """45s, 1m15s, 2h03m."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def failure_reason(trial) -> str:
    """A failed trial's root cause in one short line (the last 'XError: ...' line of the
    error file Tune writes), or 'see the trial's error.txt'."""
    path = getattr(trial, "error_file", None)
    if not path or not Path(path).is_file():
        return "see the trial's error.txt"
    lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines()]
    causes = [ln for ln in lines if "Error:" in ln and not ln.startswith("File ")]
    line = causes[-1] if causes else next((ln for ln in reversed(lines) if ln), "unknown")
    return line if len(line) <= 160 else line[:157] + "..."


class StudyProgress(tune.Callback):
    """Prints a fold's study as it runs, to `stream` (default: sys.stdout at write time):

    fold 0: trial 3/4 done: val_mae 21.03 (l2sp 1.2e-04, bss off, best epoch 2)
    fold 0: trial 2/4 stopped by ASHA at epoch 1: val_mae 25.10 (l2sp off, bss 3.1e-03, ...)
    fold 0: trial 4/4 failed: RuntimeError: ... (l2sp 2.0e-05, bss off)
    fold 0 [1m15s]: 2 running, 1 finished, 0 stopped, 0 failed; best val_mae 20.50 (...)

    Trials are numbered in creation order out of the study's total (Tune's total_num_samples
    when known, else `n_trials`). `epochs` (the run's budget) tells a trial stopped by the
    scheduler from one that ran out; results carry best_val and best_epoch. The status line
    comes at most every `interval_s` seconds, never before `interval_s` have passed, and
    when nothing changed (counts, best) only every 4 intervals."""

    def __init__(self, fold: int, metric_name: str, mode: str, n_trials: int | None = None,
                 epochs: int | None = None, interval_s: float = 15.0,
                 stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fold, self.metric_name, self.mode = fold, metric_name, mode
        self.n_trials, self.epochs, self.interval_s = n_trials, epochs, interval_s
        self.stream, self.clock = stream, clock
        self.outcomes: dict[str, str] = {}  # trial_id -> done | stopped | failed
        self._stopped_at: dict[str, int] = {}  # trial_id -> epoch of a scheduler STOP
        self._start = self._last_status = None
        self._last_state = ""

    def __getstate__(self) -> dict:  # Tune pickles its run config; a stream does not pickle
        return {**self.__dict__, "stream": None, "_start": None, "_last_status": None}

    def _print(self, line: str) -> None:
        out = self.stream or sys.stdout
        out.write(line + "\n")
        out.flush()

    def _now(self) -> float:
        if self._start is None:
            self._start = self._last_status = self.clock()
        return self.clock()

    def setup(self, total_num_samples: int | None = None, **info) -> None:
        if total_num_samples and total_num_samples < sys.maxsize:
            self.n_trials = total_num_samples
        self._start = self._last_status = self.clock()

    def _label(self, trial, trials: list) -> str:
        number = next((i for i, t in enumerate(trials, 1) if t is trial), len(trials))
        return f"fold {self.fold}: trial {number}/{self.n_trials or len(trials)}"

    def _summary(self, result: dict, config: dict, epoch_label: str = "best epoch") -> str:
        """`val_mae 21.03 (l2sp 1.2e-04, bss off, best epoch 2)`."""
        params = format_params(config)
        value = result.get("best_val")
        score = (f"{self.metric_name} {format_metric(value)}" if _finite(value)
                 else f"no {self.metric_name} yet")
        extra = [params] if params else []
        if _finite(value) and result.get("best_epoch") is not None:
            extra.append(f"{epoch_label} {int(result['best_epoch'])}")
        return score + (f" ({', '.join(extra)})" if extra else "")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        # a STOP decision (scheduler or stopper) marks the result done before callbacks run
        if result.get("done"):
            self._stopped_at[trial.trial_id] = int(result.get("epoch") or
                                                   result.get("training_iteration", 0))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        epoch = self._stopped_at.get(trial.trial_id)
        early = epoch is not None and self.epochs is not None and epoch < self.epochs
        self.outcomes[trial.trial_id] = "stopped" if early else "done"
        how = f"stopped by ASHA at epoch {epoch}" if early else "done"
        self._print(f"{self._label(trial, trials)} {how}: {self._summary(result, trial.config)}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.outcomes[trial.trial_id] = "failed"
        params = format_params(trial.config)
        self._print(f"{self._label(trial, trials)} failed: {failure_reason(trial)}"
                    + (f" ({params})" if params else ""))

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        now = self._now()
        if now - self._start < self.interval_s or now - self._last_status < self.interval_s:
            return
        if all(t.status in ("TERMINATED", "ERROR") for t in trials):
            return
        line = self.status_line(trials, now - self._start)
        state = line.split(": ", 1)[1]  # the line without its clock
        if state == self._last_state and now - self._last_status < 4 * self.interval_s:
            return  # nothing new: a heartbeat every 4 intervals is enough
        self._last_status, self._last_state = now, state
        self._print(line)

    def status_line(self, trials: list, elapsed_s: float) -> str:
        """`fold 0 [1m15s]: 2 running, 1 finished, 0 stopped, 0 failed; best val_mae ...`."""
        counts = {"done": 0, "stopped": 0, "failed": 0}
        for t in trials:
            if t.status in ("TERMINATED", "ERROR"):
                default = "failed" if t.status == "ERROR" else "done"  # restored, finished
                counts[self.outcomes.get(t.trial_id, default)] += 1
        running = sum(t.status == "RUNNING" for t in trials)
        pending = sum(t.status in ("PENDING", "PAUSED") for t in trials)
        line = (f"fold {self.fold} [{format_elapsed(elapsed_s)}]: {running} running, "
                + (f"{pending} pending, " if pending else "")
                + f"{counts['done']} finished, {counts['stopped']} stopped, "
                f"{counts['failed']} failed")
        best = self.best_trial(trials)
        if best is not None:
            line += f"; best {self._summary(best.last_result, best.config, 'epoch')}"
        return line

    def best_trial(self, trials: list):
        """The trial with the best `best_val` so far (running ones included), or None."""
        scored = [t for t in trials if _finite((t.last_result or {}).get("best_val"))]
        if not scored:
            return None
        pick = min if self.mode == "min" else max
        return pick(scored, key=lambda t: t.last_result["best_val"])


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


# What Ray prints on stdout during Tuner.fit() with verbose=0 that a study's user does not
# need: Tune's experiment table, its results folder and TensorBoard hint
# (ray/tune/experimental/output.py, TuneTerminalReporter.experiment_started), and the raylet's
# warning that fractional-CPU actors started many worker processes (ray/_private/worker.py
# listen_error_messages, printed even with log_to_driver=False).
STDOUT_NOISE = (
    re.compile(r"^[╭├╰]─"),
    re.compile(r"^│ (Configuration for experiment|Search algorithm|Scheduler|Number of trials)"),
    re.compile(r"^View detailed results here: "),
    re.compile(r"^To visualize your results with TensorBoard"),
    re.compile(r"PYTHON worker processes have been started on node"),
)
# logger name -> message prefixes: Tune's closing "Wrote the latest version of all result
# files ..." and "Trials did not complete" (the study says what happened itself), and
# Optuna's "A new study created in memory" (OptunaSearch creates one per fold).
LOG_NOISE = {
    "ray.tune.tune": ("Wrote the latest version of all result files", "Trials did not complete"),
    "optuna.storages._in_memory": ("A new study created in memory",),
    # each one-worker trial checkpoints every epoch, and Tune snapshots its (small, local)
    # experiment state with each one (CheckpointConfig(num_to_keep=1)): expected, not a fault
    "ray.tune.execution.experiment_state": ("Experiment state snapshotting has been triggered",),
    # a local instance we start keeps Ray's default token auth: no reason to tell the user
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray cluster",),
}


class _DropLines:
    """A text stream that forwards whole lines to `target` except those matching `noise`;
    a blank line is forwarded only when the line after it is."""

    def __init__(self, target: TextIO, noise: tuple[re.Pattern, ...]) -> None:
        self.target, self.noise = target, noise
        self._partial, self._blank = "", False
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if any(p.search(plain) for p in self.noise):
            self._blank = False
        elif not plain.strip():
            self._blank = True
        else:
            self.target.write(("\n" if self._blank else "") + line + "\n")
            self._blank = False

    def flush(self) -> None:
        self.target.flush()

    def close_pending(self) -> None:
        """Forward an unfinished last line (never a held blank one)."""
        with self._lock:
            if self._partial:
                self._emit(self._partial)
                self._partial = ""
            self.target.flush()

    def __getattr__(self, name: str):  # fileno, isatty, encoding, ... of the real stream
        return getattr(self.target, name)


class _DropRecords(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


@contextlib.contextmanager
def quiet_ray_output() -> Iterator[None]:
    """For the duration of a study (build the Tuner and fit it inside): drop STDOUT_NOISE
    lines from sys.stdout and LOG_NOISE records from their loggers. Everything else passes;
    sys.stdout and the loggers are restored on exit."""
    original = sys.stdout
    stream = _DropLines(original, STDOUT_NOISE)
    filters = [(logging.getLogger(name), _DropRecords(prefixes))
               for name, prefixes in LOG_NOISE.items()]
    for logger, flt in filters:
        logger.addFilter(flt)
    sys.stdout = stream
    try:
        yield
    finally:
        stream.close_pending()
        if sys.stdout is stream:
            sys.stdout = original
        for logger, flt in filters:
            logger.removeFilter(flt)
