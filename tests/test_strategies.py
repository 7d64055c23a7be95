"""Fine-tuning strategies: LP-FT's probe, layer-wise LR decay, freezing; their search space."""

import copy
from types import SimpleNamespace

import pytest
import torch

from matxfer.config import derive, load_config
from matxfer.model import PropertyModel
from matxfer.run import prepare_fold
from matxfer.strategies import block_of, freeze_blocks, linear_probe, n_blocks, param_groups
from matxfer.train import Objective, fit


@pytest.fixture
def model(backbone):
    torch.manual_seed(0)
    return PropertyModel(copy.deepcopy(backbone).float(), "mean", [32])


def test_blocks_of_mace_mp0_bottom_to_top(model):
    assert n_blocks(model) == 3
    assert block_of("backbone.node_embedding.linear.weight") == 0
    assert block_of("backbone.interactions.0.linear_up.weight") == 1
    assert block_of("backbone.products.1.linear.weight") == 2
    assert block_of("head.0.weight") is None and block_of("backbone.readouts.0.x") is None


def test_one_block_definition_for_freezing_lr_decay_drift_and_features(model):
    """Every trainable backbone parameter is in exactly one block, and freezing/LR decay
    (block_of), drift (module_group) and the per-layer features (layer_names) name the same
    blocks; a parameter the definition does not know is refused, not filed under block 0."""
    from matxfer.analysis.drift import module_group
    from matxfer.analysis.features import layer_names
    from matxfer.model import block_index

    names = layer_names(model)
    assert len(names) == n_blocks(model)
    for name, _ in model.backbone_parameters():
        assert module_group(f"backbone.{name}") == names[block_of(f"backbone.{name}")]
    groups = param_groups(model, load_config())
    assert sum(len(g["params"]) for g in groups[:-1]) == len(model.backbone_parameters())
    with pytest.raises(ValueError, match="belongs to no block"):
        block_index("spin_embedding.weight")


def test_lr_decay_gives_each_block_decay_to_its_depth(model, tiny_cfg):
    tiny_cfg = derive(tiny_cfg, {
        "train.backbone_lr": 1e-3,
        "train.lr": 2e-3,
        "strategy.lr_decay": 0.5,
    })
    groups = param_groups(model, tiny_cfg)
    assert [(g["block"], g["lr"]) for g in groups] == [
        (0, pytest.approx(1e-3 * 0.5**3)), (1, pytest.approx(1e-3 * 0.5**2)),
        (2, pytest.approx(1e-3 * 0.5)), (3, 2e-3)]  # the head keeps its own lr
    n_params = [sum(p.numel() for p in g["params"]) for g in groups]
    head = sum(p.numel() for p in model.head.parameters())
    assert n_params == [11392, 1581696 + 335360, 1581696 + 335360, head]
    tiny_cfg = derive(tiny_cfg, {"strategy.lr_decay": 1.0})  # off: every block at backbone_lr
    assert {g["lr"] for g in param_groups(model, tiny_cfg)[:-1]} == {1e-3}


def test_lp_phase_leaves_the_backbone_bit_identical_and_fits_the_head(model, tiny_cfg):
    tiny_cfg = derive(tiny_cfg, {"strategy.lp_epochs": 3})
    data = prepare_fold(tiny_cfg, model, progress=False)
    backbone0 = copy.deepcopy(model.backbone.state_dict())
    head0 = copy.deepcopy(model.head.state_dict())
    rows = linear_probe(model, data, tiny_cfg, "cpu")
    assert [r["lp_epoch"] for r in rows] == [1, 2, 3]
    assert all(torch.equal(v, backbone0[k]) for k, v in model.backbone.state_dict().items())
    assert any(not torch.equal(v, head0[k]) for k, v in model.head.state_dict().items())
    assert rows[-1]["lp_loss"] < rows[0]["lp_loss"]


def test_frozen_blocks_do_not_move_and_leave_l2sp(model, tiny_cfg):
    tiny_cfg = derive(tiny_cfg, {
        "train.epochs": 1,
        "regularizers.l2sp": 1e-2,
        "strategy.freeze_blocks": 2,
    })
    before = copy.deepcopy(model.state_dict())
    fit(model, prepare_fold(tiny_cfg, model, progress=False), tiny_cfg, log=None)
    after = model.state_dict()
    moved = {block_of(k) for k, v in after.items()
             if v.is_floating_point() and not torch.equal(v, before[k])}
    assert moved == {2, None}  # the top block and the head; embedding and block 1 untouched
    anchored = Objective(model, tiny_cfg, None, None).params
    assert sum(p.numel() for p in anchored) == 1581696 + 335360


def test_freezing_more_blocks_than_exist_is_a_user_error(model):
    from matxfer.errors import UserError

    with pytest.raises(UserError, match="freeze_blocks = 4.*allowed: 0-3"):
        freeze_blocks(model, 4)


def test_strategy_variants_and_search_space(tmp_path):
    from matxfer.config import load_study_config
    from matxfer.errors import UserError
    from matxfer.search import DefineSpace, trial_run_config

    path = tmp_path / "s.yaml"
    path.write_text("num_samples: 4\nrun: {data: {task: matbench_jdft2d}}\n")
    llrd = load_study_config(path, variant="llrd")
    assert llrd.search.searched() == ["lr_decay"] and llrd.num_samples == 4
    freeze = load_study_config(path, variant="freeze")
    assert freeze.search.searched() == ["freeze_blocks"]
    lpft = load_study_config(path, variant="lp-ft")
    assert lpft.num_samples == 1 and lpft.run.strategy.lp_epochs == 20
    assert lpft.run.regularizers.l2sp == 0.0 == llrd.run.regularizers.bss

    for study, key, value in ((freeze, "freeze_blocks", 2), (llrd, "lr_decay", 0.2)):
        params: dict = {}  # Optuna's define-by-run trial, answering the last choice / the low end
        trial = SimpleNamespace(
            suggest_categorical=lambda n, c, p=params: p.setdefault(n, c[-1]),
            suggest_float=lambda n, lo, hi, log, p=params: p.setdefault(n, lo))
        DefineSpace(study.search)(trial)
        assert getattr(trial_run_config(study, 0, params).strategy, key) == value
    path.write_text("search: {lr_decay: {low: 0.5, high: 2.0}}\n")
    with pytest.raises(UserError, match="lr_decay.high \\(2.0\\) must be at most 1"):
        load_study_config(path)
