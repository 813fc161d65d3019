"""Pure-JAX kernel and ridge-regression math (no flax models)."""
