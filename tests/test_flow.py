"""fluxlora.flow against diffusers' own FLUX pipeline, scheduler and training utilities."""

import math
import types

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from fluxlora import flow
from fluxlora.flow import (
    flow_matching_loss,
    guidance_vector,
    image_seq_len_shift,
    latent_image_ids,
    latents_from_posterior,
    loss_weights,
    noisy_latents,
    normalize_latents,
    pack_latents,
    sample_sigmas,
    shift_sigmas,
    shift_sigmas_static,
    text_ids,
    unpack_latents,
    velocity_target,
)
from fluxlora.trainer import Trainer

# FLUX.1's scheduler config (tiny pipelines use the same one).
SCHEDULER_CONFIG = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- packing and position ids


@pytest.mark.parametrize("shape", [(2, 16, 8, 12), (1, 4, 2, 2), (3, 16, 14, 6)])
def test_pack_matches_pipeline(shape):
    latents = torch.randn(shape, generator=gen())
    expected = FluxPipeline._pack_latents(latents, *shape)
    packed = pack_latents(latents)
    assert packed.shape == (shape[0], (shape[2] // 2) * (shape[3] // 2), shape[1] * 4)
    assert torch.equal(packed, expected)


@pytest.mark.parametrize("shape", [(2, 16, 8, 12), (3, 16, 14, 6)])
def test_unpack_matches_pipeline_and_inverts_pack(shape):
    _, _, h, w = shape
    latents = torch.randn(shape, generator=gen())
    packed = pack_latents(latents)
    # The pipeline takes pixel sizes and the VAE's 8x factor; ours takes latent sizes.
    assert torch.equal(unpack_latents(packed, h, w), FluxPipeline._unpack_latents(packed, 8 * h, 8 * w, 8))
    assert torch.equal(unpack_latents(packed, h, w), latents)


def test_pack_accepts_non_contiguous_input():
    latents = torch.randn(2, 8, 12, 16, generator=gen()).permute(0, 3, 1, 2)  # [2, 16, 8, 12], strided
    assert torch.equal(pack_latents(latents), FluxPipeline._pack_latents(latents.contiguous(), 2, 16, 8, 12))


def test_pack_rejects_odd_and_mismatched_sizes():
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 7, 8))
    with pytest.raises(ValueError, match="does not fit"):
        unpack_latents(torch.zeros(1, 12, 64), 8, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw", [(8, 12), (128, 128), (64, 192)])
def test_latent_image_ids_match_pipeline(hw, dtype):
    h, w = hw
    ours = latent_image_ids(h, w, "cpu", dtype)
    expected = FluxPipeline._prepare_latent_image_ids(3, h // 2, w // 2, "cpu", dtype)
    assert ours.dtype == dtype and ours.shape == ((h // 2) * (w // 2), 3)
    assert torch.equal(ours, expected)


def test_latent_image_ids_name_the_patch_each_token_holds():
    latents = torch.randn(1, 16, 6, 10, generator=gen())
    packed = pack_latents(latents)
    for n, (zero, row, col) in enumerate(latent_image_ids(6, 10, "cpu", torch.float32).long().tolist()):
        patch = latents[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].reshape(-1)
        assert zero == 0 and torch.equal(packed[0, n], patch)


def test_text_ids_match_encode_prompt(tiny_pipe):
    embeds = torch.randn(1, 7, 32, generator=gen())
    _, _, expected = tiny_pipe.encode_prompt(
        prompt=None, prompt_2=None, prompt_embeds=embeds, pooled_prompt_embeds=torch.randn(1, 32), device="cpu"
    )
    ours = text_ids(7, "cpu", torch.float32)
    assert ours.dtype == expected.dtype and torch.equal(ours, expected)


# ---------------------------------------------------------------- shifts


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 6000])
def test_image_seq_len_shift_matches_calculate_shift(seq_len):
    assert image_seq_len_shift(seq_len) == calculate_shift(seq_len)
    args = (128, 2048, 0.3, 1.4)
    assert image_seq_len_shift(seq_len, *args) == calculate_shift(seq_len, *args)


def test_image_seq_len_shift_endpoints():
    assert image_seq_len_shift(256) == pytest.approx(0.5)
    assert image_seq_len_shift(4096) == pytest.approx(1.15)


@pytest.mark.parametrize("mu", [0.5, 1.15, 2.0])
@pytest.mark.parametrize("exponent", [1.0, 0.7])
def test_shift_sigmas_matches_scheduler_time_shift(mu, exponent):
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    sigmas = torch.linspace(1.0, 0.001, 57)
    expected = scheduler.time_shift(mu, exponent, sigmas)
    torch.testing.assert_close(shift_sigmas(sigmas, mu, exponent), expected, rtol=1e-6, atol=1e-7)


def test_shift_sigmas_matches_set_timesteps_with_mu():
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    steps = 28
    mu = image_seq_len_shift(4096)
    base = np.linspace(1.0, 1 / steps, steps)  # what FluxPipeline passes as sigmas
    scheduler.set_timesteps(sigmas=base, mu=mu)
    ours = shift_sigmas(torch.from_numpy(base).float(), mu)
    torch.testing.assert_close(ours, scheduler.sigmas[:-1], rtol=1e-6, atol=1e-6)  # the last is the appended 0
    torch.testing.assert_close(ours * 1000, scheduler.timesteps, rtol=1e-6, atol=1e-4)


def test_shift_sigmas_moves_toward_noise_and_keeps_ends():
    sigmas = torch.tensor([0.25, 0.5, 0.75, 1.0])
    shifted = shift_sigmas(sigmas, 1.15)
    assert (shifted[:3] > sigmas[:3]).all() and shifted[3] == 1.0
    assert shift_sigmas(torch.tensor([0.5]), 0.7).item() == pytest.approx(1 / (1 + math.exp(-0.7)))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_shift_sigmas_static_matches_scheduler(shift):
    # Without dynamic shifting the scheduler's training grid is the statically shifted one...
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas
    torch.testing.assert_close(shift_sigmas_static(unshifted, shift), scheduler.sigmas, rtol=1e-6, atol=1e-7)
    # ...and set_timesteps shifts the sigmas it is given the same way.
    base = np.linspace(1.0, 0.05, 10)
    scheduler.set_timesteps(sigmas=base)
    ours = shift_sigmas_static(torch.from_numpy(base).float(), shift)
    torch.testing.assert_close(ours, scheduler.sigmas[:-1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, shift_sigmas(torch.from_numpy(base).float(), math.log(shift)))


# ---------------------------------------------------------------- sigma sampling


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
@pytest.mark.parametrize("batch", [1, 4, 64])
def test_sample_sigmas_reproduce_diffusers_draws(scheme, batch):
    kwargs = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    expected = compute_density_for_timestep_sampling(scheme, batch, device="cpu", generator=gen(7), **kwargs)
    ours = sample_sigmas(batch, scheme, generator=gen(7), **kwargs)
    assert ours.shape == (batch,) and ours.dtype == torch.float32
    assert torch.equal(ours, expected)


def test_flux_shift_is_shifted_logit_normal():
    mu = image_seq_len_shift(1024)
    u = compute_density_for_timestep_sampling("logit_normal", 32, 0.0, 1.0, generator=gen(3))
    expected = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).time_shift(mu, 1.0, u)
    torch.testing.assert_close(sample_sigmas(32, "flux_shift", mu=mu, generator=gen(3)), expected)


def test_sample_sigmas_distributions():
    n = 40_001
    logit_normal = sample_sigmas(n, "logit_normal", generator=gen(1))
    assert logit_normal.median().item() == pytest.approx(0.5, abs=0.01)
    assert sample_sigmas(n, "logit_normal", logit_mean=1.0, generator=gen(1)).median().item() == pytest.approx(
        1 / (1 + math.exp(-1.0)), abs=0.01
    )
    # The shift is monotone, so the median maps: shift(0.5) = sigmoid(mu).
    shifted = sample_sigmas(n, "flux_shift", mu=1.15, generator=gen(1))
    assert shifted.median().item() == pytest.approx(1 / (1 + math.exp(-1.15)), abs=0.01)
    uniform = sample_sigmas(n, "uniform", generator=gen(1))
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    for s in (logit_normal, shifted, uniform, sample_sigmas(n, "mode", generator=gen(1))):
        assert ((s > 0) & (s <= 1)).all()


def test_sample_sigmas_are_reproducible_and_seed_dependent():
    a = sample_sigmas(8, "logit_normal", generator=gen(5))
    assert torch.equal(a, sample_sigmas(8, "logit_normal", generator=gen(5)))
    assert not torch.equal(a, sample_sigmas(8, "logit_normal", generator=gen(6)))


def test_uniform_sigma_never_exactly_zero(monkeypatch):
    # torch.rand can return exactly 0; force it to, and the shift and sigma_sqrt weights must stay finite.
    monkeypatch.setattr(flow.torch, "rand", lambda size, **kw: torch.zeros(size, dtype=kw.get("dtype")))
    sigmas = sample_sigmas(4, "uniform")
    assert (sigmas > 0).all()
    assert torch.isfinite(loss_weights("sigma_sqrt", sigmas)).all()
    assert (shift_sigmas(sigmas, 1.15) > 0).all()


def test_sample_sigmas_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mu"):
        sample_sigmas(2, "flux_shift")
    with pytest.raises(ValueError, match="unknown sigma scheme"):
        sample_sigmas(2, "logit-normal")


# ---------------------------------------------------------------- forward process and target


@pytest.mark.parametrize("shape", [(4, 16, 8, 8), (4, 16, 64)])
def test_noisy_latents_match_scale_noise(shape):
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)  # as diffusers' script's training copy
    idx = torch.tensor([0, 250, 731, 999])
    sigmas, timesteps = scheduler.sigmas[idx], scheduler.timesteps[idx]
    torch.testing.assert_close(sigmas * 1000, timesteps)
    x0, noise = torch.randn(shape, generator=gen(1)), torch.randn(shape, generator=gen(2))
    expected = scheduler.scale_noise(x0, timesteps, noise)
    torch.testing.assert_close(noisy_latents(x0, noise, sigmas), expected, rtol=1e-6, atol=1e-6)


def test_noisy_latents_ends_and_dtype():
    x0 = torch.randn(2, 16, 4, 4, generator=gen(1), dtype=torch.bfloat16)
    noise = torch.randn(2, 16, 4, 4, generator=gen(2), dtype=torch.bfloat16)
    out = noisy_latents(x0, noise, torch.tensor([0.0, 1.0]))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0], x0[0]) and torch.equal(out[1], noise[1])
    sigma = torch.tensor([0.3, 0.8])
    expected = (1 - sigma.view(-1, 1, 1, 1)) * x0.float() + sigma.view(-1, 1, 1, 1) * noise.float()
    torch.testing.assert_close(noisy_latents(x0, noise, sigma).float(), expected, rtol=1e-2, atol=2e-2)


def test_velocity_target_is_what_the_euler_step_follows():
    # scheduler.step moves x_t to x_t' along model_output; with the true velocity it must land
    # exactly on the forward process at sigma', so a sign error here fails.
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10), mu=0.8)
    x0, noise = torch.randn(1, 16, 64, generator=gen(1)), torch.randn(1, 16, 64, generator=gen(2))
    v = velocity_target(x0, noise)
    i = 3
    sigma, sigma_next = scheduler.sigmas[i : i + 1], scheduler.sigmas[i + 1 : i + 2]
    scheduler.set_begin_index(i)
    stepped = scheduler.step(v, scheduler.timesteps[i], noisy_latents(x0, noise, sigma)).prev_sample
    torch.testing.assert_close(stepped, noisy_latents(x0, noise, sigma_next), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_match_diffusers(scheme):
    sigmas = torch.rand(16, generator=gen()).clamp_min(0.01)
    ours = loss_weights(scheme, sigmas)
    assert ours.shape == (16,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, compute_loss_weighting_for_sd3(scheme, sigmas), rtol=1e-6, atol=0)


def test_loss_weights_reject_unknown_scheme():
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weights("logit_normal", torch.rand(2))


@pytest.mark.parametrize("scheme", ["none", "cosmap", "sigma_sqrt"])
def test_flow_matching_loss_matches_training_script(scheme):
    # As in train_dreambooth_lora_flux.py: bf16 prediction, weighting shaped [B, 1, 1, 1].
    pred = torch.randn(3, 16, 8, 8, generator=gen(1)).bfloat16().requires_grad_()
    target = torch.randn(3, 16, 8, 8, generator=gen(2))
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas.view(-1, 1, 1, 1))
    expected = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(3, -1), 1).mean()
    (expected_grad,) = torch.autograd.grad(expected, pred)

    loss = flow_matching_loss(pred, target, loss_weights(scheme, sigmas))
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(grad, expected_grad)


def test_flow_matching_loss_without_weights_is_plain_mse():
    pred, target = torch.randn(2, 16, 64, generator=gen(1)), torch.randn(2, 16, 64, generator=gen(2))
    torch.testing.assert_close(flow_matching_loss(pred, target), torch.nn.functional.mse_loss(pred, target))
    with pytest.raises(ValueError, match="shape"):
        flow_matching_loss(pred, target[:, :8])


# ---------------------------------------------------------------- VAE posterior


def test_latents_from_posterior_match_diagonal_gaussian_sample():
    mean = torch.randn(2, 16, 8, 8, generator=gen(1))
    logvar = torch.randn(2, 16, 8, 8, generator=gen(2)) * 3
    logvar[0, 0, 0, :2] = torch.tensor([-45.0, 25.0])  # outside the clamp to [-30, 20]
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    scale, shift = 0.3611, 0.1159
    expected = (dist.sample(generator=gen(9)) - shift) * scale

    # The caller passes latent_dist.std, which is already computed from the clamped logvar.
    ours = latents_from_posterior(dist.mean, dist.std, scale, shift, generator=gen(9))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    # And from std = sqrt(exp(logvar)) built by hand with the same clamp.
    std = (logvar.clamp(-30, 20) / 2).exp()
    torch.testing.assert_close(latents_from_posterior(mean, std, scale, shift, generator=gen(9)), expected)
    assert not torch.allclose(latents_from_posterior(mean, std, scale, shift, generator=gen(10)), expected)


def test_latents_from_posterior_bf16_posterior_gives_float32_near_diffusers():
    mean = torch.randn(1, 16, 4, 4, generator=gen(1)).bfloat16()
    logvar = torch.full_like(mean, -2.0)
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    expected = (dist.sample(generator=gen(4)).float() - 0.1159) * 0.3611
    ours = latents_from_posterior(dist.mean, dist.std, 0.3611, 0.1159, generator=gen(4))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=2e-2, atol=1e-2)


def test_normalize_latents_inverts_the_pipelines_scaling_before_decoding():
    z = torch.randn(1, 16, 4, 4, generator=gen(5))
    latents = normalize_latents(z, 0.3611, 0.1159)
    torch.testing.assert_close(latents / 0.3611 + 0.1159, z)  # FluxPipeline, before vae.decode
    assert torch.equal(latents_from_posterior(z, torch.zeros_like(z), 0.3611, 0.1159), latents)


# ---------------------------------------------------------------- transformer conventions


def test_guidance_vector_matches_pipeline():
    ours = guidance_vector(3, 3.5, "cpu")
    expected = torch.full([1], 3.5, dtype=torch.float32).expand(3)  # FluxPipeline.__call__
    assert ours.dtype == torch.float32 and torch.equal(ours, expected)


@pytest.fixture(scope="module")
def tiny_transformer():
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    ).eval()


@pytest.fixture(scope="module")
def tiny_pipe(tiny_transformer):
    # Only the transformer and scheduler: prompt embeddings go in precomputed, latents come out.
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_transformer,
    )


# neither FluxPipeline's default (3.5) nor the trainer's (1.0): a call that ignores the setting shows
GUIDANCE = 2.5


@pytest.fixture(scope="module")
def pipeline_calls(tiny_pipe):
    """Run FluxPipeline.__call__ for 3 steps on a 64x96 px image and record every transformer call."""
    latents = torch.randn(1, 16, 8, 12, generator=gen(1))  # latent H=8, W=12
    prompt_embeds = torch.randn(1, 7, 32, generator=gen(2))
    pooled = torch.randn(1, 32, generator=gen(3))
    calls = []
    hook = tiny_pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True
    )
    try:
        with torch.no_grad():
            tiny_pipe(
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled,
                height=64,
                width=96,
                num_inference_steps=3,
                guidance_scale=GUIDANCE,
                latents=pack_latents(latents),
                output_type="latent",
            )
    finally:
        hook.remove()
    return dict(latents=latents, prompt_embeds=prompt_embeds, pooled=pooled, calls=calls, steps=3)


def _trainer_call(transformer, data, hidden_states, sigma):
    """The transformer's output on the trainer's own call (`Trainer.flow_loss`: timestep, guidance, ids) at
    `sigma`, guidance GUIDANCE. x0 = noise = the latents in `hidden_states`, so that x_t is those latents at any
    sigma and only the conditioning moves."""
    latents = unpack_latents(hidden_states, 8, 12)
    trainer = types.SimpleNamespace(cfg=types.SimpleNamespace(guidance_scale=GUIDANCE), weight_dtype=torch.float32,
                                    guidance_embeds=True)
    outputs = []

    def model(**inputs):
        outputs.append(transformer(**inputs))
        return outputs[-1]

    with torch.no_grad():
        Trainer.flow_loss(trainer, model, latents, latents, torch.full((1,), sigma), data["prompt_embeds"],
                          data["pooled"])
    return outputs[0][0]


def _pipeline_sigmas(data):
    """Sigmas of FluxPipeline's schedule for this image, from our own functions."""
    steps = data["steps"]
    mu = image_seq_len_shift(data["calls"][0][0]["hidden_states"].shape[1])
    return shift_sigmas(torch.from_numpy(np.linspace(1.0, 1 / steps, steps)).float(), mu).tolist()


def test_pipeline_inputs_are_ours(pipeline_calls):
    kwargs = pipeline_calls["calls"][0][0]
    assert torch.equal(kwargs["hidden_states"], pack_latents(pipeline_calls["latents"]))
    assert torch.equal(kwargs["img_ids"], latent_image_ids(8, 12, "cpu", torch.float32))
    assert torch.equal(kwargs["txt_ids"], text_ids(7, "cpu", torch.float32))
    assert torch.equal(kwargs["guidance"], guidance_vector(1, GUIDANCE, "cpu"))
    timesteps = torch.cat([c[0]["timestep"] for c in pipeline_calls["calls"]])
    torch.testing.assert_close(timesteps, torch.tensor(_pipeline_sigmas(pipeline_calls)))


def test_trainer_call_equals_pipeline_denoising_steps(tiny_transformer, pipeline_calls):
    sigmas = _pipeline_sigmas(pipeline_calls)
    assert len(pipeline_calls["calls"]) == len(sigmas)
    for (kwargs, out), sigma in zip(pipeline_calls["calls"], sigmas):
        ours = _trainer_call(tiny_transformer, pipeline_calls, kwargs["hidden_states"], sigma)
        torch.testing.assert_close(ours, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrong", ["reversed", "times_1000"])
def test_wrong_timestep_convention_changes_the_output(tiny_transformer, pipeline_calls, wrong):
    # The equivalence above could pass vacuously if the timestep did not matter; it does.
    sigmas = _pipeline_sigmas(pipeline_calls)
    for (kwargs, out), sigma in zip(pipeline_calls["calls"], sigmas):
        bad = 1 - sigma if wrong == "reversed" else sigma * 1000
        ours = _trainer_call(tiny_transformer, pipeline_calls, kwargs["hidden_states"], bad)
        assert (ours - out).abs().max().item() > 1e-2


def test_transformer_embeds_sigma_times_1000(tiny_transformer, pipeline_calls):
    seen = []
    hook = tiny_transformer.time_text_embed.register_forward_pre_hook(lambda m, args: seen.append(args[:2]))
    try:
        _trainer_call(tiny_transformer, pipeline_calls, pipeline_calls["calls"][1][0]["hidden_states"], 0.25)
    finally:
        hook.remove()
    timestep, guidance = seen[0]
    torch.testing.assert_close(timestep, torch.tensor([250.0]))
    torch.testing.assert_close(guidance, torch.tensor([GUIDANCE * 1000]))


# ---------------------------------------------------------------- accelerator


@pytest.mark.gpu
def test_hot_path_runs_on_cuda_without_host_syncs():
    device = torch.device("cuda")
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(2, 16, 16, 16, device=device, dtype=torch.bfloat16, generator=g)
    noise = torch.randn(x0.shape, device=device, dtype=torch.bfloat16, generator=g)
    cpu_draws = sample_sigmas(2, "logit_normal", generator=gen(4))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sigmas = sample_sigmas(2, "flux_shift", mu=image_seq_len_shift(64), generator=g, device=device)
        moved = sample_sigmas(2, "logit_normal", generator=gen(4), device=device)
        packed_x0, packed_noise = pack_latents(x0), pack_latents(noise)
        xt = noisy_latents(packed_x0, packed_noise, sigmas)
        loss = flow_matching_loss(xt, velocity_target(packed_x0, packed_noise), loss_weights("cosmap", sigmas))
        ids = latent_image_ids(16, 16, device, torch.bfloat16)
        tids = text_ids(7, device, torch.bfloat16)
        guidance = guidance_vector(2, 1.0, device)
        latents = latents_from_posterior(x0, x0.abs(), 0.3611, 0.1159, generator=g)
        from_cpu_generator = latents_from_posterior(x0, x0.abs(), 0.3611, 0.1159, generator=gen(4))
        back = unpack_latents(xt, 16, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sigmas.device.type == moved.device.type == loss.device.type == ids.device.type == "cuda"
    assert tids.device.type == guidance.device.type == latents.device.type == back.device.type == "cuda"
    assert torch.equal(moved.cpu(), cpu_draws)  # a CPU generator gives the same draws on any device
    expected = latents_from_posterior(x0.cpu(), x0.abs().cpu(), 0.3611, 0.1159, generator=gen(4))
    torch.testing.assert_close(from_cpu_generator.cpu(), expected)
    assert torch.equal(back, noisy_latents(x0, noise, sigmas))
    assert torch.isfinite(loss).item() and latents.dtype == torch.float32
