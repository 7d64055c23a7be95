"""Files that must never be read half-written or corrupted: checkpoints and graph caches.

`save_checked` writes a torch file atomically (temporary name, then rename) together with a
`<name>.sha256` sidecar in `sha256sum` format; `load_checked` verifies the sidecar when there
is one and raises :class:`CorruptFile` on a mismatch or an unreadable file, so callers can
rebuild (caches) or refuse with one line (checkpoints). `sha256sum -c file.sha256` checks the
same by hand.

`load_checked` unpickles with `weights_only=True`: tensors and plain containers, str, int,
float, bool and None only. A file holding any other pickled object raises :class:`UnsafeFile`
without running it; `plain` turns numpy values into what that loader accepts.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

SIDECAR = ".sha256"
_CHUNK = 1 << 20


class CorruptFile(Exception):
    """A file that fails its checksum or cannot be unpickled."""


class UnsafeFile(Exception):
    """A file holding pickled objects outside the weights-only allow-list (never executed)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR)


def atomic_write(path: Path, write) -> None:
    """`write(binary file)` into a temporary file beside `path`, then rename it to `path`: a
    killed writer leaves no partial file under the final name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checked(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically, then its checksum sidecar (also atomically).
    A file whose sidecar does not match is corrupted; a file without one (written before
    checksums, or by someone else) is loaded unchecked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar(path).unlink(missing_ok=True)  # an old sidecar must not vouch for the new file
    atomic_write(path, lambda fh: torch.save(obj, fh))
    line = f"{sha256_file(path)}  {path.name}\n".encode()
    atomic_write(sidecar(path), lambda fh: fh.write(line))


def verify(path: str | Path) -> None:
    """Raise CorruptFile when `path` has a sidecar whose checksum does not match."""
    path = Path(path)
    check = sidecar(path)
    if not check.is_file():
        return
    expected = (check.read_text().split() or [""])[0]
    if sha256_file(path) != expected:
        raise CorruptFile(f"{path} does not match its checksum ({check.name}): "
                          "the file is truncated or corrupted")


def recorded_sha256(path: str | Path) -> str | None:
    """The checksum a file's sidecar records (None without one); reads only the sidecar."""
    check = sidecar(Path(path))
    return (check.read_text().split() or [None])[0] if check.is_file() else None


def load_checked(path: str | Path, verified_sha256: str | None = None, **kwargs: Any) -> Any:
    """torch.load(weights_only=True) after `verify`: unreadable files raise CorruptFile, files
    holding other pickled objects UnsafeFile; both name the path. `verified_sha256`: the
    checksum another process verified this file against; when the sidecar still records it,
    the file is not hashed again (a worker trusting what its driver checked)."""
    if verified_sha256 is None:
        verify(path)
    elif recorded_sha256(path) != verified_sha256:
        raise CorruptFile(f"{path} changed since it was verified (sha256 {verified_sha256})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        reason = _weights_only_refusal(str(err))
        if reason is None:
            raise CorruptFile(f"{path} cannot be read (UnpicklingError): truncated or not a "
                              "torch file") from None
        raise UnsafeFile(f"{path} holds a pickled object outside the tensors-and-plain-values "
                         f"allow-list ({reason}); it was not loaded") from None
    except Exception as err:  # torch/pickle raise many types for a damaged file
        raise CorruptFile(f"{path} cannot be read ({type(err).__name__}): truncated or "
                          "not a torch file") from None


def _weights_only_refusal(message: str) -> str | None:
    """The object torch's weights-only unpickler refused, or None when it failed on damaged or
    non-pickle bytes (an unsupported opcode, a cut string, ...)."""
    if "Weights only load failed" not in message:
        return None
    found = re.search(r"GLOBAL (\S+?)(?: was not| whose)", message)
    if found:
        return f"global {found.group(1)}"
    found = re.search(r"(Can only (?:create new object|build)[^\n]*?but got [^\n]*)", message)
    return found.group(1)[:200] if found else None


def plain(obj: Any) -> Any:
    """`obj` with numpy scalars as Python numbers and numpy arrays as tensors, so that
    `load_checked` accepts it; containers without such values are returned as they are."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        done = {k: plain(v) for k, v in obj.items()}
        return obj if all(done[k] is v for k, v in obj.items()) else type(obj)(done)
    if isinstance(obj, (list, tuple)):
        items = [plain(v) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    return obj


def checked_files(folder: Path, name: str) -> dict[str, Path]:
    """{name: path} plus its sidecar when present: what to copy or log to keep them together."""
    files = {name: folder / name}
    if sidecar(folder / name).is_file():
        files[name + SIDECAR] = sidecar(folder / name)
    return files
