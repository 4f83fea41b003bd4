"""Trainers built on verl's single-controller design; FlowGRPO is the first."""
