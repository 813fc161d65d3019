"""Networks and their training: models, training steps, the resumable loop and its checkpoints."""
