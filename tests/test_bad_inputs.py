"""The bad-input corpus: malformed config files, CLI flags and structure files. Each one gives
exit code 2, a one-line message naming the bad value, no traceback, and nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest

CIF_NACL = """data_NaCl
_cell_length_a {a}
_cell_length_b {a}
_cell_length_c {a}
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_type_symbol
_atom_site_label
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
{el} {el}1 0 0 0
Cl Cl1 {x} {x} {x}
"""

CONFIGS = {  # name: (file content, expected message)
    "empty.yaml": ("", "is empty; it must hold a mapping"),  # not a full default run
    "bad_yaml.yaml": ("train:\n  epochs: [1,\n", "is not valid YAML at line"),
    "unknown_key.yaml": ("train:\n  epocs: 3\n", "train.epocs: unknown config key"),
    "a_list.yaml": ("- a\n- b\n", "must hold a mapping, got list"),
    "binary.yaml": (b"\x00\xff\xfe\x81garbage", "is not a text file"),
    "wrong_type.yaml": ("train:\n  epochs: ten\n", "train.epochs"),
    "negative_lr.yaml": ("train:\n  lr: -1\n", "train.lr"),
    "unknown_task.yaml": ("data:\n  task: matbench_nope\n", "unknown task 'matbench_nope'"),
    "bad_dtype.yaml": ("model:\n  dtype: float16\n", "model.dtype"),
    "bad_fold.yaml": ("data:\n  fold: 9\n", "data.fold"),
    "bad_lr_decay.yaml": ("strategy:\n  lr_decay: 1.5\n", "strategy.lr_decay"),
}

STUDY_CONFIGS = {
    "study_empty.yaml": ("", "is empty; it must hold a mapping"),
    "study_bad_folds.yaml": ("folds: [0, 7]\n", "folds must be distinct values in 0-4"),
    "study_zero_samples.yaml": ("num_samples: 0\n", "num_samples"),
    "study_bad_range.yaml": ("search:\n  l2sp: {low: 1.0, high: 0.1}\n",
                             "high (0.1) must exceed low (1.0)"),
    "study_freeze_too_deep.yaml": ("search:\n  freeze_blocks: [1, 5]\n",
                                   "freeze_blocks 5 exceeds the backbone's 3 blocks"),
    "study_decay_above_one.yaml": ("search:\n  lr_decay: {low: 0.5, high: 2.0}\n",
                                   "lr_decay.high (2.0) must be at most 1"),
    "study_bad_pooling_choice.yaml": ("search:\n  pooling: [mean, median]\n", "search.pooling"),
    "study_no_pooling_choice.yaml": ("search:\n  pooling: []\n", "pooling must list one"),
}

FLAGS = [  # argv (OUT is replaced by the output path), expected message
    (["train", "--fold", "-1", "--out", "OUT"], "data.fold"),
    (["train", "--epochs", "0", "--out", "OUT"], "train.epochs"),
    (["train", "--val-fraction", "1.5", "--out", "OUT"], "data.val_fraction"),
    (["train", "--lr", "fast", "--out", "OUT"], "argument --lr: invalid float value: 'fast'"),
    (["train", "--epochs", "1"], "the following arguments are required: --out"),
    (["tune", "no/such/study.yaml", "--output-dir", "OUT"], "does not exist"),
    (["tune", "tune_configs/quickstart.yaml", "--variant", "best", "--output-dir", "OUT"],
     "unknown variant 'best'"),
    (["tune", "tune_configs/quickstart.yaml", "--num-samples", "0", "--output-dir", "OUT"],
     "num_samples"),
    (["tune", "tune_configs/quickstart.yaml", "--output-dir", "/proc/matxfer-out"],
     "output_dir '/proc/matxfer-out' is not writable"),
    (["tune", "tune_configs/quickstart.yaml", "--pooling", "median", "--output-dir", "OUT"],
     "run.model.pooling"),
    (["report", "--results", "no/such/folder", "--out", "OUT"],
     "--results 'no/such/folder' is not a folder"),
    (["data", "folds", "--task", "matbench_nope"], "unknown task 'matbench_nope'"),
    (["predict", "--model", "no/such/checkpoint", "x.cif", "--out", "OUT"],
     "not a checkpoint path nor a registered model"),
    (["predict", "--model", "tune_configs", "x.cif", "--out", "OUT"],
     "--model 'tune_configs' is a folder without checkpoint.pt"),
]


def structure_files(folder: Path) -> dict[str, str]:
    """Malformed or unusable structure files, with the reason each must give."""
    files = {
        "empty.cif": ("", "cannot be read as CIF"),
        "binary.cif": (b"\x89PNG\r\n\x1a\n\x00\x00binary", "cannot be read as CIF"),
        "not_a_structure.json": ('{"a": 1}', "cannot be read as pymatgen JSON"),
        "garbage_POSCAR": ("this is not\na POSCAR file\n", "cannot be read as POSCAR"),
        "broken.extxyz": ("2\nLattice=\"nonsense\"\nNa 0 0\n", "cannot be read as extxyz"),
        "polonium.cif": (CIF_NACL.format(a=5.64, el="Po", x=0.5), "Po"),
        "overlap.cif": (CIF_NACL.format(a=5.64, el="Na", x=0.01), "overlapping"),
        "huge_cell.cif": (CIF_NACL.format(a=5000.0, el="Na", x=0.5), "at most 500"),
        "notes.txt": ("Na Cl 0 0 0\n", "unrecognised file type; allowed: CIF (.cif)"),
    }
    out = {}
    for name, (content, reason) in files.items():
        path = folder / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        out[str(path)] = reason
    (folder / "a_directory.cif").mkdir()
    out[str(folder / "a_directory.cif")] = "is a folder, not a structure file"
    out[str(folder / "missing.cif")] = "does not exist"
    return out


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """In-process (fast); an unexpected exception would escape main() and fail the test."""
    import contextlib
    import io
    import os

    from matxfer.cli import main

    err, out, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_process(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matxfer.cli", *argv], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def assert_refused(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("matxfer: error: ") and needle in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", list(CONFIGS) + list(STUDY_CONFIGS))
def test_bad_config_file(name, tmp_path):
    content, needle = {**CONFIGS, **STUDY_CONFIGS}[name]
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    if name in STUDY_CONFIGS:
        argv = ["tune", str(path), "--output-dir", str(tmp_path / "out"),
                "--storage-path", str(tmp_path / "ray")]
    else:
        argv = ["train", "--config", str(path), "--out", str(tmp_path / "out")]
    assert_refused(run(argv, Path(__file__).parents[1]), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written


@pytest.mark.parametrize("argv, needle", FLAGS)
def test_bad_flag(argv, needle, tmp_path):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert_refused(run(argv, Path(__file__).parents[1]), needle)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from matxfer.config import load_config
    from matxfer.run import run_finetune

    out = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = load_config(overrides={"data.max_structures": 24, "data.val_fraction": 0.2,
                                 "train.epochs": 1, "train.batch_size": 8,
                                 "model.head_hidden": [8]})
    run_finetune(cfg, out, progress=False)
    return out


def test_bad_structure_files_each_refused_with_its_reason(tiny_checkpoint, tmp_path):
    """Every file alone: exit 2 and one line naming the file and the reason."""
    files = structure_files(tmp_path)
    for path, reason in files.items():
        out = tmp_path / "pred.csv"
        runner = run_process if path.endswith("polonium.cif") else run  # one real process
        proc = runner(["predict", "--model", str(tiny_checkpoint), path, "--out", str(out)],
                      tmp_path)
        assert_refused(proc, f"{path}: ")
        assert reason and reason in proc.stderr.split(f"{path}: ", 1)[-1], proc.stderr
        assert not out.exists()


def test_one_good_file_among_bad_ones_is_predicted(tiny_checkpoint, tmp_path):
    files = structure_files(tmp_path)
    good = tmp_path / "nacl.cif"
    good.write_text(CIF_NACL.format(a=5.64, el="Na", x=0.5))
    out = tmp_path / "pred.csv"
    proc = run_process(["predict", "--model", str(tiny_checkpoint), str(good), *files, "--out",
                        str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("matxfer: skipped") == len(files)
    import pandas as pd

    table = pd.read_csv(out, keep_default_na=False)
    assert table.loc[table["error"] == "", "formula"].tolist() == ["NaCl"]
