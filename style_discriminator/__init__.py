"""Style discriminators: CSD (Somepalli et al. 2024, "Measuring Style Similarity in Diffusion
Models") from its official files, its preprocessing, and style similarity.

Beside the glue (same rules as patching/: imports comfy, never comfy_api). The guidance that
backpropagates through it lives in sampling/style_guidance.py.
"""
