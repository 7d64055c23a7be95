"""What a local Ray instance's worker processes import as they start (Ray's
worker_process_setup_hook), while the study's driver is still busy: the first trial placed on
a worker then finds torch, mace and matxfer's training path already imported."""

from __future__ import annotations


def import_trial_modules() -> None:
    """Import the modules a trial runs (matxfer.distributed and what it pulls in)."""
    import matxfer.distributed  # noqa: F401
