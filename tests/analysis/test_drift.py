"""Weight drift and CKA against known answers; MACE's per-element weight layout."""

import copy

import numpy as np
import pytest
import torch

from matxfer.analysis.drift import (
    element_drift,
    element_rows,
    group_drift,
    linear_cka,
    module_group,
    relative_drift,
)


def test_module_groups_of_a_property_model():
    assert module_group("backbone.node_embedding.linear.weight") == "embedding"
    assert module_group("backbone.interactions.1.skip_tp.weight") == "interaction_1"
    assert module_group("backbone.products.0.linear.weight") == "interaction_0"
    assert module_group("head.2.bias") == "head"
    assert module_group("backbone.readouts.0.linear.weight") is None


def test_identical_weights_drift_zero_and_a_known_perturbation_its_norm():
    state0 = {"head.0.weight": torch.ones(2, 2), "head.0.bias": torch.zeros(2),
              "backbone.products.0.w": torch.full((3,), 2.0)}
    names = list(state0)
    assert set(group_drift(state0, state0, names).values()) == {0.0}
    state = copy.deepcopy(state0)
    state["head.0.bias"] += torch.tensor([0.3, 0.4])  # ‖δ‖ = 0.5, ‖θ0_head‖ = 2
    drift = group_drift(state, state0, names)
    assert drift["head"] == pytest.approx(0.25) and drift["interaction_0"] == 0.0
    assert relative_drift([torch.tensor([3.0, 4.0])], [torch.tensor([0.0, 1.0])]) == \
        pytest.approx((9 + 9) ** 0.5)


def test_element_drift_sees_only_the_elements_present():
    state0 = {"backbone.products.0.w": torch.ones(4, 2, 3)}
    state = copy.deepcopy(state0)
    state["backbone.products.0.w"][3] += 1.0  # element 3 is absent from the task

    def rows(name, t):
        return element_rows(t, 4)

    assert element_drift(state, state0, list(state0), rows, present=[0, 1, 2]) == \
        {"interaction_0": 0.0}
    state["backbone.products.0.w"][1, 0, 0] += 3.0  # present: ‖δ‖ = 3, ‖θ0 rows 0..2‖ = √18
    assert element_drift(state, state0, list(state0), rows, [0, 1, 2])["interaction_0"] == \
        pytest.approx(3 / 18 ** 0.5)


def test_cka_of_a_representation_with_itself_is_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)  # rotation and scale invariant
    assert linear_cka(x, rng.normal(size=(200, 12))) < 0.15


def test_mace_per_element_rows_cover_embedding_skip_and_contractions(backbone):
    from matxfer.analysis.drift_analysis import mace_element_rows
    from matxfer.model import PropertyModel

    model = PropertyModel(copy.deepcopy(backbone), "mean", [8])
    rows_of, n = mace_element_rows(model), len(backbone.atomic_numbers)
    state = model.state_dict()
    for name in ("backbone.node_embedding.linear.weight", "backbone.interactions.0.skip_tp.weight",
                 "backbone.products.1.symmetric_contractions.contractions.0.weights_max"):
        rows = rows_of(name, state[name])
        assert rows.shape[0] == n and rows.numel() == state[name].numel()
    assert rows_of("head.0.weight", state["head.0.weight"]) is None
    # the skip product's element axis: zero element 5's weights through e3nn's own views;
    # rows_of must see exactly row 5 change, and the output for element 7 must not move
    skip = model.backbone.interactions[0].skip_tp
    weight = skip.weight.detach().clone()
    zeroed = weight.clone()
    for view in skip.weight_views(zeroed):
        view[:, 5].zero_()
    name = "backbone.interactions.0.skip_tp.weight"
    changed = (rows_of(name, zeroed) != rows_of(name, weight)).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [5]
    feats = torch.randn(2, skip.irreps_in1.dim, dtype=weight.dtype)
    attrs = torch.nn.functional.one_hot(torch.tensor([5, 7]), n).to(weight.dtype)
    out, ref = skip(feats, attrs, zeroed), skip(feats, attrs, weight)
    assert torch.all(out[0] == 0) and torch.allclose(out[1], ref[1])


def test_drift_counts_only_the_elements_of_the_training_split(jdft2d_graphs, tiny_cfg):
    """Per-element drift is over the structures the run trained on: an element that occurs
    only in the fold's test (or validation) structures is not among them."""
    import pandas as pd

    from matxfer.analysis.drift_analysis import trained_species
    from matxfer.datasets.matbench import fold_split

    graphs = jdft2d_graphs
    d = tiny_cfg.data
    split = fold_split(pd.DataFrame({"target": graphs.targets}, index=graphs.ids), d.task,
                       d.fold, d.val_fraction, d.val_seed, d.max_structures)

    def species(ids):
        return {int(s) for s in graphs.species_of(graphs.positions_of(ids))}

    trained = trained_species(graphs, tiny_cfg)
    assert set(trained) == species(split.train)
    held_out_only = species(split.test + split.val) - species(split.train)
    assert held_out_only, "the subset should have an element outside its training split"
    assert not held_out_only & set(trained)
    assert set(trained) < {int(s) for s in torch.unique(graphs.species)}
