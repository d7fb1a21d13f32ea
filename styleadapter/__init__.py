"""StyleAdapter (Wang et al. 2023): the decoupling strategies and the two-path cross-attention on the
IP-Adapter injection engine. Its checkpoint interface is a projection kind of that engine
(ip_adapter/style_projection.py).

Beside the glue (same rules as patching/: imports comfy, never comfy_api). The math is in
attention/two_path.py; the patch that puts it on a model is patching/ip_adapter.py's.
"""
