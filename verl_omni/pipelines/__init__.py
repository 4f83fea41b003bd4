"""Sampling pipelines built on diffusers models (flow-matching SDE with log-probabilities)."""
