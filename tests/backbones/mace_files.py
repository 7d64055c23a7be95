"""MACE models built here with mace's own constructors (random weights), saved to files."""

import torch


def build_mace_file(path, lmax: int, interactions: int = 3, elements: list[int] | None = None):
    """A ScaleShiftMACE with hidden irreps 16x0e (+16x1o, +16x2e up to `lmax`), the element
    table of MACE-MP-0 small (or `elements`), `interactions` layers; saved as a whole model,
    as mace does."""
    from matxfer.backbones.quiet_mace import import_mace
    from matxfer.model import weights_file

    import_mace()  # mace before e3nn: it sets what torch >= 2.6 needs to unpickle its models
    from e3nn import o3
    from mace import modules
    from mace.tools.scripts_utils import extract_config_mace_model

    small = torch.load(weights_file("small"), map_location="cpu", weights_only=False)
    cfg = extract_config_mace_model(small)
    irreps = "+".join(f"16x{ell}{'e' if ell % 2 == 0 else 'o'}" for ell in range(lmax + 1))
    cfg.update(hidden_irreps=o3.Irreps(irreps), num_interactions=interactions, max_ell=2,
               correlation=2, radial_MLP=[16, 16], MLP_irreps=o3.Irreps("8x0e"),
               atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    if elements is not None:
        table = [int(z) for z in cfg["atomic_numbers"]]
        cfg.update(atomic_numbers=torch.tensor(elements), num_elements=len(elements),
                   atomic_energies=cfg["atomic_energies"][[table.index(z) for z in elements]])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(lmax)
            model = modules.ScaleShiftMACE(**cfg)
    finally:
        torch.set_default_dtype(previous)
    torch.save(model, path)
    return path
