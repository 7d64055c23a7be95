"""Physics of the pretrained potential: zero-shot descriptors (Γ phonons, moduli) and their use."""
