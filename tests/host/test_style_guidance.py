"""Style-loss guidance on the real host: its gradient against finite differences, its effect on the
discriminator's similarity, and that switching it off changes nothing."""
from __future__ import annotations

import math

import pytest
import torch

from stylekit.host.schedule import SigmaWindow
from stylekit.sampling.style_guidance import (EXACT, FAST, TAESD_DECODER, VAE_DECODER, StyleGuidance,
                                              StyleGuidanceError, StyleGuidanceSettings, apply_style_guidance,
                                              taesd_decoder, vae_decoder)
from stylekit.sampling.style_loss import official_mix
from stylekit.style_discriminator.files import load_style_discriminator, read_style_discriminator
from stylekit.tests.fixtures.registry import CSD_CHECKPOINT, SD_VAE
from stylekit.tests.host.sharing_support import encode, sample


@pytest.fixture
def csd(comfy_host):
    return load_style_discriminator(CSD_CHECKPOINT.filename)


def _style_image(seed: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear").movedim(1, -1)


def _fp64_hook(csd_path: str, decoder, reference_images: torch.Tensor, mode: str = FAST) -> StyleGuidance:
    """A hook computing in float64: a fresh discriminator and the decoder copy cast to fp64."""
    disc = read_style_discriminator(csd_path)
    with torch.inference_mode(False):
        disc.model.double()
        decoder.module.double()
    decoder.dtype = torch.float64
    reference = disc.style_embeddings(reference_images)
    settings = StyleGuidanceSettings(scale=1.0, mode=mode)
    return StyleGuidance(disc, decoder, reference, settings, SigmaWindow.always(), dtype=torch.float64)


def _directional_check(hook: StyleGuidance, base_model, sigma: float, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) * (1 + sigma)
    denoised = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    s = torch.tensor([sigma], dtype=torch.float64)
    grad = hook.gradient({"input": x, "denoised": denoised, "sigma": s, "model": base_model})
    eps = (x - denoised) / sigma

    def loss(xv):
        with torch.no_grad():
            return float(hook.loss(official_mix(xv - sigma * eps, xv, s), base_model))

    worst = 0.0
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        v = v / v.norm()
        h = 1e-6  # small: the decoders clamp their output, and a step must not cross a kink
        finite = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
        analytic = float((grad * v).sum())
        worst = max(worst, abs(finite - analytic) / max(abs(finite), 1e-12))
    return worst


def test_the_guidance_gradient_matches_finite_differences_through_taesd(sd15):
    hook = _fp64_hook(str(CSD_CHECKPOINT.linked_path()), taesd_decoder(sd15.model), _style_image())
    for sigma in (0.5, 4.0):
        assert _directional_check(hook, sd15.model.model, sigma) < 1e-3


def test_the_guidance_gradient_matches_finite_differences_through_the_full_vae(sd15):
    import nodes

    vae = nodes.VAELoader().load_vae(SD_VAE.filename)[0]
    hook = _fp64_hook(str(CSD_CHECKPOINT.linked_path()), vae_decoder(vae), _style_image())
    assert _directional_check(hook, sd15.model.model, 2.0) < 1e-3


def _similarity(csd, vae, latent, reference) -> torch.Tensor:
    images = vae.decode(latent)
    return (csd.style_embeddings(images) @ csd.style_embeddings(reference).T).flatten()


def test_guidance_raises_the_style_similarity_for_five_seeds(sd15, csd):
    reference = _style_image()
    positive, negative = encode(sd15.clip, "a house"), encode(sd15.clip, "")
    settings = StyleGuidanceSettings(scale=5000.0, decoder=VAE_DECODER, mode=FAST)
    guided = apply_style_guidance(sd15.model, csd, reference, settings, vae=sd15.vae)
    gains = []
    for seed in range(5):
        plain_latent = sample(sd15.model, positive, negative, batch=1, seed=seed, steps=4)
        guided_latent = sample(guided, positive, negative, batch=1, seed=seed, steps=4)
        gains.append(float(_similarity(csd, sd15.vae, guided_latent, reference)
                           - _similarity(csd, sd15.vae, plain_latent, reference)))
    assert all(gain > 0 for gain in gains), gains


@pytest.mark.parametrize("settings", [StyleGuidanceSettings(scale=0.0),
                                      StyleGuidanceSettings(scale=100.0, start_percent=1.0, end_percent=1.0)],
                         ids=["scale 0", "empty window"])
def test_guidance_off_gives_plain_sampling_bit_for_bit(sd15, csd, settings):
    positive, negative = encode(sd15.clip, "a house"), encode(sd15.clip, "")
    off = apply_style_guidance(sd15.model, csd, _style_image(), settings, vae=sd15.vae)
    assert not off.model_options.get("sampler_post_cfg_function")
    assert torch.equal(sample(off, positive, negative, batch=1, seed=4, steps=3),
                       sample(sd15.model, positive, negative, batch=1, seed=4, steps=3))


def test_every_k_steps_guides_the_steps_of_the_schedule_that_are_multiples_of_k(sd15, csd):
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(sd15.model.get_model_object("model_sampling"), "normal", 7)
    hook = StyleGuidance(csd, None, torch.zeros(1, 768), StyleGuidanceSettings(every=3), SigmaWindow.always())
    options = {"transformer_options": {"sample_sigmas": sigmas}}
    guided = [i for i in range(7) if hook.active(float(sigmas[i]), options)]
    assert guided == [0, 3, 6]


def test_guidance_runs_on_sdxl_with_taesdxl_and_changes_the_result(sdxl, csd):
    positive, negative = encode(sdxl.clip, "a house"), encode(sdxl.clip, "")
    guided = apply_style_guidance(sdxl.model, csd, _style_image(), StyleGuidanceSettings(scale=1000.0, every=2, mode=FAST))
    a = sample(guided, positive, negative, batch=1, seed=1, steps=2)
    b = sample(sdxl.model, positive, negative, batch=1, seed=1, steps=2)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_exact_mode_gradient_runs_through_the_model_and_differs_from_fast(sd15, csd):
    positive, negative = encode(sd15.clip, "a house"), encode(sd15.clip, "")
    settings = dict(scale=2000.0, decoder=VAE_DECODER)
    exact = apply_style_guidance(sd15.model, csd, _style_image(), StyleGuidanceSettings(mode=EXACT, **settings),
                                 vae=sd15.vae)
    fast = apply_style_guidance(sd15.model, csd, _style_image(), StyleGuidanceSettings(mode=FAST, **settings),
                                vae=sd15.vae)
    a = sample(exact, positive, negative, batch=1, seed=2, steps=2)
    b = sample(fast, positive, negative, batch=1, seed=2, steps=2)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_the_node_names_the_vae_input_when_the_vae_decoder_has_no_vae(sd15, csd):
    from stylekit.nodes.style_guidance import StyleKitStyleGuidance

    with pytest.raises(ValueError, match="StyleKit Style Guidance: input 'vae'"):
        StyleKitStyleGuidance.execute(sd15.model, csd, _style_image(), 100.0, 1, 0.0, 1.0, FAST, VAE_DECODER)
    out = StyleKitStyleGuidance.execute(sd15.model, csd, _style_image(), 100.0, 1, 0.0, 1.0, FAST, TAESD_DECODER)
    assert out.result[0] is not sd15.model and out.result[0].model_options["sampler_post_cfg_function"]
    assert not sd15.model.model_options.get("sampler_post_cfg_function")


def test_clones_share_one_hook_and_one_decoder_copy(sd15, csd):
    guided = apply_style_guidance(sd15.model, csd, _style_image(), StyleGuidanceSettings(decoder=VAE_DECODER),
                                  vae=sd15.vae)
    clones = [guided.clone() for _ in range(3)]
    hooks = {id(c.model_options["sampler_post_cfg_function"][0]) for c in clones}
    assert len(hooks) == 1
    assert math.isclose(clones[0].model_options["sampler_post_cfg_function"][0].settings.scale, 100.0)


def _live_graph_tensors() -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)


def test_no_autograd_graph_outlives_a_guided_step(sd15, csd):
    positive, negative = encode(sd15.clip, "a house"), encode(sd15.clip, "")
    guided = apply_style_guidance(sd15.model, csd, _style_image(), StyleGuidanceSettings(scale=500.0))
    live_during: list[int] = []
    latent = torch.zeros(1, 4, 8, 8)
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)
    before = _live_graph_tensors()
    comfy.sample.sample(guided, noise, 4, 5.0, "euler", "normal", positive, negative, latent, disable_pbar=True,
                        seed=0, callback=lambda step, x0, x, total: live_during.append(_live_graph_tensors()))
    assert live_during and max(live_during) == before and _live_graph_tensors() == before


def gradient_agreement(checkpoint, csd, steps: int = 10, seed: int = 2) -> list[tuple[float, float, float]]:
    """(sigma, cosine, norm ratio fast/exact) of the two modes' ∂L/∂x at every step of a real
    sampling run (euler, `normal` schedule, cfg 5, TAESD decoder), both at the same x."""
    decoder = taesd_decoder(checkpoint.model)
    reference = csd.style_embeddings(_style_image())
    hooks = {mode: StyleGuidance(csd, decoder, reference, StyleGuidanceSettings(scale=1.0, mode=mode),
                                 SigmaWindow.always()) for mode in (FAST, EXACT)}
    rows = []

    def probe(args):
        options = dict(args["model_options"])
        options["sampler_post_cfg_function"] = [f for f in options.get("sampler_post_cfg_function", [])
                                                if f is not probe]
        args = dict(args, model_options=options)
        fast, exact = (hooks[mode].gradient(args).double().flatten() for mode in (FAST, EXACT))
        cosine = float(fast @ exact / (fast.norm() * exact.norm()))
        rows.append((float(args["sigma"].flatten()[0]), cosine, float(fast.norm() / exact.norm())))
        return args["denoised"]

    m = checkpoint.model.clone()
    m.set_model_sampler_post_cfg_function(probe)
    positive, negative = encode(checkpoint.clip, "a house"), encode(checkpoint.clip, "")
    sample(m, positive, negative, batch=1, seed=seed, steps=steps)
    return rows


def test_fast_and_exact_gradients_compared_across_the_schedule(sd15, csd):
    # The README's table comes from this run (print with -s).
    rows = gradient_agreement(sd15, csd)
    print("\n| sigma | cosine(fast, exact) | norm fast / exact |\n|---|---|---|")
    for sigma, cosine, ratio in rows:
        print(f"| {sigma:.3f} | {cosine:.3f} | {ratio:.3g} |")
    assert len(rows) == 10 and all(math.isfinite(c) and math.isfinite(r) for _, c, r in rows)
    # The default mode's gradient agrees with exact: cosine >= 0.8 and norm within 2x at every sigma.
    fast_agrees = all(c >= 0.8 and 0.5 <= r <= 2.0 for _, c, r in rows)
    assert StyleGuidanceSettings().mode == EXACT or fast_agrees
