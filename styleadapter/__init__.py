"""StyleAdapter (Wang et al. 2023): the checkpoint interface, the decoupling strategies and the
two-path cross-attention on the IP-Adapter injection engine.

Beside the glue (same rules as patching/: imports comfy, never comfy_api). The math is in
attention/two_path.py; the patch that puts it on a model is patching/ip_adapter.py's.
"""
