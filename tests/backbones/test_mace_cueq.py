"""The cuequivariance compute path (CPU: cuequivariance-torch's torch fallback)."""

import copy

import pytest
import torch

from matxfer.backbones.mace_cueq import CueqBackbone
from matxfer.config import load_config
from matxfer.errors import UserError
from matxfer.graphs import collate
from matxfer.model import PropertyModel


@pytest.fixture(scope="module")
def pair(backbone):
    """(e3nn, cueq) float64 PropertyModels with the same weights (one MACE conversion)."""
    torch.manual_seed(0)
    e3nn = PropertyModel(copy.deepcopy(backbone), "mean", [32]).double()
    cueq = copy.deepcopy(e3nn)
    cueq.use_cueq_kernels()
    return e3nn, cueq


def test_cueq_path_gives_the_e3nn_predictions_and_gradients(pair, jdft2d_graphs):
    e3nn, cueq = pair
    assert isinstance(cueq.fast_path, CueqBackbone)
    batch = {k: v.double() if v.is_floating_point() else v
             for k, v in collate(jdft2d_graphs, list(range(8))).items()}
    p_e3nn, p_cueq = e3nn(batch)[0], cueq(batch)[0]
    assert torch.allclose(p_e3nn, p_cueq, rtol=0, atol=1e-6)  # the bar: 1e-5
    e3nn.zero_grad(), cueq.zero_grad()
    p_e3nn.square().sum().backward()
    p_cueq.square().sum().backward()
    moved = 0
    for (name, a), b in zip(e3nn.named_parameters(), cueq.parameters()):
        if a.grad is not None:
            scale = a.grad.abs().max().clamp(min=1e-12)
            assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-6 * scale), name
            moved += name.startswith("backbone.products")  # through the projected weights
    assert moved > 0
    assert cueq.state_dict().keys() == e3nn.state_dict().keys()  # no twin weights


def test_the_weight_map_reproduces_maces_conversion_after_a_change(pair):
    """Weights changed after conversion (as by training) map the way MACE would convert them."""
    from matxfer.backbones.mace_cueq import _cueq_twin

    e3nn, cueq = pair
    moved = copy.deepcopy(e3nn.backbone)
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(1.5).add_(0.01)
    mapped = cueq.fast_path.parameters_from(moved)
    for name, value in _cueq_twin(moved).named_parameters():
        assert torch.allclose(mapped["twin." + name], value, rtol=1e-9, atol=1e-12), name


def test_cueq_cannot_be_combined_with_element_restriction():
    with pytest.raises(UserError, match="cannot be combined"):
        load_config(overrides={"model.kernels": "cueq", "model.restrict_elements": True})
    with pytest.raises(UserError, match="kernels"):
        load_config(overrides={"model.kernels": "fast"})
    assert load_config(overrides={"model.kernels": "cueq"}).model.kernels == "cueq"


def test_a_checkpoint_trained_on_cueq_predicts_on_e3nn(pair, tmp_path):
    """Checkpoints hold e3nn weights: predict needs no conversion (nor cuequivariance)."""
    from matxfer.checkpoint import build_payload
    from matxfer.model import TargetScaler
    from matxfer.predict import load_predictor
    from matxfer.storage import save_checked
    from matxfer.tasks import get_task

    _, cueq = pair
    cfg = load_config(overrides={"model.kernels": "cueq", "model.head_hidden": [32],
                                 "model.dtype": "float64"})
    scaler = TargetScaler(torch.arange(4.0).numpy(), log=False)
    save_checked(build_payload(cueq, cfg, get_task("matbench_jdft2d"), scaler,
                               cueq.backbone.atomic_numbers.tolist()), tmp_path / "checkpoint.pt")
    predictor = load_predictor(tmp_path)
    assert predictor.model.fast_path is None and predictor.cfg.model.kernels == "e3nn"
    state = predictor.model.state_dict()
    for name, value in cueq.state_dict().items():
        assert torch.equal(state[name], value), name
