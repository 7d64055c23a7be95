"""Import mace when a MACE is first needed, before e3nn (mace sets up torch>=2.6 unpickling of
MACE models), without the banner it prints when the optional cuequivariance kernels are
absent. A process that never builds a MACE (a study's driver until its test evaluation,
with the model's facts cached) never pays the seconds this import takes."""

from __future__ import annotations

import contextlib
import functools
import io
import threading
import warnings


@functools.lru_cache(maxsize=1)
def import_mace() -> None:
    """Import mace (once per process). Quietly on the main thread only: redirecting stdout
    is process-wide, and a thread (the driver's evaluation warm-up) must not swallow what the
    main thread prints meanwhile."""
    quiet = threading.current_thread() is threading.main_thread()
    with (contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mace.modules  # noqa: F401
        import mace.tools.scripts_utils  # noqa: F401
