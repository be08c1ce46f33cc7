"""effseg meeting other ecosystems: nnU-Net v2 (`effseg.integrations.nnunet`)."""
