"""effseg meeting other ecosystems: built on the library (`effseg.nn`, `effseg.ops`), never
imported by it.

- `convert` (public as `effseg.convert`): fuses and synchronizes the norms of any existing
  network;
- `monai` (public as `effseg.monai`): effseg norms in MONAI's Norm factory;
- `nnunet` (public as `effseg.nnunet`): nnU-Net v2's trainer and planner with effseg's layers.
"""
