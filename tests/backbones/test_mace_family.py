"""The MACE family beyond MACE-MP-0 small: models with L = 1 and L = 2 hidden irreps and three
interactions, built here with mace's own constructors, through every matxfer path."""

import json

import numpy as np
import pytest
import torch
from conftest import study_folder
from scipy.spatial.transform import Rotation

from matxfer.backbones.registry import family
from matxfer.cli import main
from matxfer.config import ModelConfig, load_config, load_study_config
from matxfer.errors import UserError
from matxfer.graphs import GraphSpec, build_graph_set, collate
from matxfer.model import build_model

LAYERS = ["embedding", "interaction_0", "interaction_1", "interaction_2"]


def jdft2d_rows(n: int):
    from matxfer.datasets.matbench import load_task

    frame = load_task("matbench_jdft2d").iloc[:n]
    return list(frame.index), list(frame["structure"]), frame["target"].to_numpy()


def rotated(structure, seed: int):
    """The same crystal with its lattice and positions rotated (a rigid rotation)."""
    from pymatgen.core import Lattice, Structure

    rot = Rotation.random(random_state=seed).as_matrix()
    return Structure(Lattice(structure.lattice.matrix @ rot.T), structure.species,
                     structure.cart_coords @ rot.T, coords_are_cartesian=True)


@pytest.mark.parametrize("lmax", [1, 2])
def test_invariant_features_of_an_equivariant_mace_are_rotation_invariant(mace_files, lmax):
    """MACE's own forward gives node_feats with 1o/2e channels; the features matxfer pools are
    its 0e channels only, so rotating the crystal leaves them unchanged (the full node_feats
    would change)."""
    model = build_model(ModelConfig(source=str(mace_files[lmax]), dtype="float64"))
    bb = model.backbone
    assert model.block_names() == LAYERS
    assert family("mace").layer_widths(bb) == [16, 16, 16]  # 0e channels of each layer
    ids, structures, y = jdft2d_rows(4)
    spec = GraphSpec(tuple(int(z) for z in bb.atomic_numbers), float(bb.r_max), torch.float64)
    plain = collate(build_graph_set(ids, structures, y, spec, progress=False), range(4))
    turned = collate(build_graph_set(ids, [rotated(s, 7) for s in structures], y, spec,
                                     progress=False), range(4))
    with torch.no_grad():
        a, b = model.layer_features(plain), model.layer_features(turned)
        full = [bb(dict(batch, cell=torch.zeros(4, 3, 3, dtype=torch.float64)),
                   compute_force=False)["node_feats"] for batch in (plain, turned)]
    for x, z in zip(a, b):
        np.testing.assert_allclose(x.numpy(), z.numpy(), atol=1e-8)
    assert not torch.allclose(full[0], full[1], atol=1e-6)  # the equivariant channels turned


def test_element_restriction_of_an_L1_mace_refuses_in_one_line(mace_files):
    """mace's own element copy (load_foundations_elements) cannot restrict residual L > 0
    models: the preflight says so before any work instead of failing inside a trial."""
    from matxfer.preflight import preflight_run

    cfg = load_config(overrides={"model.source": str(mace_files[1]),
                                 "model.restrict_elements": True})
    with pytest.raises(UserError, match="model.restrict_elements is not supported for "
                                        "model.source"):
        preflight_run(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("lmax", [1, 2])
def test_train_predict_drift_mi_with_a_local_mace_file(mace_files, lmax, tmp_path, capsys):
    source, out = str(mace_files[lmax]), tmp_path / "ft"
    assert main(["train", "--task", "matbench_jdft2d", "--model", source, "--epochs", "1",
                 "--max-structures", "24", "--batch-size", "8", "--bss", "1e-3",
                 "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert np.isfinite(result["test_mae"]) and result["backbone"] == f"mace-L{lmax}.model"
    capsys.readouterr()
    from pymatgen.core import Lattice, Structure

    cif = tmp_path / "nacl.cif"
    Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]]).to(filename=cif)
    assert main(["predict", "--model", str(out), str(cif)]) == 0
    assert np.isfinite(float(capsys.readouterr().out.strip().splitlines()[-1].split(",")[2]))
    # θ0 of a model file comes only from the file you name (never the checkpoint's path)
    assert main(["analyze", "drift", "--checkpoint", str(out), "--max-structures", "8",
                 "--foundation", source, "--out", str(tmp_path / "drift"),
                 "--tracking-uri", "off"]) == 0
    drift = json.loads((tmp_path / "drift" / "drift.json").read_text())
    assert list(drift["drift"]) == [*LAYERS, "head"]
    assert main(["analyze", "mi", "--tasks", "matbench_jdft2d", "--model", source,
                 "--max-structures", "16", "--bins", "3", "--out", str(tmp_path / "mi"),
                 "--tracking-uri", "off"]) == 0
    rows = json.loads((tmp_path / "mi" / "mi.json").read_text())["rows"]
    assert {r["layer"] for r in rows} == set(LAYERS)


@pytest.mark.cluster
@pytest.mark.slow
def test_one_trial_studies_of_L1_L2_mace_files_and_chgnet(mace_files, tmp_path):
    """`matxfer tune` with --model FILE (L = 1, L = 2) and --variant chgnet: one trial each,
    the test fold evaluated once, the backbone and its size in result.json; `matxfer report`
    then lists a row per backbone."""
    import ray

    from matxfer.tune import run_study

    path = tmp_path / "study.yaml"
    path.write_text(
        "folds: [0]\nnum_samples: 1\nmax_concurrent_trials: 1\nasha: {enabled: false}\n"
        f"storage_path: {tmp_path / 'ray'}\noutput_dir: {tmp_path / 'studies'}\n"
        "tracking: {enabled: false}\nsearch: {l2sp: null, bss: null}\n"
        "run:\n  data: {task: matbench_jdft2d, max_structures: 24, val_fraction: 0.2}\n"
        "  train: {epochs: 1, batch_size: 8}\n  model: {head_hidden: [16]}\n")
    studies = {"L1": load_study_config(path, {"run.model.source": str(mace_files[1]),
                                              "name": "mace-L1"}),
               "L2": load_study_config(path, {"run.model.source": str(mace_files[2]),
                                              "name": "mace-L2"}),
               "chgnet": load_study_config(path, variant="chgnet")}
    params = {}
    try:
        for key, study in studies.items():
            run_study(study)  # the first starts a local Ray instance, the others reuse it
            folder = study_folder(tmp_path / "studies", variant=study.name)
            result = json.loads((folder / "fold0" / "result.json").read_text())
            assert result["n_trials"] == 1 and np.isfinite(result["test_mae"])
            params[key] = result["backbone_params"]
    finally:
        ray.shutdown()  # the next test file in this process starts its own
    assert params["chgnet"] > params["L2"] > params["L1"] > 0
    assert main(["report", "--results", str(tmp_path / "studies"), "--out",
                 str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "backbones.md").read_text()
    for name in ("mace-L1.model", "mace-L2.model", "chgnet"):
        assert name in table


@pytest.mark.parametrize("source, needle", [
    ("medium-mpa-9", "is neither a model file nor a known name; allowed names: small, "
                     "medium"),
    ("chgnet-9.9", "is not a CHGNet version; allowed: chgnet, chgnet-0.3.0, chgnet-0.2.0"),
])
def test_an_unknown_model_name_lists_the_allowed_ones(source, needle, tmp_path, capsys):
    code = main(["train", "--model", source, "--epochs", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_a_model_lacking_the_datasets_elements_names_structure_and_elements(tmp_path, capsys):
    from mace_files import build_mace_file

    source = build_mace_file(tmp_path / "oxygen-only.model", 1, 2, elements=[8])
    cache = tmp_path / "cache"
    code = main(["train", "--model", str(source), "--max-structures", "16", "--epochs", "1",
                 "--cache-dir", str(cache), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "is not among the model's 1 elements" in err and "structure mb-jdft2d-" in err
    assert "636 structures hold elements the model lacks (" in err and " and 631 more" in err
    assert not (tmp_path / "o").exists() and not list(cache.glob("*.pt"))


def test_a_file_that_is_not_a_mace_model_is_refused(tmp_path, capsys):
    bogus = tmp_path / "weights.model"
    torch.save({"not": "a model"}, bogus)
    code = main(["train", "--model", str(bogus), "--epochs", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "does not hold a MACE model" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("path", ["compile", "cueq"])
def test_compile_ready_and_cueq_paths_of_an_L1_mace_give_the_same_features(mace_files, path):
    """The traceable rebuild (train.compile) and the cuequivariance path (model.kernels) of a
    model with L = 1 compute what MACE's own e3nn forward computes."""
    from matxfer.backbones.mace import compile_ready, mace_features

    model = build_model(ModelConfig(source=str(mace_files[1]), dtype="float64"))
    ids, structures, y = jdft2d_rows(3)
    batch = collate(build_graph_set(ids, structures, y, model.graph_spec(), progress=False),
                    range(3))
    with torch.no_grad():
        expected = mace_features(model.backbone, batch)
        if path == "compile":
            got = mace_features(compile_ready(model.backbone), batch)
        else:
            model.use_cueq_kernels()
            got = model.layer_features(batch)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-9)
