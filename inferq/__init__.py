"""inferq: the composition root (settings, CLI, the embedded launcher, wiring)."""
