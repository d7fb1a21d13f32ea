"""Image-prompt adapters for DiT models (Flux, SD3.5): their learned parts and loaders.

Glue-layer rules: may import comfy, never comfy_api. The attention math is in
attention/dit_image_prompt.py; the patches that use these will read the DiT site map.
"""
