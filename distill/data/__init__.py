"""Images in: format decoders, datasets (load, cache, normalise), augmentation, the synthetic-set artefact."""
