"""Small utilities of the overlay: atomic checkpoints and PNG visualisations."""
