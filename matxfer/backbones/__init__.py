"""Foundation-model backbones behind one interface (matxfer.backbones.base.Family): the MACE
family (MACE-MP-0 and any MACE model file) and CHGNet. Nothing above this package imports
`mace` or `chgnet`; `names` is the light part the config validates with."""
