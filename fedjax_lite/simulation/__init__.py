"""The training loop driver around compiled rounds (see the simulation issue)."""
