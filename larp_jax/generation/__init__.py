"""Sampling from the stage-2 generator (``sampling.sample``)."""
