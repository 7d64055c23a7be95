"""Environment variables set for one block of code only, restored afterwards: settings that
Ray, Tune and MLflow read from the environment, scoped to where matxfer needs them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def scoped_env(values: dict[str, str], override: bool = False) -> Iterator[None]:
    """Set `values` in os.environ for the block, then restore what was there before. A
    variable the user already set keeps the user's value unless `override`."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if override or saved[key] is None:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
