"""Sampling-level glue: deterministic inversion and samplers that replay a reference row.

Imports comfy (never comfy_api), like patching/. The trajectory type is host/trajectory.py (pure torch).
"""
