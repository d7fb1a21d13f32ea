"""StyleKit: published style-transfer methods for diffusion models as ComfyUI nodes.

ComfyUI imports this file and calls comfy_entrypoint() (the V3 extension API). The node modules
are imported only then, so the pure-torch math under attention/ stays importable without comfy.
"""


async def comfy_entrypoint():
    from .nodes import StyleKitExtension

    return StyleKitExtension()
