"""The per-host agent: inventory, storage, and the loop that drives the engine toward the desired state."""
