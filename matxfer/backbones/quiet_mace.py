"""Import mace before e3nn (it sets up torch>=2.6 unpickling of MACE models), without the
banner it prints when the optional cuequivariance kernels are absent. Imported for its effect
by the modules of the MACE family."""

from __future__ import annotations

import contextlib
import io
import warnings


def _import_mace_quietly() -> None:
    """Import mace before e3nn (it sets up torch>=2.6 unpickling of MACE models), without the
    banner it prints when the optional cuequivariance kernels are absent."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mace.modules  # noqa: F401
        import mace.tools.scripts_utils  # noqa: F401


_import_mace_quietly()
