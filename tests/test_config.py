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
