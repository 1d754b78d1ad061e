"""Flow-matching (rectified flow) math for FLUX.1 training, as small pure torch functions.

Conventions (all checked against diffusers in tests/test_flow.py):

- sigma in [0, 1] is the noise level: sigma = 0 is the clean latent x0, sigma = 1 is pure noise.
  The forward process is x_t = (1 - sigma) * x0 + sigma * noise and the model predicts the
  velocity v = dx_t/dsigma = noise - x0 (FlowMatchEulerDiscreteScheduler.scale_noise / .step).
- The transformer is fed ``timestep = sigma`` (a float in [0, 1], shape [B]).
  FluxTransformer2DModel multiplies timestep by 1000 itself before the sinusoidal embedding;
  FluxPipeline holds scheduler timesteps t = sigma * 1000 and passes ``t / 1000``, so both
  paths reach the embedding with sigma * 1000.
- Guidance is fed as the guidance scale itself (e.g. 1.0 or 3.5, shape [B], float32);
  the transformer multiplies it by 1000 like the timestep. Only guidance-distilled models
  (config.guidance_embeds, FLUX.1-dev) take it; pass None to FLUX.1-schnell.
- Latents: the VAE gives [B, C=16, H, W] with H, W = pixel size / 8. The transformer takes
  them "packed" into 2x2 patches, [B, (H/2)*(W/2), C*4], with one position id per patch
  (``latent_image_ids``, [(H/2)*(W/2), 3]: (0, row, col)) and all-zero text ids
  (``text_ids``, [seq_len, 3]). All ``height``/``width`` arguments here are LATENT sizes.
- Random draws take an optional torch.Generator. A CPU generator reproduces diffusers'
  training-script draws (which sample on the CPU); a generator on the training device avoids
  the host-to-device copy.

Nothing here calls .item() or loops over the batch in Python, so none of it syncs the host
with the accelerator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "pack_latents",
    "unpack_latents",
    "latent_image_ids",
    "text_ids",
    "image_seq_len_shift",
    "shift_sigmas",
    "shift_sigmas_static",
    "sample_sigmas",
    "noisy_latents",
    "velocity_target",
    "loss_weights",
    "flow_matching_loss",
    "latents_from_posterior",
    "guidance_vector",
    "SIGMA_SCHEMES",
    "LOSS_WEIGHT_SCHEMES",
]

SIGMA_SCHEMES = ("logit_normal", "uniform", "mode", "flux_shift")
LOSS_WEIGHT_SCHEMES = ("none", "sigma_sqrt", "cosmap")

# Grid step of float32 torch.rand on the CPU: the smallest positive value it returns. Used as
# the floor of "uniform" sigmas so that an exact 0 (which torch.rand can return) never reaches
# 1 / sigma in the shift or sigma ** -2 in the "sigma_sqrt" weighting.
_UNIFORM_FLOOR = 2.0**-24


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2:
        raise ValueError(f"latent height and width must be even for 2x2 packing, got {height}x{width}")


def pack_latents(latents: Tensor) -> Tensor:
    """Pack VAE latents into the 2x2-patch token sequence FLUX's transformer takes.

    Args:
        latents: [B, C, H, W] latents (H, W even; C = 16 for FLUX.1).

    Returns:
        [B, (H/2)*(W/2), C*4], token n = row * (W/2) + col, features ordered (c, dy, dx).
        Same as ``FluxPipeline._pack_latents(latents, B, C, H, W)``.
    """
    b, c, h, w = latents.shape
    _check_even(h, w)
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`.

    Args:
        packed: [B, (H/2)*(W/2), C*4] packed latents.
        height: latent height H (pixel height / 8), even.
        width: latent width W (pixel width / 8), even.

    Returns:
        [B, C, H, W]. Same as ``FluxPipeline._unpack_latents(packed, 8 * H, 8 * W, 8)``.
    """
    _check_even(height, width)
    b, n, d = packed.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"packed shape {tuple(packed.shape)} does not fit latent size {height}x{width}")
    patches = packed.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
    """Position ids of the packed image tokens for FLUX's 3-axis RoPE.

    Args:
        height: latent height H, even.
        width: latent width W, even.

    Returns:
        [(H/2)*(W/2), 3] with row n = (0, n // (W/2), n % (W/2)).
        Same as ``FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, device, dtype)``
        (ids are small integers, exact in bf16/fp16 up to 256 patches a side, i.e. 4096 px).
    """
    _check_even(height, width)
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


def text_ids(seq_len: int, device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
    """Position ids of the T5 text tokens: zeros [seq_len, 3], as ``FluxPipeline.encode_prompt`` builds."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


def image_seq_len_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift mu: linear in the packed token count.

    Args:
        image_seq_len: number of packed image tokens, (H/2)*(W/2) for latent H, W
            (256 at 256 px, 4096 at 1024 px).

    Returns:
        mu (base_shift at base_seq_len, max_shift at max_seq_len, extrapolated outside).
        Same as ``diffusers.pipelines.flux.pipeline_flux.calculate_shift``.
    """
    # Same operation order as diffusers so the float result is bit-identical.
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def shift_sigmas(sigmas: Tensor, mu: float, exponent: float = 1.0) -> Tensor:
    """FLUX's exponential time shift: exp(mu) / (exp(mu) + (1/sigma - 1) ** exponent).

    mu > 0 moves sigmas toward 1 (more noise), as needed for larger images. Maps 1 to 1;
    0 maps to 0 through 1/0 = inf.

    Args:
        sigmas: any shape, values in (0, 1].
        mu: shift, e.g. from :func:`image_seq_len_shift`.
        exponent: the "sigma" argument of diffusers' time_shift (1.0 in FLUX).

    Returns:
        Tensor shaped like ``sigmas``. Same as ``FlowMatchEulerDiscreteScheduler.time_shift(mu,
        exponent, sigmas)`` with time_shift_type="exponential", which set_timesteps(mu=...) applies.
    """
    e = math.exp(mu)
    return e / (e + (1 / sigmas - 1) ** exponent)


def shift_sigmas_static(sigmas: Tensor, shift: float) -> Tensor:
    """Static (SD3-style) shift: shift * sigma / (1 + (shift - 1) * sigma), as the scheduler
    applies when use_dynamic_shifting is False. Equals ``shift_sigmas(sigmas, log(shift))``.

    Args:
        sigmas: any shape, values in [0, 1].

    Returns:
        Tensor shaped like ``sigmas``.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    batch_size: int,
    scheme: str,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    mu: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw one training noise level per sample (continuous, not snapped to a 1000-step grid).

    Schemes:
        - "logit_normal": sigmoid(N(logit_mean, logit_std)) (SD3's default).
        - "uniform": U[0, 1), with an exact 0 raised to 2**-24 so that 1/sigma and sigma**-2
          stay finite downstream.
        - "mode": SD3's mode sampling, 1 - u - mode_scale * (cos(pi u / 2)^2 - 1 + u), u ~ U[0, 1).
        - "flux_shift": logit-normal draws passed through :func:`shift_sigmas` with ``mu``
          (requires mu; as ai-toolkit and SimpleTuner do), which moves mass toward noise for large
          images the way FLUX's sampler schedule does.

    The first three give exactly the u of
    ``diffusers.training_utils.compute_density_for_timestep_sampling`` for the same generator
    state (except the uniform floor). ``mu`` is used by "flux_shift" only.

    Args:
        batch_size: B.
        generator: draws happen on the generator's device and are then moved to ``device``
            (non-blocking; host-to-device copies from pageable memory are safe that way).
        device: where the result lives; defaults to the generator's device, else the CPU.

    Returns:
        [B] float32 sigmas in [0, 1] (in (0, 1) for practical purposes).
    """
    if scheme not in SIGMA_SCHEMES:
        raise ValueError(f"unknown sigma scheme {scheme!r}; expected one of {SIGMA_SCHEMES}")
    if scheme == "flux_shift" and mu is None:
        raise ValueError('sample_sigmas(scheme="flux_shift") needs mu (see image_seq_len_shift)')
    draw_device = generator.device if generator is not None else device
    size = (batch_size,)

    if scheme in ("logit_normal", "flux_shift"):
        u = torch.normal(
            logit_mean, logit_std, size=size, generator=generator, device=draw_device, dtype=torch.float32
        ).sigmoid_()
        if scheme == "flux_shift":
            u = shift_sigmas(u, mu)
    else:
        u = torch.rand(size, generator=generator, device=draw_device, dtype=torch.float32)
        if scheme == "mode":
            u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:
            u.clamp_(min=_UNIFORM_FLOOR)

    if device is not None:
        u = u.to(device, non_blocking=True)
    return u


def noisy_latents(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """Forward process x_t = (1 - sigma) * x0 + sigma * noise.

    Args:
        x0: [B, ...] clean latents (packed [B, N, D] or unpacked [B, C, H, W]).
        noise: like x0, standard normal.
        sigmas: [B] noise levels, broadcast over the trailing dims; cast to x0's dtype as
            diffusers' training script does.

    Returns:
        Tensor like x0. Same as ``FlowMatchEulerDiscreteScheduler.scale_noise(x0, sigma * 1000,
        noise)`` for sigmas on the scheduler's grid (up to rounding: computed as one lerp).
    """
    sigma = sigmas.to(dtype=x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    # lerp is one fused kernel with one output, where the textbook form makes three temporaries.
    return torch.lerp(x0, noise, sigma)


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Flow-matching regression target, the velocity dx_t/dsigma = noise - x0 (same shape as x0)."""
    return noise - x0


def loss_weights(scheme: str, sigmas: Tensor) -> Tensor:
    """Per-sample loss weights.

    Args:
        scheme: "none" (ones), "sigma_sqrt" (sigma ** -2) or "cosmap" (2 / (pi (1 - 2 sigma + 2 sigma^2))).
        sigmas: [B] noise levels.

    Returns:
        [B] float32. Same as ``diffusers.training_utils.compute_loss_weighting_for_sd3`` (which,
        unlike this, silently returns ones for an unknown scheme).
    """
    sigmas = sigmas.float()
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise ValueError(f"unknown loss weighting {scheme!r}; expected one of {LOSS_WEIGHT_SCHEMES}")


def flow_matching_loss(pred: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted MSE in float32: mean over each sample's elements, times its weight, mean over B.

    Args:
        pred: [B, ...] model output (any float dtype; cast to float32).
        target: [B, ...] same shape.
        weights: [B] or None (all ones).

    Returns:
        Scalar float32. Equals diffusers' train_dreambooth_lora_flux.py
        ``torch.mean((w.float() * (pred.float() - target.float()) ** 2).reshape(B, -1), 1).mean()``
        with w broadcast per sample (the weight is factored out of the per-sample mean).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    per_sample = (pred.float() - target.float()).square().reshape(pred.shape[0], -1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean()


def latents_from_posterior(
    mean: Tensor,
    std: Tensor,
    scaling_factor: float,
    shift_factor: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample the VAE posterior and normalise the result for the transformer.

    z = mean + std * eps, eps ~ N(0, 1) drawn in mean's dtype on the generator's device (then
    moved to mean's device without a host sync), so the same generator state gives the same eps as diffusers'
    ``DiagonalGaussianDistribution.sample(generator)``; returns (z - shift_factor) * scaling_factor,
    what diffusers' training script does with ``vae.encode(x).latent_dist.sample()``.

    Args:
        mean: [B, C, H, W] posterior mean (``latent_dist.mean``).
        std: same shape, posterior std (``latent_dist.std``, already from logvar clamped to [-30, 20]).
        scaling_factor, shift_factor: ``vae.config`` values (0.3611 and 0.1159 for FLUX.1).

    Returns:
        [B, C, H, W] float32 (computed in float32 whatever the posterior's dtype).
    """
    draw_device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=draw_device, dtype=mean.dtype)
    eps = eps.to(device=mean.device, dtype=torch.float32, non_blocking=True)  # no host sync; see sample_sigmas
    return normalize_latents(mean.float() + std.float() * eps, scaling_factor, shift_factor)


def normalize_latents(z: Tensor, scaling_factor: float, shift_factor: float) -> Tensor:
    """VAE latents as the transformer takes them: (z - shift_factor) * scaling_factor, in float32.

    Args:
        z: [B, C, H, W] latents (a posterior sample, or its mean for fixed inputs).
        scaling_factor, shift_factor: ``vae.config`` values (0.3611 and 0.1159 for FLUX.1).

    Returns:
        [B, C, H, W] float32. The inverse of FluxPipeline's ``latents / scaling_factor + shift_factor``
        before decoding.
    """
    return (z.float() - shift_factor) * scaling_factor


def guidance_vector(batch_size: int, scale: float, device: torch.device | str | None) -> Tensor:
    """[B] float32 full of ``scale``: the guidance input of guidance-distilled FLUX (the
    transformer multiplies it by 1000 itself). Train FLUX.1-dev LoRAs with scale 1.0."""
    return torch.full((batch_size,), scale, device=device, dtype=torch.float32)
