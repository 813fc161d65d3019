"""Images in: format decoders, datasets (load, cache, normalise), augmentation,
and the synthetic-set artefact."""
