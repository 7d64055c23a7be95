import copy

import pytest
import torch

from matxfer.datasets.matbench import load_task
from matxfer.graphs import collate
from matxfer.model import PropertyModel, TargetScaler, load_backbone, pool


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # MACE's own data pipeline builds in the default dtype
    yield
    torch.set_default_dtype(old)


def test_layer_features_equal_mace_node_feats(backbone, float64_default):
    """Our forward (no energy readouts) reproduces MACE's own node_feats exactly."""
    from mace.data import AtomicData, config_from_atoms
    from mace.tools import AtomicNumberTable
    from mace.tools.torch_geometric.dataloader import DataLoader
    from pymatgen.io.ase import AseAtomsAdaptor

    from matxfer.graphs import GraphSpec, build_graph_set

    df = load_task("matbench_jdft2d").iloc[:3]
    z = [int(x) for x in backbone.atomic_numbers]
    spec = GraphSpec(tuple(z), float(backbone.r_max), torch.float64)
    gs = build_graph_set(list(df.index), list(df.structure), df.target.to_numpy(), spec,
                         progress=False)
    ours = torch.cat(PropertyModel(backbone).layer_features(collate(gs, [0, 1, 2])), dim=-1)
    data = [AtomicData.from_config(config_from_atoms(AseAtomsAdaptor.get_atoms(s)),
                                   z_table=AtomicNumberTable(z), cutoff=float(backbone.r_max))
            for s in df.structure]
    batch = next(iter(DataLoader(data, batch_size=3))).to_dict()
    reference = backbone(batch, compute_force=False)["node_feats"]
    assert ours.shape == reference.shape == (gs.n_atoms.sum().item(), 256)
    assert torch.allclose(ours, reference, atol=1e-10)


def test_random_twin_has_identical_architecture_and_new_weights(backbone):
    twin = load_backbone("small", "random", seed=1, dtype=torch.float64)
    again = load_backbone("small", "random", seed=1, dtype=torch.float64)
    ref = dict(backbone.named_parameters())
    params = dict(twin.named_parameters())
    assert params.keys() == ref.keys()
    assert all(params[k].shape == ref[k].shape for k in ref)
    name = "interactions.0.linear.weight"
    assert not torch.allclose(params[name], ref[name])
    assert torch.equal(params[name], dict(again.named_parameters())[name])  # seeded


def test_random_twin_copies_equal_a_fresh_construction_and_are_independent():
    """Each process constructs a (model file, seed) twin once and hands out copies: a copy
    equals a construction from scratch, and changing one copy leaves the next untouched."""
    from matxfer.backbones.mace import _built_twin, random_twin, resolve_model_path

    path = resolve_model_path("small")
    first = random_twin(path, 7)
    with torch.no_grad():
        first.interactions[0].linear.weight.add_(1.0)
    second = random_twin(path, 7)
    stat = path.stat()
    fresh = _built_twin.__wrapped__(str(path), (stat.st_size, stat.st_mtime_ns), 7,
                                    torch.get_default_dtype())
    assert second is not first
    for (name, value), expected in zip(second.state_dict().items(),
                                       fresh.state_dict().values(), strict=True):
        assert torch.equal(value, expected), name
    assert not torch.equal(first.interactions[0].linear.weight,
                           second.interactions[0].linear.weight)


def test_a_reused_trial_model_starts_each_trial_as_built():
    """Tune runs many trials in one process: trial_model hands back the module the process
    built, with whatever a trial changed (weights, frozen flags, gradients, eval mode) reset
    to what build_model gives."""
    from matxfer.config import ModelConfig
    from matxfer.model import build_model, trial_model

    cfg = ModelConfig(head_hidden=[8])
    first = trial_model(cfg)
    with torch.no_grad():
        for p in first.parameters():
            p.add_(0.5)
    first.backbone.interactions[0].linear.weight.requires_grad_(False)
    first.head[0].weight.grad = torch.ones_like(first.head[0].weight)
    first.eval()
    second = trial_model(cfg)
    fresh = build_model(cfg)
    assert second is first and second.training
    for (name, value), expected in zip(second.state_dict().items(),
                                       fresh.state_dict().values(), strict=True):
        assert torch.equal(value, expected), name
    flags = {n: p.requires_grad for n, p in fresh.named_parameters()}
    assert {n: p.requires_grad for n, p in second.named_parameters()} == flags
    assert all(p.grad is None for p in second.parameters())


def test_missing_model_file_is_a_user_error():
    from matxfer.errors import UserError

    with pytest.raises(UserError, match="model.source 'nope.model' is neither a model file "
                                        "nor a known name; allowed names: small, "):
        load_backbone("nope.model")


@pytest.mark.parametrize("how, expected", [
    ("mean", [[2.0, -1.0], [5.0, 0.0]]),
    ("sum", [[4.0, -2.0], [5.0, 0.0]]),
    ("max", [[3.0, 0.0], [5.0, 0.0]]),
    ("mean+max", [[2.0, -1.0, 3.0, 0.0], [5.0, 0.0, 5.0, 0.0]]),
])
def test_pooling_by_hand(how, expected):
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0], [5.0, 0.0]])
    batch = torch.tensor([0, 0, 1])
    assert pool(x, batch, 2, how).tolist() == expected


def test_head_sees_every_layer_and_returns_one_value_per_structure(backbone, jdft2d_graphs):
    model = PropertyModel(copy.deepcopy(backbone), "mean+max", [32]).float()
    out, pooled = model(collate(jdft2d_graphs, [0, 1, 2, 3]))
    assert out.shape == (4,)
    assert [p.shape for p in pooled] == [(4, 256), (4, 256)]
    assert model.head[0].in_features == 512


def test_readouts_are_frozen_and_excluded_from_l2sp(backbone):
    names = [n for n, _ in PropertyModel(backbone).backbone_parameters()]
    assert names and not any(n.startswith("readouts") for n in names)


def test_target_scaler_round_trip_with_log():
    y = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    scaler = TargetScaler(y.numpy(), log=True)
    z = scaler.encode(y)
    assert z.mean().abs() < 1e-12 and (z.std(unbiased=False) - 1).abs() < 1e-12
    assert torch.allclose(scaler.decode(z), y)
    restored = TargetScaler.from_state(scaler.state())
    assert torch.allclose(restored.decode(z), y)
