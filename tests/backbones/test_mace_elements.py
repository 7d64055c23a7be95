import copy

import pytest
import torch

from matxfer.backbones.mace_elements import gather_map
from matxfer.config import derive
from matxfer.graphs import collate, present_elements
from matxfer.model import PropertyModel
from matxfer.run import prepare_fold
from matxfer.train import fit


@pytest.fixture(scope="module")
def pair(backbone, jdft2d_graphs):
    """(full, restricted) float64 models with the same weights; the first 12 jdft2d graphs and
    the elements they hold."""
    rows = list(range(12))
    species = torch.cat([jdft2d_graphs.species[jdft2d_graphs.atom_start[r]:
                                               jdft2d_graphs.atom_start[r + 1]] for r in rows])
    elements = present_elements(species, jdft2d_graphs.z_table)
    torch.manual_seed(0)
    full = PropertyModel(copy.deepcopy(backbone), "mean", [32]).double()
    restricted = copy.deepcopy(full)
    restricted.restrict_elements(elements)
    return full, restricted, rows, elements


def test_present_elements_by_hand():
    assert present_elements(torch.tensor([3, 0, 3, 1]), (8, 14, 26, 1)) == [1, 8, 14]


def test_gather_map_follows_maces_rescaled_element_tables(backbone):
    elements = [8, 14, 26]
    twin, maps = gather_map(backbone, elements)
    n_full, n = len(backbone.atomic_numbers), len(elements)
    emb = maps["node_embedding.linear.weight"]  # [89 x 128] flat: the elements' rows, rescaled
    assert emb.source == "node_embedding.linear.weight" and emb.rows == (1, n_full, 128)
    assert emb.scale.item() == pytest.approx((n / n_full) ** 0.5)
    skip = maps["interactions.0.skip_tp.weight"]  # [128, 89, 128]: the middle axis selected
    assert skip.rows == (128, n_full, 128) and skip.index is None
    assert twin.node_embedding.linear.weight.numel() * n_full == \
        backbone.node_embedding.linear.weight.numel() * n
    assert maps["interactions.0.linear_up.weight"].index is None  # element-free: passed as is


def test_restricted_path_gives_the_full_models_predictions_and_gradients(pair, jdft2d_graphs):
    full, restricted, rows, _ = pair
    batch = {k: v.double() if v.is_floating_point() else v
             for k, v in collate(jdft2d_graphs, rows).items()}
    assert restricted.fast_path.covers(batch["node_attrs"])
    p_full, p_restricted = full(batch)[0], restricted(batch)[0]
    assert torch.allclose(p_full, p_restricted, rtol=0, atol=1e-10)
    full.zero_grad(), restricted.zero_grad()
    p_full.square().sum().backward()
    p_restricted.square().sum().backward()
    for (name, a), b in zip(full.named_parameters(), restricted.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-10), name
    assert restricted.state_dict().keys() == full.state_dict().keys()  # no twin weights


def test_a_batch_with_other_elements_takes_the_full_path(pair, jdft2d_graphs):
    full, restricted, _, elements = pair
    other = next(r for r in range(len(jdft2d_graphs)) if set(present_elements(
        jdft2d_graphs.species[jdft2d_graphs.atom_start[r]:jdft2d_graphs.atom_start[r + 1]],
        jdft2d_graphs.z_table)) - set(elements))
    batch = {k: v.double() if v.is_floating_point() else v
             for k, v in collate(jdft2d_graphs, [0, other]).items()}
    assert not restricted.fast_path.covers(batch["node_attrs"])
    assert torch.allclose(full(batch)[0], restricted(batch)[0], rtol=0, atol=1e-10)


def test_training_with_and_without_restriction_is_the_same(backbone, tiny_cfg):
    def run(restrict: bool) -> list[dict]:
        torch.manual_seed(0)
        model = PropertyModel(copy.deepcopy(backbone), "mean", [32])
        cfg = derive(tiny_cfg, {
            "model.restrict_elements": restrict,
            "model.dtype": "float64",
            "train.epochs": 1,
            "regularizers.l2sp": 1e-2,
            "regularizers.bss": 1e-3,
        })
        data = prepare_fold(cfg, model, progress=False)
        assert (model.fast_path is not None) == restrict
        return fit(model, data, cfg, log=None).history

    plain, restricted = run(False), run(True)
    for key in ("train_loss", "l2sp_term", "bss_term", "val_mae"):
        assert restricted[0][key] == pytest.approx(plain[0][key], rel=1e-9, abs=1e-12), key


def test_row_select_is_recognised_by_hand_and_other_gathers_fall_back():
    from matxfer.backbones.mace_elements import _row_select

    columns = torch.tensor([1])
    # a [2, 3, 2] table, element 1 of 3 kept: flat positions 2, 3 and 8, 9
    assert _row_select(torch.tensor([2, 3, 8, 9]), 12, columns, 3) == (2, 3, 2)
    assert _row_select(torch.tensor([2, 3, 8, 10]), 12, columns, 3) is None
