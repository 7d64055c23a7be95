"""Checked files: atomic torch saves with a sha256 sidecar that `sha256sum -c` accepts."""

import subprocess

import pytest
import torch

from matxfer.storage import CorruptFile, load_checked, save_checked, sidecar


def test_round_trip_and_sidecar_is_sha256sum_format(tmp_path):
    path = tmp_path / "x.pt"
    save_checked({"w": torch.arange(5.0)}, path)
    assert torch.equal(load_checked(path)["w"], torch.arange(5.0))
    check = subprocess.run(["sha256sum", "-c", sidecar(path).name], cwd=tmp_path,
                           capture_output=True, text=True)
    assert check.returncode == 0 and "x.pt: OK" in check.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt", "x.pt.sha256"]


def test_one_flipped_byte_is_caught(tmp_path):
    path = tmp_path / "x.pt"
    save_checked({"w": torch.zeros(1000)}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor payload: torch.load alone would not notice
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=False)["w"].abs().sum() > 0  # loads, silently wrong
    with pytest.raises(CorruptFile, match="does not match its checksum"):
        load_checked(path)


def test_unreadable_file_without_sidecar_is_corrupt_not_a_traceback(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CorruptFile, match="cannot be read"):
        load_checked(path)


def test_saving_again_replaces_file_and_checksum_together(tmp_path):
    path = tmp_path / "x.pt"
    save_checked({"v": 1}, path)
    save_checked({"v": 2}, path)
    assert load_checked(path) == {"v": 2}
