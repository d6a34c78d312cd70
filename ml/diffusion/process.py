"""DDPM training objective and guided sampling, on diffusers' schedulers (not re-derived here)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ml.config import SchedulerName, TrainConfig
from ml.errors import Invalid
from ml.models.unet import NULL_LABEL

Sampler: TypeAlias = DDIMScheduler | DPMSolverMultistepScheduler


def noise_scheduler(cfg: TrainConfig) -> DDPMScheduler:
    """The forward process used in training (epsilon prediction, T steps)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


def sampler(name: SchedulerName, train_sched: DDPMScheduler, steps: int) -> Sampler:
    """DDIM (the seed's sampler), DPM-Solver++ or its stochastic (SDE) variant, built on the
    training schedule's betas.

    Pixel-space model: the DPM solvers keep the predicted x0 in the data range as DDIM's
    ``clip_sample`` does (thresholding with ``sample_max_value=1`` is a hard clip); without it
    every ODE solver lands far from the data (CLIP FD 40x DDIM-50's on the toy model). With the
    clip, the deterministic solvers settle on a worse result than DDIM whatever the number of
    steps, while the SDE variant at 20 steps beats DDIM-50 (bench/README.md, "Fewer steps").
    """
    if name == "ddim":
        s = DDIMScheduler.from_config(train_sched.config)
    elif name in ("dpm++", "dpm++sde"):
        s = DPMSolverMultistepScheduler.from_config(
            train_sched.config,
            solver_order=2,
            thresholding=True,
            sample_max_value=1.0,
            algorithm_type="dpmsolver++" if name == "dpm++" else "sde-dpmsolver++",
        )
    else:
        raise Invalid(f"unknown scheduler {name!r}; choose ddim, dpm++ or dpm++sde")
    s.set_timesteps(steps)
    return s


def min_snr_weight(sched: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weight for epsilon prediction (Hang et al. 2023): min(SNR_t, gamma) /
    SNR_t with SNR_t = alpha_bar_t / (1 - alpha_bar_t); 1 at noisy steps, smaller at clean ones."""
    abar: torch.Tensor = sched.alphas_cumprod.to(t.device)[t].float()
    snr = abar / (1.0 - abar)
    return snr.clamp(max=gamma) / snr


def diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    sched: DDPMScheduler,
    p_uncond: float,
    amp_dtype: torch.dtype | None = None,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between true and predicted noise at a uniform random t; labels dropped with p_uncond.
    With ``snr_gamma`` each image's MSE is weighted by :func:`min_snr_weight`.

    Randomness comes from the global RNG so that the trainer can seed each step (exact resume).
    """
    n = x0.shape[0]
    noise = torch.randn_like(x0)
    t = torch.randint(0, sched.config.num_train_timesteps, (n,), device=x0.device)
    xt = sched.add_noise(x0, noise, t)
    if p_uncond > 0:
        drop = torch.rand(n, device=x0.device) < p_uncond
        labels = torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)
    ctx = torch.autocast(x0.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with ctx:
        eps = model(xt, t, labels)
    if snr_gamma is None:
        return F.mse_loss(eps.float(), noise)
    per_image = F.mse_loss(eps.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    return (min_snr_weight(sched, t, snr_gamma) * per_image).mean()


@torch.inference_mode()
def guided_sample(
    model: torch.nn.Module,
    labels: torch.Tensor,
    noise: torch.Tensor,
    sched: Sampler,
    guidance: float,
    *,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    amp_dtype: torch.dtype | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``noise``; returns images in [-1, 1].

    Classifier-free guidance: eps = eps_null + w * (eps_cond - eps_null), with the conditional and
    unconditional halves in one batch (w = 1 skips the null pass, w = 0 is unconditional).
    """
    n = labels.shape[0]
    both = guidance not in (0.0, 1.0)
    lab = labels if guidance != 0.0 else torch.full_like(labels, NULL_LABEL)
    if both:
        lab = torch.cat([labels, torch.full_like(labels, NULL_LABEL)])
    x: torch.Tensor = noise * sched.init_noise_sigma
    ctx = torch.autocast(noise.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    # Stochastic steps (DDIM with eta > 0, SDE-DPM-Solver++) draw from ``generator``; a list
    # holds one generator per image, so an image does not depend on its batch.
    step_kw: dict[str, Any] = {"generator": generator}
    if isinstance(sched, DDIMScheduler):
        step_kw["eta"] = eta
    timesteps = sched.timesteps  # on the host: the scheduler indexes its tables with them
    # The model's copies go to the device once: a per-step host-to-device copy would make the
    # host wait for the GPU at every step.
    model_ts = timesteps.to(noise.device)[:, None].expand(-1, lab.shape[0])
    for i, t in enumerate(timesteps):
        xin = torch.cat([x, x]) if both else x
        xin = sched.scale_model_input(xin, t)
        with ctx:
            eps = model(xin, model_ts[i], lab).float()
        if both:
            cond, null = eps[:n], eps[n:]
            eps = null + guidance * (cond - null)
        x = sched.step(eps, t, x, **step_kw).prev_sample
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return x.clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 images (N,C,H,W)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> [-1, 1] floats (the model's data range)."""
    return x.float() / 127.5 - 1.0
