"""A study's search: the Optuna define-by-run space of λ, η and the strategy settings, what
Tune searches with (TPE, or a grid for choices only), and each trial's run config."""

from __future__ import annotations

from ray import tune

from matxfer.config import RunConfig, SearchSpace, StudyConfig


class DefineSpace:
    """Optuna define-by-run space: log-uniform λ, η, lr decay (each may be 'off'), lr, and
    categorical strategy counts. A class, not a closure, so the searcher's state can be
    pickled for resume."""

    def __init__(self, search: SearchSpace) -> None:
        self.search = search

    def __call__(self, trial) -> None:
        switches = self.search.off_point()  # the ranges that have an "off" choice
        for name in self.search.searched():
            space = getattr(self.search, name)
            if isinstance(space, list):
                trial.suggest_categorical(name, self.search.choices(name))
                continue
            if f"{name}_on" in switches:
                if not trial.suggest_categorical(f"{name}_on", [True, False]):
                    continue
            trial.suggest_float(name, space.low, space.high, log=True)


def trial_run_config(study: StudyConfig, fold: int, params: dict) -> RunConfig:
    """The run template with this trial's fold and proposed hyperparameters, by validation
    (StudyConfig.trial_config)."""
    return study.trial_config(fold, params)


def search_for(study: StudyConfig, fold: int, mode: str) -> tuple[object, dict | None, int]:
    """(search algorithm, param space, Tune's num_samples) of a study. A space of choices
    only is a grid, each combination run once (TPE's random start-up would repeat some,
    and Optuna's brute-force sampler cannot run ask-and-tell); ranges go to Optuna's TPE."""
    if not study.search.searched():
        return None, None, study.num_samples
    if study.search.grid_size() is not None:
        grid = {name: tune.grid_search(study.search.choices(name))
                for name in study.search.searched()}
        return None, grid, 1
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=study.seed + fold)
    # an enqueued Optuna trial: DefineSpace's suggest calls return its fixed values
    first = [study.search.first_point()] if study.search.first_point() else None
    search_alg = OptunaSearch(space=DefineSpace(study.search), metric="best_val", mode=mode,
                              sampler=sampler, points_to_evaluate=first)
    return search_alg, None, study.num_samples
