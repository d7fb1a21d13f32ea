"""Shared setup of the DiT IP-Adapter host tests (Flux XLabs, SD3.5 InstantX): the diffusers twin of a
tiny core DiT loaded with the core model's own weights (through core's key maps), forwards through
core and through diffusers with the reference IP-Adapter processors, and a block replace of "another
pack" that records the image stream a block returns."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from einops import rearrange


def loaded_twin(model_patcher) -> torch.nn.Module:
    """diffusers' FluxTransformer2DModel / SD3Transformer2DModel holding the core model's weights, fp32, eval."""
    from stylekit.tests.support.diffusers_dit import diffusers_twin_and_key_map

    model, key_map = diffusers_twin_and_key_map(model_patcher)
    sd = model_patcher.model.diffusion_model.state_dict()
    converted = {}
    for key, source in key_map.items():
        if isinstance(source, str):
            source = (source, None)
        name, narrow, *convert = source
        if name not in sd:   # the Flux map also names ControlNet-only keys
            continue
        value = sd[name] if narrow is None else sd[name].narrow(*narrow)
        converted[key] = convert[0](value) if convert else value
    model = model.to_empty(device="cpu")
    model.load_state_dict(converted, strict=True)
    return model.eval()


class Recorder:
    """A block replace of 'another pack': runs what was there, records the streams it returns (txt is None
    after an MMDiT's last block) and counts calls."""

    def __init__(self, previous=None):
        self.previous, self.calls, self.img, self.txt = previous, 0, None, None

    def __call__(self, args, extra):
        self.calls += 1
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        self.img = out["img"].clone()
        self.txt = None if out.get("txt") is None else out["txt"].clone()
        return out


def recording(m, index: int):
    """(a clone of m with a Recorder over the ("double_block", index) replace, the recorder)."""
    m = m.clone()
    previous = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {}).get(("double_block", index))
    recorder = Recorder(previous)
    m.set_model_patch_replace(recorder, "dit", "double_block", index)
    return m, recorder


# --- Flux --------------------------------------------------------------------------------------

def flux_forward(m, inputs: dict) -> torch.Tensor:
    """Core's Flux forward with m's transformer options and wrappers (the DIFFUSION_MODEL wrapper runs)."""
    options = {**m.model_options["transformer_options"], "wrappers": m.wrappers}
    with torch.no_grad():
        return m.model.diffusion_model(inputs["x"], inputs["t"], inputs["context"], y=inputs["y"],
                                       guidance=inputs["guidance"], transformer_options=options)


def flux_block_output(m, inputs: dict, index: int) -> torch.Tensor:
    """The image stream out of double block `index` in a Flux forward."""
    m, recorder = recording(m, index)
    flux_forward(m, inputs)
    return recorder.img


def flux_diffusers_forward(twin, inputs: dict, adapters=(), scales=()) -> torch.Tensor:
    """diffusers' Flux with FluxIPAdapterAttnProcessor on every double block (plain processors without
    adapters). adapters: [(XLabs file dict, image tokens [1, T, context])]; scales: per adapter, one scale
    per double block. Returns the latent layout [B, C, H, W] as core's forward."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

    for i, block in enumerate(twin.transformer_blocks):
        if adapters:
            hidden, context = adapters[0][0][f"double_blocks.{i}.processor.ip_adapter_double_stream_k_proj.weight"].shape
            proc = FluxIPAdapterAttnProcessor(hidden, context, num_tokens=tuple(t.shape[1] for _, t in adapters),
                                              scale=[s[i] for s in scales])
            proc.load_state_dict({f"to_{kv}_ip.{j}.{p}": file[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.{p}"]
                                  for j, (file, _) in enumerate(adapters) for kv in "kv" for p in ("weight", "bias")})
            block.attn.set_processor(proc)
        else:
            block.attn.set_processor(FluxAttnProcessor())
    x = inputs["x"]
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    img_ids = torch.stack([torch.zeros(h * w), rows.flatten(), cols.flatten()], 1)
    kwargs = {"ip_hidden_states": [tokens for _, tokens in adapters]} if adapters else None
    with torch.no_grad():
        out = twin(hidden_states=rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2),
                   encoder_hidden_states=inputs["context"], pooled_projections=inputs["y"], timestep=inputs["t"],
                   img_ids=img_ids, txt_ids=torch.zeros(inputs["context"].shape[1], 3), guidance=inputs["guidance"],
                   joint_attention_kwargs=kwargs, return_dict=False)[0]
    return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=2, pw=2)


# --- SD3.5 -------------------------------------------------------------------------------------

def sd35_forward(m, inputs: dict, sigma: float) -> torch.Tensor:
    """Core's MMDiT forward at timestep sigma·1000, with m's transformer options and `sigmas`."""
    options = {**m.model_options["transformer_options"], "sigmas": torch.tensor([sigma])}
    with torch.no_grad():
        return m.model.diffusion_model(inputs["x"], torch.tensor([sigma * 1000]), inputs["context"], y=inputs["y"],
                                       transformer_options=options)


def sd35_block_output(m, inputs: dict, sigma: float, index: int) -> torch.Tensor:
    """The x stream out of joint block `index`, through BaseModel.apply_model (which runs the APPLY_MODEL
    wrappers, e.g. the one recording the token grid for masks)."""
    m, recorder = recording(m, index)
    options = {**m.model_options["transformer_options"], "sigmas": torch.tensor([sigma]), "wrappers": m.wrappers}
    with torch.no_grad():
        m.model.apply_model(inputs["x"], torch.tensor([sigma]), c_crossattn=inputs["context"], y=inputs["y"],
                            transformer_options=options)
    return recorder.img


def sd35_diffusers_forward(twin, inputs: dict, sigma: float, file=None, adapter=None, scales=()) -> torch.Tensor:
    """diffusers' SD3 with SD3IPAdapterJointAttnProcessor2_0 on every joint block (plain processors without
    a file). file: the InstantX dict {"image_proj", "ip_adapter"}; adapter: ours loaded from it (its
    resampler gives the IP tokens and temb, as diffusers' pipeline does); scales: one per joint block."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0, SD3IPAdapterJointAttnProcessor2_0

    kwargs = None
    for i, block in enumerate(twin.transformer_blocks):
        if file is None:
            block.attn.set_processor(JointAttnProcessor2_0())
            continue
        weights = {k.split(".", 1)[1]: v for k, v in file["ip_adapter"].items() if k.startswith(f"{i}.")}
        ip_dim2, temb_dim = weights["norm_ip.linear.weight"].shape
        proc = SD3IPAdapterJointAttnProcessor2_0(twin.inner_dim, ip_dim2 // 2, weights["norm_q.weight"].shape[0],
                                                 temb_dim, scales[i])
        proc.load_state_dict(weights)
        block.attn.set_processor(proc)
    if file is not None:
        tokens, temb = adapter.resampler(inputs["features"], torch.tensor([sigma * 1000]))
        kwargs = {"ip_hidden_states": tokens, "temb": temb}
    with torch.no_grad():
        return twin(hidden_states=inputs["x"], encoder_hidden_states=inputs["context"], pooled_projections=inputs["y"],
                    timestep=torch.tensor([sigma * 1000]), joint_attention_kwargs=kwargs, return_dict=False)[0]



def other_packs_overrides(temperature: float = 1.3, gain: float = 0.8) -> SimpleNamespace:
    """Two other packs' attention overrides for the one optimized_attention_override slot: `before`
    (set before our adapter; sharpens every query by `temperature`) and the one `chained_after(below)`
    returns (set after ours, calling the slot's holder; scales every output by `gain`). `calls` counts
    their runs; `reference(attention)` is the same pair applied to a plain attention function.
    Plain functions, not bound methods: core's clone() deep-copies model_options, and a deep-copied
    function stays itself where a bound method would carry a copied counter."""
    calls = {"before": 0, "after": 0}

    def before(func, *args, **kwargs):
        calls["before"] += 1
        return func(args[0] * temperature, *args[1:], **kwargs)

    def chained_after(below):
        def after(func, *args, **kwargs):
            calls["after"] += 1
            return gain * below(func, *args, **kwargs)
        return after

    def reference(attention):
        return lambda query, *args, **kwargs: gain * attention(query * temperature, *args, **kwargs)

    return SimpleNamespace(calls=calls, before=before, chained_after=chained_after, reference=reference)
