"""Transfer evaluation: pretraining on a set, probes, fine-tuning, the results table."""
