"""IP-Adapter's learned parts and files: projections, the loader, the encode stages, content subtraction.

Beside the glue (same rules as patching/: imports comfy, never comfy_api). The attention math is
in attention/decoupled.py, the patch that puts it on a model in patching/ip_adapter.py.
"""
