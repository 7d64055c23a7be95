import pytest

from matxfer.config import load_config
from matxfer.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_go_through_one_model(tmp_path):
    path = write(tmp_path, "data:\n  task: matbench_phonons\ntrain:\n  epochs: 7\n")
    cfg = load_config(path, {"train.epochs": 3, "regularizers.l2sp": 1e-3, "data.fold": None})
    assert cfg.data.task == "matbench_phonons"
    assert cfg.train.epochs == 3  # the override wins
    assert cfg.regularizers.l2sp == 1e-3
    assert cfg.data.fold == 0  # None means "not given"


@pytest.mark.parametrize("overrides, needle", [
    ({"data.task": "matbench_nope"}, "unknown task 'matbench_nope'"),
    ({"data.fold": 5}, "data.fold"),
    ({"regularizers.l2sp": -1.0}, "regularizers.l2sp"),
    ({"regularizers.bss": -0.1}, "regularizers.bss"),
    ({"model.pooling": "median"}, "'mean', 'sum', 'max' or 'mean+max'"),
    ({"model.init": "scratch"}, "model.init"),
    ({"data.max_structures": 0}, "data.max_structures"),
])
def test_bad_values_name_the_field_and_the_allowed_values(overrides, needle):
    with pytest.raises(UserError) as err:
        load_config(overrides=overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_is_rejected(tmp_path):
    with pytest.raises(UserError, match="train.epochz: unknown config key"):
        load_config(write(tmp_path, "train:\n  epochz: 3\n"))


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  epochs: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(UserError, match="does not exist"):
        load_config("no/such/file.yaml")


def test_weight_decay_toward_zero_is_refused_under_l2sp():
    with pytest.raises(UserError, match="backbone_weight_decay must be 0"):
        load_config(overrides={"regularizers.l2sp": 1e-3, "train.backbone_weight_decay": 0.01})


# -- derived configs come out of validation (issue 32, item 9) -------------------------------

def study_yaml(tmp_path, text: str):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_a_validated_config_cannot_be_changed_in_place():
    from pydantic import ValidationError

    cfg = load_config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.regularizers.l2sp = 1e-2
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.epochs = 3


def test_derived_config_is_validated_as_a_whole():
    from matxfer.config import derive

    cfg = load_config(overrides={"train.backbone_weight_decay": 0.01})
    with pytest.raises(UserError, match="backbone_weight_decay must be 0 while"):
        derive(cfg, {"regularizers.l2sp": 1e-3})
    changed = derive(cfg, {"train.epochs": 3})
    assert changed.train.epochs == 3 and cfg.train.epochs == 40  # the original is untouched


def test_searched_l2sp_with_weight_decay_toward_zero_is_refused_at_load(tmp_path):
    from matxfer.config import load_study_config

    path = study_yaml(tmp_path, "run:\n  train:\n    backbone_weight_decay: 0.01\n")
    with pytest.raises(UserError, match="backbone_weight_decay must be 0 while") as err:
        load_study_config(path)
    assert "l2sp" in str(err.value) and "\n" not in str(err.value)


def test_every_trial_config_is_built_by_validation(tmp_path):
    from matxfer.config import load_study_config

    study = load_study_config(study_yaml(tmp_path, "num_samples: 2\n"))
    cfg = study.trial_config(3, {"l2sp_on": True, "l2sp": 1e-3, "bss_on": False,
                                      "bss": 1e-4})
    assert (cfg.data.fold, cfg.regularizers.l2sp, cfg.regularizers.bss) == (3, 1e-3, 0.0)
    assert study.run.data.fold == 0 and study.run.regularizers.l2sp == 0.0


def test_default_folds_come_from_validation_not_a_write_after_it(tmp_path):
    from matxfer.config import StudyConfig

    study = StudyConfig.model_validate({"run": {"data": {"task": "matbench_jdft2d"}}})
    assert study.folds == [0, 1, 2, 3, 4]
    assert "folds" in study.model_fields_set  # set by validation, so a dump round-trips
    assert StudyConfig.model_validate(study.model_dump()) == study


def test_capped_num_samples_is_said_not_silent(tmp_path):
    from matxfer.config import load_study_config

    study = load_study_config(study_yaml(tmp_path, "num_samples: 16\n"), variant="pooling")
    assert study.num_samples == 2 and study.num_samples_requested == 16
    plain = load_study_config(study_yaml(tmp_path, "num_samples: 3\n"))
    assert plain.num_samples == plain.num_samples_requested == 3


# -- names that become folders (issue 32, item 12) --------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", ".hidden", "-x"])
def test_a_dataset_name_that_is_not_a_plain_folder_name_is_refused(tmp_path, name):
    overrides = {"data.task": name, "data.source.path": "x.extxyz", "data.source.target": "y"}
    with pytest.raises(UserError, match="data.task") as err:
        load_config(overrides=overrides)
    assert repr(name) in str(err.value)


@pytest.mark.parametrize("name", ["..", ".", ".hidden"])
def test_a_study_name_that_is_not_a_plain_folder_name_is_refused(tmp_path, name):
    from matxfer.config import load_study_config

    with pytest.raises(UserError, match="name"):
        load_study_config(study_yaml(tmp_path, f"name: '{name}'\n"))


# -- LP-FT with the potential's physics (issue 32, item 10) -----------------------------------

@pytest.mark.parametrize("mode", ["features", "residual"])
def test_lp_ft_with_physics_features_or_residual_is_refused_in_one_line(mode):
    overrides = {"strategy.lp_epochs": 5, "model.physics.mode": mode,
                 "model.physics.descriptors": ["phonon_max"]}
    with pytest.raises(UserError, match="strategy.lp_epochs") as err:
        load_config(overrides=overrides)
    assert mode in str(err.value) and "\n" not in str(err.value)


def test_searched_lp_epochs_with_physics_residual_is_refused_at_load(tmp_path):
    from matxfer.config import load_study_config

    path = study_yaml(tmp_path, "run:\n  model:\n    physics:\n      descriptors: [phonon_max]\n"
                      "search:\n  lp_epochs: [0, 5]\n")
    with pytest.raises(UserError, match="strategy.lp_epochs"):
        load_study_config(path, variant="phys-residual")


def test_the_plan_says_when_num_samples_was_capped(tmp_path):
    from matxfer.config import load_study_config
    from matxfer.preflight import Plan, describe_search

    study = load_study_config(study_yaml(tmp_path, "num_samples: 16\n"), variant="pooling")
    plan = Plan(study)
    describe_search(plan)
    assert "num_samples 16 capped: the space holds 2 distinct trial(s)" in "\n".join(plan.lines)
