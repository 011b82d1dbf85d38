"""Sampling with the trained files: options, samplers, the pipeline."""
