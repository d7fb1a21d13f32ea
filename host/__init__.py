"""Host facts: what every method needs to know about the loaded ComfyUI model and the running call.

The attention-site map and the block grammar (block_map, block_weights, layer_select), cond/uncond
chunks and reference rows (batch, reference_rows), the schedule and step position (schedule,
trajectory), model files and their cache (model_files), gradients inside a prompt (gradients).
Imports comfy (never comfy_api) and attention/ only: every other folder builds on it.
"""
