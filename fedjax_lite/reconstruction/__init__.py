"""Federated Reconstruction (see the reconstruction issue)."""
