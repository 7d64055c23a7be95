import copy
import math

import numpy as np
import pytest
import torch

from matxfer.config import derive
from matxfer.metrics import score
from matxfer.model import PropertyModel
from matxfer.run import prepare_fold
from matxfer.train import fit, predict, schedule_steps


@pytest.fixture
def tiny_model(backbone):
    torch.manual_seed(0)
    return PropertyModel(copy.deepcopy(backbone).float(), "mean", [32])


def test_fit_reports_every_epoch_and_restores_the_best_weights(tiny_model, tiny_cfg):
    data = prepare_fold(tiny_cfg, tiny_model, progress=False)
    seen = []
    result = fit(tiny_model, data, tiny_cfg, on_epoch=lambda row, *_: seen.append(row), log=None)
    assert [r["epoch"] for r in result.history] == [1, 2] == [r["epoch"] for r in seen]
    for key in ("train_loss", "task_loss", "l2sp_term", "bss_term", "val_mae", "seconds",
                "structures_per_s", "lr"):
        assert math.isfinite(result.history[0][key])
    val = score(data.spec, *predict(tiny_model, data, "val", 16))
    assert val == pytest.approx(result.best_val, rel=1e-6)  # the model now holds the best epoch


def test_regularisers_enter_the_loss_with_their_weights(tiny_model, tiny_cfg):
    tiny_cfg = derive(tiny_cfg, {
        "regularizers.l2sp": 1e-2,
        "regularizers.bss": 1e-3,
        "train.epochs": 1,
    })
    data = prepare_fold(tiny_cfg, tiny_model, progress=False)
    row = fit(tiny_model, data, tiny_cfg, log=None).history[0]
    assert row["l2sp_term"] > 0 and row["bss_term"] > 0
    assert row["train_loss"] == pytest.approx(
        row["task_loss"] + row["l2sp_term"] + row["bss_term"], rel=1e-6)


def test_objective_gradients_equal_backpropagating_the_whole_loss(tiny_model, tiny_cfg):
    """The training step's gradients (task + BSS back-propagated, L2-SP added in closed form)
    equal those of back-propagating task + lambda * L2-SP + eta * BSS as one loss."""
    from matxfer.graphs import collate
    from matxfer.regularizers import l2_sp_penalty
    from matxfer.train import Objective

    tiny_cfg = derive(tiny_cfg, {"regularizers.l2sp": 1e-2, "regularizers.bss": 1e-3})
    data = prepare_fold(tiny_cfg, tiny_model, progress=False)
    objective = Objective(tiny_model, tiny_cfg, data.spec, data.scaler)
    with torch.no_grad():  # move away from w0 so the L2-SP gradient is not zero
        for p in objective.params:
            p.add_(1e-3 * torch.randn_like(p))
    batch = collate(data.graphs, list(data.rows["train"][:8]))
    loss, terms = objective(tiny_model, batch)
    loss.backward()
    objective.after_backward(terms)
    ours = [p.grad.clone() for p in objective.params]
    tiny_model.zero_grad(set_to_none=True)
    whole, _ = objective(tiny_model, batch)
    (whole + 1e-2 * l2_sp_penalty(objective.params, objective.anchors)).backward()
    for p, g in zip(objective.params, ours):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-8)
    assert terms["l2sp_term"] > 0
    assert terms["train_loss"] == pytest.approx(
        terms["task_loss"] + terms["l2sp_term"] + terms["bss_term"], rel=1e-6)


def test_strong_l2sp_keeps_the_backbone_near_the_pretrained_weights(backbone, tiny_cfg):
    def drift(l2sp: float) -> float:
        torch.manual_seed(0)
        model = PropertyModel(copy.deepcopy(backbone).float(), "mean", [32])
        start = [p.detach().clone() for _, p in model.backbone_parameters()]
        cfg = derive(tiny_cfg, {"regularizers.l2sp": l2sp, "train.backbone_lr": 1e-2})
        fit(model, prepare_fold(cfg, model, progress=False), cfg, log=None)
        return sum((p - s).pow(2).sum().item()
                   for (_, p), s in zip(model.backbone_parameters(), start))

    assert drift(1e3) < 0.5 * drift(0.0)


def test_patience_stops_early(tiny_model, tiny_cfg, monkeypatch):
    tiny_cfg = derive(tiny_cfg, {"train.epochs": 6, "train.patience": 2})
    val_maes = iter([5.0, 4.0, 4.5, 4.2, 3.0, 1.0])  # best at epoch 2, no gain for 2 epochs
    monkeypatch.setattr("matxfer.train.score", lambda spec, y, p: next(val_maes))
    data = prepare_fold(tiny_cfg, tiny_model, progress=False)
    result = fit(tiny_model, data, tiny_cfg, log=None)
    assert (result.epochs_run, result.best_epoch, result.best_val) == (4, 2, 4.0)


def test_nan_loss_fails_with_the_reason(tiny_model, tiny_cfg):
    data = prepare_fold(tiny_cfg, tiny_model, progress=False)
    with torch.no_grad():
        tiny_model.head[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="training loss became nan at epoch 1"):
        fit(tiny_model, data, tiny_cfg, log=None)


def test_training_is_deterministic_for_a_seed(backbone, tiny_cfg):
    def run() -> float:
        torch.manual_seed(0)
        model = PropertyModel(copy.deepcopy(backbone).float(), "mean", [32])
        cfg = derive(tiny_cfg, {"train.epochs": 1})
        return fit(model, prepare_fold(cfg, model, progress=False), cfg,
                   log=None).history[0]["train_loss"]

    assert run() == pytest.approx(run(), rel=1e-5)


def test_resume_from_a_mid_run_state_matches_the_uninterrupted_run(backbone, tiny_cfg):
    """A worker killed after epoch 1 and restarted from its saved state ends where a run that
    was never stopped ends (to float32 round-off of multi-threaded CPU kernels): weights,
    optimizer moments, LR schedule, best epoch and shuffling all resume."""
    def fresh():
        torch.manual_seed(0)
        return PropertyModel(copy.deepcopy(backbone).float(), "mean", [32])

    tiny_cfg = derive(tiny_cfg, {"regularizers.l2sp": 1e-2, "regularizers.bss": 1e-3})
    whole = fresh()
    data = prepare_fold(tiny_cfg, whole, progress=False)
    saved = {}
    def keep(row, result, state):  # a copy: the live state keeps changing after this epoch
        saved.setdefault(row["epoch"], copy.deepcopy(state()))

    full = fit(whole, data, tiny_cfg, log=None, on_epoch=keep)
    resumed_model = fresh()
    resumed = fit(resumed_model, data, tiny_cfg, log=None, resume=saved[1])
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    for key in ("train_loss", "val_mae", "lr", "l2sp_term"):
        assert [r[key] for r in resumed.history] == pytest.approx(
            [r[key] for r in full.history], rel=1e-5)
    assert resumed.best_epoch == full.best_epoch
    for (name, a), b in zip(whole.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_budget_batches_give_the_same_predictions_and_bound_every_step(tiny_model, tiny_cfg,
                                                                       monkeypatch):
    data = prepare_fold(tiny_cfg, tiny_model, progress=False)
    y, fixed = predict(tiny_model, data, "val", 16)
    _, budget = predict(tiny_model, data, "val", 16, budget={"max_atoms": 20, "max_edges": None})
    assert np.allclose(fixed, budget, rtol=1e-5, atol=1e-6)
    edges = data.graphs.n_edges[data.rows["train"]]
    limit = int(edges.max())  # every structure fits: no batch of one needed
    tiny_cfg = derive(tiny_cfg, {"train.max_batch_edges": limit, "train.epochs": 1})
    steps = schedule_steps(data, tiny_cfg.train, 1)
    assert steps > math.ceil(len(data.rows["train"]) / tiny_cfg.train.batch_size)
    import matxfer.train as train

    seen = []
    original = train.iterate_batches

    def recording(*args, **kwargs):  # the batches fit() trains on
        for batch in original(*args, **kwargs):
            if kwargs.get("shuffle"):
                seen.append(int(batch["edge_index"].shape[1]))
            yield batch

    monkeypatch.setattr(train, "iterate_batches", recording)
    result = fit(tiny_model, data, tiny_cfg, log=None)
    assert math.isfinite(result.history[0]["train_loss"])
    assert len(seen) == steps and max(seen) <= limit and sum(seen) == int(edges.sum())
