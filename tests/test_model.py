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
