"""torch.compile of the training step (CPU: the 'eager' backend, which traces with Dynamo and
runs the captured graphs as they are; inductor's kernels are measured in benchmarks)."""

import copy

import pytest
import torch

from matxfer.backbones.mace import compile_ready
from matxfer.config import derive, load_config
from matxfer.errors import UserError
from matxfer.graphs import collate
from matxfer.model import PropertyModel
from matxfer.run import prepare_fold
from matxfer.train import fit


def test_the_compile_ready_backbone_is_the_same_model(backbone, jdft2d_graphs):
    ready = compile_ready(backbone)
    assert ready.state_dict().keys() == backbone.state_dict().keys()
    assert not any(p.requires_grad for p in ready.readouts.parameters())
    torch.manual_seed(0)
    plain = PropertyModel(backbone, "mean", [32])
    twin = copy.deepcopy(plain)
    twin.backbone = ready
    batch = {k: v.double() if v.is_floating_point() else v
             for k, v in collate(jdft2d_graphs, list(range(6))).items()}
    # float64; the twin runs the same operations without e3nn's generated code, so sums may
    # be reordered: ~1e3 terms of magnitude <= 1e2 give at most ~1e-11 of round-off
    assert torch.allclose(plain(batch)[0], twin(batch)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_compiled_training_is_the_same(backbone, tiny_cfg):
    def run(mode: str) -> list[dict]:
        torch.manual_seed(0)
        model = PropertyModel(compile_ready(backbone).float(), "mean", [32])
        cfg = derive(tiny_cfg, {
            "train.epochs": 1,
            "data.max_structures": 16,
            "train.compile": mode,
            "regularizers.l2sp": 1e-2,
            "regularizers.bss": 1e-3,
        })
        data = prepare_fold(cfg, model, progress=False)
        return fit(model, data, cfg, log=None).history

    plain, traced = run("off"), run("eager")
    for key in ("train_loss", "l2sp_term", "bss_term", "val_mae"):
        assert traced[0][key] == pytest.approx(plain[0][key], rel=1e-5, abs=1e-8), key


def test_compile_is_refused_on_the_other_compute_paths():
    with pytest.raises(UserError, match="train.compile 'inductor' needs model.kernels"):
        load_config(overrides={"train.compile": "inductor", "model.restrict_elements": True})
    with pytest.raises(UserError, match="compile"):
        load_config(overrides={"train.compile": "fast"})
