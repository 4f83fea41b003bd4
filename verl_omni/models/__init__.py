"""Models the overlay builds locally (tiny test/CPU models)."""
