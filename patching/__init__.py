"""ComfyUI glue: patch classes and the install functions that put our patches on ModelPatcher clones.

Imports comfy, never comfy_api (nodes/ is the only place that does).
"""
