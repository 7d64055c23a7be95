"""CHGNet as a backbone: its own forward, its own pretrained weights, real Matbench structures."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from matxfer.backbones.chgnet import crystal_graphs
from matxfer.backbones.registry import block_index, family, load_backbone
from matxfer.cli import main
from matxfer.config import DataConfig, ModelConfig
from matxfer.graphs import collate, load_graph_set, save_graph_set, task_graphs
from matxfer.model import build_model


@pytest.fixture(scope="module")
def chgnet():
    return load_backbone("chgnet")


@pytest.fixture(scope="module")
def chgnet_graphs(chgnet, graph_cache_dir):
    return task_graphs(DataConfig(task="matbench_jdft2d"), family("chgnet").graph_spec(chgnet),
                       progress=False)


def jdft2d_structures(n: int):
    from matxfer.datasets.matbench import load_task

    frame = load_task("matbench_jdft2d")
    return list(frame.index[:n]), list(frame["structure"][:n])


def test_features_and_energy_are_chgnets_own_on_real_structures(chgnet, chgnet_graphs):
    """The cached graphs, turned back into CrystalGraphs, give CHGNet's own energies, and the
    hooked features of layer 2 are the atom features CHGNet itself returns (before its last
    convolution)."""
    ids, structures = jdft2d_structures(3)
    batch = collate(chgnet_graphs, chgnet_graphs.positions_of(ids))
    with torch.no_grad():
        feats = family("chgnet").layer_features(chgnet, batch)
        own = chgnet.predict_structure(structures, task="e", return_atom_feas=True,
                                       batch_size=3)
        ours = chgnet(crystal_graphs(batch), task="e")["e"]
    assert [f.shape[1] for f in feats] == [64, 64, 64, 64]
    assert all(f.shape[0] == int(batch["ptr"][-1]) for f in feats)
    expected = np.concatenate([o["atom_fea"] for o in own])
    np.testing.assert_allclose(feats[2].numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.numpy(), [o["e"] for o in own], rtol=1e-5, atol=1e-6)


def test_every_parameter_is_in_one_block_or_unused(chgnet):
    fam = family("chgnet")
    names = fam.block_names(chgnet)
    assert names == ["embedding", "interaction_0", "interaction_1", "interaction_2",
                     "interaction_3"]
    blocks = {n: block_index(n) for n, _ in chgnet.named_parameters()}
    assert set(b for b in blocks.values() if b is not None) == set(range(len(names)))
    unused = {n.split(".")[0] for n, b in blocks.items() if b is None}
    assert unused == {"composition_model", "mlp", "readout_norm", "site_wise"}
    # the energy head is frozen: L2-SP anchors and the optimiser see the blocks only
    trainable = {n for n, p in chgnet.named_parameters() if p.requires_grad}
    assert trainable == {n for n, b in blocks.items() if b is not None}
    assert 390_000 < fam.n_parameters(chgnet) < sum(p.numel() for p in chgnet.parameters())


def test_random_twin_has_the_architecture_and_new_weights(chgnet):
    twin = load_backbone("chgnet", "random", seed=3)
    again = load_backbone("chgnet", "random", seed=3)
    pre, rnd = dict(chgnet.named_parameters()), dict(twin.named_parameters())
    assert {n: p.shape for n, p in pre.items()} == {n: p.shape for n, p in rnd.items()}
    assert not torch.equal(pre["atom_embedding.embedding.weight"],
                           rnd["atom_embedding.embedding.weight"])
    assert torch.equal(rnd["atom_embedding.embedding.weight"],
                       dict(again.named_parameters())["atom_embedding.embedding.weight"])


def test_graph_cache_round_trip_keeps_the_extras(chgnet_graphs, tmp_path):
    assert set(chgnet_graphs.extras) == {"frac", "lattice", "image", "d2u", "u2d",
                                         "bond_graph"}
    save_graph_set(chgnet_graphs, tmp_path / "g.pt")
    back = load_graph_set(tmp_path / "g.pt")
    rows = [0, 5, 17]
    a, b = collate(chgnet_graphs, rows), collate(back, rows)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chgnet_and_mace_graph_caches_do_not_collide(chgnet, backbone):
    from matxfer.graphs import cache_file

    data = DataConfig(task="matbench_jdft2d")
    mace_spec = replace(family("small").graph_spec(backbone), dtype=torch.float32)
    assert cache_file(data, family("chgnet").graph_spec(chgnet)) != cache_file(data, mace_spec)


@pytest.mark.slow
def test_train_predict_drift_mi_with_chgnet(tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["train", "--task", "matbench_jdft2d", "--model", "chgnet", "--epochs", "1",
                 "--max-structures", "32", "--batch-size", "8", "--l2sp", "1e-3", "--bss",
                 "1e-3", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert np.isfinite(result["test_mae"]) and result["backbone"] == "chgnet"
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert payload["backbone"]["class"] == "CHGNet"
    capsys.readouterr()
    cif = tmp_path / "nacl.cif"
    from pymatgen.core import Lattice, Structure

    Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]]).to(filename=cif)
    assert main(["predict", "--model", str(out), str(cif)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].split(",")
    assert line[1] == "NaCl" and np.isfinite(float(line[2]))
    assert main(["analyze", "drift", "--checkpoint", str(out), "--max-structures", "8",
                 "--out", str(tmp_path / "drift"), "--tracking-uri", "off"]) == 0
    drift = json.loads((tmp_path / "drift" / "drift.json").read_text())
    assert list(drift["drift"]) == ["embedding", "interaction_0", "interaction_1",
                                    "interaction_2", "interaction_3", "head"]
    assert all(v > 0 for v in drift["drift"].values())
    assert main(["analyze", "mi", "--tasks", "matbench_jdft2d", "--model", "chgnet",
                 "--max-structures", "24", "--bins", "3", "--out", str(tmp_path / "mi"),
                 "--tracking-uri", "off"]) == 0
    rows = json.loads((tmp_path / "mi" / "mi.json").read_text())["rows"]
    assert {r["layer"] for r in rows} == {"embedding", "interaction_0", "interaction_1",
                                         "interaction_2", "interaction_3"}
    assert {r["init"] for r in rows} == {"pretrained", "random"}


@pytest.mark.parametrize("extra, needle", [
    (["--kernels", "cueq"], "model.kernels 'cueq' is not supported by the chgnet backbone"),
    (["--dtype", "float64"], "model.dtype 'float64' is not supported by the chgnet backbone"),
    (["--compile", "aot_eager"], "train.compile is not supported by the chgnet backbone"),
    (["--physics", "residual", "--descriptors", "energy_per_atom"],
     "model.physics is not supported by the chgnet backbone"),
])
def test_an_option_chgnet_lacks_is_one_line_exit_2(extra, needle, tmp_path, capsys):
    code = main(["train", "--model", "chgnet", "--max-structures", "16", "--epochs", "1",
                 "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_build_model_of_chgnet_has_a_head_on_four_layers():
    model = build_model(ModelConfig(source="chgnet", head_hidden=[16]))
    assert model.head[0].in_features == 4 * 64 and model.family.name == "chgnet"


def test_freezing_and_layerwise_lr_follow_chgnets_blocks():
    """strategies.py sees CHGNet's five blocks: freezing the first two freezes the embedding
    and the first convolution (atom, bond and angle layers), LR decay gives each block its
    depth's rate, and L2-SP anchors exactly the trainable backbone parameters."""
    from matxfer.config import load_config
    from matxfer.strategies import freeze_blocks, n_blocks, param_groups

    model = build_model(ModelConfig(source="chgnet", head_hidden=[16]))
    assert n_blocks(model) == 5
    frozen = freeze_blocks(model, 2)
    assert any(n.startswith("backbone.atom_embedding.") for n in frozen)
    assert any(n.startswith("backbone.bond_conv_layers.0.") for n in frozen)
    assert not any(n.startswith("backbone.atom_conv_layers.1.") for n in frozen)
    cfg = load_config(overrides={"model.source": "chgnet", "strategy.lr_decay": 0.5,
                                 "train.backbone_lr": 1e-3})
    groups = param_groups(model, cfg)
    assert [g["block"] for g in groups] == [2, 3, 4, 5]  # blocks 2-4 and the head
    assert [g["lr"] for g in groups[:-1]] == pytest.approx([1e-3 * 0.5 ** 3, 1e-3 * 0.25,
                                                            1e-3 * 0.5])
    anchored = {n for n, _ in model.backbone_parameters()}
    assert anchored == {n.removeprefix("backbone.") for n, p in model.named_parameters()
                        if p.requires_grad and n.startswith("backbone.")}
