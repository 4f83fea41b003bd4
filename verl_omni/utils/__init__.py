"""Small utilities of the overlay: LRU map, stable seeds, atomic checkpoints and PNG visualisations."""
