"""What a study searches: descriptor sets and calibrations as per-fold choices (issue 33),
their trial configs, grid, and the descriptors the driver computes once."""

from __future__ import annotations

from pathlib import Path

import pytest

from matxfer.config import derive, load_study_config
from matxfer.errors import UserError
from matxfer.identity import study_settings
from matxfer.search import DefineSpace

PHONONS = Path(__file__).parents[1] / "tune_configs/cpu/matbench_phonons.yaml"
SETS = [["phdos_last_peak"], ["phdos_last_peak", "phonon_band_max", "phonon_max"]]  # overrides


def zero_shot(**overrides):
    return load_study_config(PHONONS, {"search.descriptors": SETS,
                                       "search.calibration": ["linear", "huber"],
                                       **overrides}, "zero-shot")


def test_descriptor_sets_and_calibrations_are_a_grid_of_trial_configs():
    study = zero_shot()
    assert study.search.grid_size() == 4 and study.num_samples == 4
    assert study.search.choices("descriptors") == ["phdos_last_peak",
                                                   "phdos_last_peak+phonon_band_max+phonon_max"]
    cfg = study.trial_config(2, {"descriptors": "phdos_last_peak+phonon_band_max+phonon_max",
                                 "calibration": "huber"})
    assert cfg.model.physics.descriptors == SETS[1]
    assert (cfg.model.physics.calibration, cfg.model.physics.mode, cfg.data.fold) == (
        "huber", "zero-shot", 2)
    assert study.run.model.physics.calibration == "linear"  # the template is not changed


def test_optuna_sees_descriptor_sets_as_plain_strings():
    """Optuna's categorical choices must be scalars: a set is one '+'-joined string."""
    import optuna

    study = zero_shot(**{"search.l2sp": {"low": 1e-6, "high": 1e-2, "allow_off": False}})
    assert study.search.grid_size() is None  # a range: Optuna samples
    trial = optuna.create_study().ask()
    DefineSpace(study.search)(trial)
    assert trial.params["descriptors"] in study.search.choices("descriptors")
    cfg = study.trial_config(0, trial.params)
    assert cfg.model.physics.descriptors == trial.params["descriptors"].split("+")


def test_the_driver_computes_the_union_of_every_searched_set_once():
    physics = zero_shot().physics_to_compute()
    # the template's (the shipped config's), then each searched set's new names
    assert physics.descriptors == ["phdos_last_peak", "phonon_band_max", "phonon_max"]
    plain = load_study_config(PHONONS, {}, "no-reg")
    assert plain.physics_to_compute() is None  # no trial uses physics


@pytest.mark.parametrize(("overrides", "message"), [
    ({"search.descriptors": [["phdos_last_peak", "hardness"]]},
     "unknown descriptor 'hardness'; allowed: phonon_max"),
    ({"search.descriptors": [[]]}, "descriptors must list one or more non-empty lists"),
    ({"search.calibration": ["ridge"]}, "'linear' or 'huber'"),
])
def test_bad_searched_physics_is_refused_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        zero_shot(**overrides)
    assert "\n" not in str(err.value)


def test_physics_choices_under_a_variant_without_physics_are_dropped_by_validation():
    """A task config lists its physics choices once; no-reg or CHGNet studies of the same
    config run no physics, so the choices are not searched and not fingerprinted."""
    choices = {"search.descriptors": SETS, "search.calibration": ["linear", "huber"]}
    for variant in ("no-reg", "chgnet"):
        study = load_study_config(PHONONS, choices, variant)
        assert study.search.descriptors is None and study.search.calibration is None
        assert study.search.grid_size() == 1 or study.search.grid_size() is None
        plain = load_study_config(PHONONS, {}, variant)
        assert study_settings(study, "d" * 64, "w" * 64) == study_settings(plain, "d" * 64,
                                                                           "w" * 64)


def test_new_physics_settings_at_their_defaults_keep_earlier_fingerprints():
    """Studies fingerprinted before the DOS, exfoliation and Huber settings existed keep their
    folders; a non-default value or a searched choice is a different study."""
    def settings(**overrides):
        unsearched = {"search.descriptors": None, "search.calibration": None}
        study = derive(load_study_config(PHONONS, {}, "zero-shot"), {**unsearched, **overrides})
        return study_settings(study, "d" * 64, "w" * 64)

    plain = settings()
    assert not any(k.endswith(("dos_mesh", "dos_supercell", "dos_sigma", "dispersion",
                               "calibration", "search.descriptors")) for k in plain)
    assert settings(**{"run.model.physics.calibration": "huber"}) != plain
    assert settings(**{"run.model.physics.dos_mesh": 16}) != plain
    assert settings(**{"search.descriptors": SETS}) != plain


def test_a_grid_larger_than_num_samples_runs_every_combination_and_says_so(capsys):
    """Tune runs a grid's combinations once each, whatever num_samples says: validation sets
    num_samples to the grid (8 here, the config asks 4) and the plan says it was raised."""
    from matxfer.cli import main

    study = load_study_config(PHONONS, {}, "phys-select")
    assert study.search.grid_size() == 8 and study.num_samples == 8
    assert study.num_samples_requested == 4
    main(["tune", str(PHONONS), "--variant", "phys-select", "--check"])
    out = capsys.readouterr().out
    assert "8 per fold (num_samples 4 raised: the space holds 8 distinct trial(s)" in out
