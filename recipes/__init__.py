"""Runnable recipes built on verl-omni."""
