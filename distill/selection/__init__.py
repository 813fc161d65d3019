"""Selection and pruning of real data: coresets, source pruning, InfoBatch, influence scores."""
