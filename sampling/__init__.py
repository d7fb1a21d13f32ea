"""Sampling-level glue: deterministic inversion, its trajectory, and samplers that replay a reference row.

Imports comfy (never comfy_api), like patching/; trajectory.py is pure torch.
"""
