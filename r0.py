"""
R0: few-step text-to-image generation by regularized reward maximization, on Stable Diffusion 1.5.

Paper: Yihong Luo, Tianyang Hu, Weijian Luo, Kenji Kawaguchi, Jing Tang,
"Rewards Are Enough for Fast Photo-Realistic Text-to-image Generation", arXiv 2503.13070 (v1, March 2025).
v2 (NeurIPS 2025, renamed "Reward-Instruct") reads the same training as sampling the generator's parameters from a
reward-tilted distribution; its abstract names no change to the algorithm (README: "Not in this implementation").
The official repository holds no code; this file is a from-scratch reference. Each part below names
the part of the paper (v1) it implements, by section or figure; "paper:" marks what the paper says, "our choice:"
each decision it leaves open, with the reason, and "our reading:" where we interpret its text. (What we could read
of the paper is its abstract, figure captions and Table 1, not its body: section contents are our reconstruction.)

The method: take the pretrained SD1.5 UNet, run it as a K-step (K=4) generator from pure noise, decode, score the
images with several differentiable reward models, and push the reward gradients back into the UNet weights, while
regularizers (a weight anchor, LoRA, random eta) stop the generator from hacking the rewards. The paper's objective:
    L(theta) = - E_{c,z,eta} [ sum_i w_i r_i(decode(g_theta(z, c; eta)), c) ]  +  lambda ||theta - theta_0||^2
What is followed is not the gradient of this L: each reward's image gradient g_i = d r_i / d x is normalized per
sample before the weighted sum (paper Fig. 8). The trainable parameters phi (with LoRA, the default: the adapters'
A and B, theta = theta_0 + scaling * B @ A; with full fine-tuning: theta itself) move along
    E_{c,z,eta} [ sum_i w_i (g_i / ||g_i||) . dx/dphi ]  -  lambda d||theta - theta_0||^2 / dphi
(then gradient clipping and AdamW). No fixed objective of theta has this gradient (--normalize none, the ablation,
follows L's own); at each step, r0_step builds a *surrogate*,
    -(<stopgrad(g_pix), x> + <stopgrad(g_lat), x0_hat>) / B  +  lambda ||theta - theta_0||^2
(g_pix: the image rewards' composed gradient at the pixels x; g_lat: the cfg reward's, at the latents x0_hat), whose
negative gradient is exactly this direction and whose value means nothing: watch the logged rewards. No training
images, no diffusion loss, no distillation loss: only prompts.

Run it:
    python r0.py --tiny --prompts prompts.txt          # offline demo on CPU: tiny random models, colour reward
    python r0.py --prompts prompts.txt                 # SD1.5 + HPS v2.1 + CLIP score, one 24 GB GPU (LoRA, 512 px)
    python sample.py --run runs/r0 --prompt "a red fox in the snow"

File layout, in the paper's order: generator parameterization (3.2) -> rewards -> reward composition (Fig. 8) ->
regularizers (3.3) -> the training step (R0 and R0+, section 4). That is the whole method; everything after the line
"Plumbing" serves it (config, loading, the reward models' classes, checkpoints, the loop, the command line).
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import gzip
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------------------
# Generator parameterization (paper section 3.2)
#
# The pretrained epsilon-prediction UNet becomes a K-step generator g_theta(z, c; eta) from pure noise z ~ N(0,I).
# Step k at timestep t (SD1.5's DDPM schedule, alpha_bar_t = prod_{s<=t} (1 - beta_s), written a_t):
#       eps    = unet(x_t, t, c)
#       x0_hat = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)                 (DDIM paper eq. 9: the "predicted x0")
# then the DDIM-eta update to the next timestep s (DDIM eqs. 12 and 16):
#       sigma  = eta * sqrt((1 - a_s) / (1 - a_t)) * sqrt(1 - a_t / a_s)
#       x_s    = sqrt(a_s) * x0_hat + sqrt(1 - a_s - sigma^2) * eps + sigma * noise
# The last step has no next timestep: there a_s := 1, so sigma = 0 and the update returns x0_hat itself; the
# generator's output is the last step's x0_hat (for K = 6, 7 see the note in generate).
# paper (3.3): random eta sampling during training, a regularizer: the weights must serve a whole family of
# generation paths (Fig. 5 shows how eta changes a sampler's images from the same noise). our reading of its form:
# DDIM's eta (0: deterministic DDIM, 1: DDPM's ancestral step), drawn eta ~ U[0, 1] independently per step and per
# sample, and eta = 0 at inference. paper: no classifier-free guidance inside the generator (one UNet call per step).

NUM_TRAIN_TIMESTEPS = 1000  # SD1.5's DDPM chain length


def sd15_alphas_cumprod(beta_start=0.00085, beta_end=0.012, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """SD1.5's 'scaled_linear' DDPM schedule: betas linear in sqrt-space, alpha_bar_t = prod(1 - beta)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()  # (1000,), from ~1 down to ~0.0047


def few_step_timesteps(num_steps):
    """our choice: 'trailing' spacing, t_k = round(1000 - k * 1000/K) - 1, so K=4 -> [999, 749, 499, 249].
    The first step starts at t=999, the pure-noise end, which a few-step sampler needs (the 'leading' spacing of
    SD1.5's default scheduler would start at t=751 from pure noise and leave visible noise)."""
    assert 1 <= num_steps <= NUM_TRAIN_TIMESTEPS, num_steps
    step_ratio = NUM_TRAIN_TIMESTEPS / num_steps
    # Python's round() rounds half to even, like the np.round that diffusers uses: identical timesteps.
    return [round(NUM_TRAIN_TIMESTEPS - k * step_ratio) - 1 for k in range(num_steps)]


def x0_from_eps(x_t, eps, alpha_bar_t):
    """x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t): the clean latent the UNet's noise estimate implies."""
    return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5


def generate(unet, noise, text_emb, num_steps, alphas_cumprod, eta=0.0, random_eta=False, generator=None,
             last_step=None, grad_from_step=0):
    """The few-step generator g_theta. Returns its output latent (B,4,h,w) (SD latent scale): the final step's
    x0_hat (for K = 6, 7 after DDIM's last tiny step to t=0, see below), or with last_step set, that intermediate
    step's x0_hat (R0+).

    noise:          (B,4,h,w) x_T ~ N(0, I), the generator's input z
    text_emb:       (B,77,768) SD1.5 text-encoder hidden states (the condition c)
    eta:            DDIM stochasticity (0 = deterministic DDIM, inference default)
    random_eta:     training: draw eta ~ U[0,1] per step and per sample (overrides eta)
    generator:      torch.Generator for the eta and noise draws (seeded => reproducible)
    last_step:      0-based index of the step whose x0_hat is returned (R0+: a random intermediate step)
    grad_from_step: steps before this index run without gradient (R0+: cut the graph before the sampled step)
    """
    timesteps = few_step_timesteps(num_steps)
    last_step = num_steps - 1 if last_step is None else last_step
    stop_early = last_step < num_steps - 1  # R0+: return an intermediate step's x0_hat
    # our choice: move from t to s = t - 1000 // K, diffusers' DDIMScheduler rule (for K that divides 1000 this is
    # exactly the next trailing timestep; for K = 3, 6, 7 it lands 1 away from it), so that a trained UNet is a
    # drop-in for the standard DDIMScheduler at every K.
    jump = NUM_TRAIN_TIMESTEPS // num_steps
    alphas = alphas_cumprod.tolist()  # python floats (Models keeps this tensor on the CPU: no device sync)
    B = noise.shape[0]
    x = noise.float()  # (B,4,h,w)
    for i, t in enumerate(timesteps[: last_step + 1]):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= grad_from_step):
            a_t = alphas[t]
            t_batch = torch.full((B,), t, device=x.device, dtype=torch.long)
            # the UNet computes in bf16 on a GPU (bf16 weights, or fp32 ones under autocast); DDIM's arithmetic in fp32
            eps = unet(x.to(unet.dtype), t_batch, encoder_hidden_states=text_emb.to(unet.dtype)).sample.float()
            x0_hat = x0_from_eps(x, eps, a_t)  # (B,4,h,w)
            if stop_early and i == last_step:  # R0+: the rewards look at this intermediate x0_hat
                return x0_hat
            s = t - jump
            # the last step: s < 0 for K = 1..5 and 8, where a_s := 1 makes the update return x0_hat exactly; for
            # K = 6, 7 it lands on t = 0 (a_0 = 0.9991) and DDIM takes that last tiny step, so we take it too
            a_s = alphas[s] if s >= 0 else 1.0
            if random_eta:  # per sample, per step: shape (B,1,1,1)
                eta_i = torch.rand(B, generator=generator, device=x.device).view(B, 1, 1, 1)
            else:
                eta_i = torch.full((B, 1, 1, 1), float(eta), device=x.device)
            sigma = eta_i * ((1 - a_s) / (1 - a_t)) ** 0.5 * (1 - a_t / a_s) ** 0.5
            step_noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = a_s**0.5 * x0_hat + (1 - a_s - sigma**2).clamp(min=0) ** 0.5 * eps + sigma * step_noise
    return x  # the clean sample: (B,4,h,w) SD latents


def decode(vae, latents):
    """SD latents (B,4,h,w) -> pixels (B,3,8h,8w) in [0,1], the same arithmetic as StableDiffusionPipeline. The frozen
    VAE computes in its own dtype (own_dtype: Plumbing)."""
    with own_dtype(latents.device):
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()  # (B,3,H,W) ~[-1,1]
    # our choice: the pipeline's clamp to [0,1], so the rewards see the images a user gets; a pixel clamped here
    # passes no reward gradient (the generator learns nothing from pixels pushed beyond black or white)
    return (images / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts):
    """SD1.5's condition: (B,77,768) last hidden states of the frozen CLIP text encoder, no attention mask
    (exactly what StableDiffusionPipeline.encode_prompt computes). No gradient: the text encoder is frozen."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)  # (B,77)
    return text_encoder(ids)[0]  # (B,77,D)


# -----------------------------------------------------------------------------------------------------------
# Rewards
#
# paper: HPS v2.1, ImageReward and CLIP score, plus (from its Diff-Instruct++ lineage) an implicit
# classifier-free-guidance reward; quality rises as rewards are added, each checking the others' hacking (Figs. 9,
# 10). Here (the names of --rewards):
#   hps          HPS v2.1: open_clip ViT-H-14 with HPS_v2.1_compressed.pt; r = clip_score
#   clip         CLIP score: open_clip ViT-H-14 laion2b_s32b_b79k; r = clip_score
#   imagereward  ImageReward: BLIP ViT-L + BERT with cross-attention + an MLP head; r = imagereward_score
#   cfg          implicit CFG reward of the frozen base UNet, defined through its gradient (ImplicitCfgReward)
#   color        a toy for the offline demo and the tests (ColourReward, Plumbing); bright: a second toy (ablations)
# Every reward has this interface, all the method needs of it:
#   space: "pixels" (it reads x: (B,3,H,W) in [0,1]) or "latents" (it reads x0_hat: (B,4,h,w));
#   forward(x, prompts: list of B str, text_emb=None) -> (B,) scores that autograd can differentiate in x (no PIL,
#       no no_grad on the image path; x cast to the frozen model's dtype, the model run under own_dtype, as sample.py
#       calls it outside autocast); or, for a reward with no cheap value, gradient(x, prompts, text_emb, generator)
#       -> (logged values (B,), ascent direction shaped like x), as cfg does (its log_as names the logged value).
# Reward models are frozen; text features never carry gradient. Their classes (caches, memory, layout) and loaders
# are under Plumbing ("Reward models": adding one takes three steps, its class, its loader and a REWARDS line).

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalization, used by ViT-H-14, HPS v2.1, ImageReward
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(pixels, size=224):
    """What every image reward sees: a differentiable twin of open_clip's evaluation transform (Resize(shorter side,
    bicubic) -> CenterCrop -> Normalize), in torch ops so the reward gradient flows back to the pixels. (HPSv2's own
    evaluation resizes the longer side and pads: the same on SD's square images.)
    pixels: (B,3,H,W) in [0,1]  ->  (B,3,size,size) CLIP-normalized."""
    assert pixels.dim() == 4 and pixels.shape[1] == 3, f"expected (B,3,H,W) pixels, got {tuple(pixels.shape)}"
    # The classic reward bug is feeding [-1,1] images, or rescaling twice: refuse anything outside [0,1].
    assert pixels.min() >= 0 and pixels.max() <= 1, "clip_preprocess expects pixels in [0,1]"
    H, W = pixels.shape[-2:]
    short, long = min(H, W), max(H, W)
    new_long = int(size * long / short)  # torchvision's rule for Resize(int): the longer side is truncated
    new_hw = (size, new_long) if H <= W else (new_long, size)
    x = F.interpolate(pixels, size=new_hw, mode="bicubic", antialias=True, align_corners=False)
    # our choice: clamp the bicubic overshoot at sharp edges, as open_clip's PIL transform does (it stores uint8), so
    # that scores agree with how images are scored at evaluation. HPSv2's evaluation and ImageReward's ReFL resize
    # float tensors unclamped; here an overshooting pixel of the resized image passes no gradient (edges only).
    x = x.clamp(0, 1)
    top = int(round((new_hw[0] - size) / 2.0))  # torchvision's center_crop offsets
    left = int(round((new_hw[1] - size) / 2.0))
    x = x[:, :, top : top + size, left : left + size]  # (B,3,size,size) in [0,1]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std  # (B,3,224,224) CLIP-normalized


def clip_score(clip_model, pixels, text_features):
    """hps and clip: r(x, c) = cos(f_img(clip_preprocess(x)), f_txt(c)), without the logit scale (the paper's tables
    report 100 x this cosine). clip_model: an open_clip CLIP (frozen); text_features: (B,D), unit norm, no gradient.
    Returns (B,) in [-1,1]."""
    image = clip_preprocess(pixels, clip_model.visual.image_size[0])  # (B,3,224,224)
    with own_dtype(pixels.device):  # the frozen tower computes in its own dtype (bf16 on a GPU)
        img_feat = clip_model.encode_image(image.to(next(clip_model.parameters()).dtype)).float()  # (B,D)
    return (F.normalize(img_feat, dim=-1) * text_features).sum(-1)  # (B,), normalized in fp32 as HPSv2 does


IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # the raw head's statistics (its own)


def imagereward_score(model, pixels, input_ids, attention_mask):
    """imagereward: ImageReward (Xu et al., NeurIPS 2023), a BLIP model fine-tuned on human preference rankings:
        image_embeds = ViT-L/16(clip_preprocess(x))                                   (B,197,1024)
        h            = BERT(prompt tokens, cross-attending to image_embeds)[:, 0]      (B,768), the [CLS] position
        r(x, c)      = (MLP(h) - mean) / std      MLP 768-1024-128-64-16-1, no activations; about N(0,1) on its data
    model: ImageRewardReward (Plumbing: transformers' BLIP towers and the head); input_ids, attention_mask: (B,35)."""
    image = clip_preprocess(pixels, 224).to(model.vision.dtype)  # (B,3,224,224)
    with own_dtype(pixels.device):  # the frozen towers compute in their own dtype
        image_embeds = model.vision(pixel_values=image).last_hidden_state  # (B,197,D), final LayerNorm included
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        h = model.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                       encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state[:, 0]  # (B,768)
        raw = model.mlp(h.float()).squeeze(-1)  # (B,) the head in fp32, as ImageReward (.float() on this feature)
    return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


class ImplicitCfgReward:
    """cfg: the implicit classifier-free-guidance reward of the frozen base model (Diff-Instruct++ lineage).
    Its gradient at the generated latent x0_hat: noise x0_hat to a random level t,
        x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) n,
    and ascend log p(c | x_t). By Bayes, grad_{x_t} log p(c|x_t) = grad log p(x_t|c) - grad log p(x_t)
    = -(eps_c - eps_u) / sqrt(1 - a_t), and the chain rule through x_t adds dx_t/dx0_hat = sqrt(a_t), so
        d log p(c | x_t) / d x0_hat = sqrt(a_t) / sqrt(1 - a_t) * (eps_u - eps_c).
    (The score of a noised sample is -eps / sqrt(1 - a_t), conditional or not.) Per-sample normalization cancels
    the factor, so only the distribution of t matters (our choice: t ~ U{20..980}; the unconditional c is the empty
    prompt, as in SD1.5's own guidance); without it (--normalize none) the factor weights each sample as L does.
    The reward has no cheap value: we log the guidance gap ||eps_c - eps_u||^2 per element, as 'cfg_gap'."""

    space = "latents"
    log_as = "cfg_gap"  # the logged number is the guidance gap, not a reward value

    def __init__(self, base_eps, uncond_emb, alphas_cumprod, t_min=20, t_max=980):
        self.base_eps, self.uncond_emb, self.alphas_cumprod = base_eps, uncond_emb, alphas_cumprod
        self.t_min, self.t_max = t_min, t_max

    @torch.no_grad()
    def gradient(self, latents, prompts, text_emb, generator=None):
        B = latents.shape[0]
        t = torch.randint(self.t_min, self.t_max + 1, (B,), generator=generator, device=latents.device)
        a_t = self.alphas_cumprod[t].view(B, 1, 1, 1)  # alphas_cumprod on the latents' device
        n = torch.randn(latents.shape, generator=generator, device=latents.device)
        x_t = a_t.sqrt() * latents + (1 - a_t).sqrt() * n  # (B,4,h,w)
        # one batched call for conditional and unconditional noise estimates, like a CFG pipeline
        emb = torch.cat([text_emb, self.uncond_emb.expand(B, -1, -1).to(text_emb.dtype)])  # (2B,77,D)
        eps_c, eps_u = self.base_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), emb).float().chunk(2)
        gap = ((eps_c - eps_u) ** 2).flatten(1).mean(1)  # (B,) logged, not optimized directly
        return gap, (a_t / (1 - a_t)).sqrt() * (eps_u - eps_c)  # (B,), (B,4,h,w) d log p(c|x_t) / d x0_hat


@contextlib.contextmanager
def theta_0(unet, frozen_unet):
    """The base model theta_0 as a UNet: the frozen copy (full fine-tuning), or the same UNet with its LoRA adapters
    switched off (theta = theta_0 + delta W: with delta W off, it *is* the base model; no second copy needed)."""
    if frozen_unet is not None:
        yield frozen_unet
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def make_base_eps(unet, frozen_unet):
    """eps of the frozen base model theta_0, for the cfg reward: (N,4,h,w), (N,), (N,77,D) -> (N,4,h,w)."""
    def base_eps(x, t, emb):
        with theta_0(unet, frozen_unet) as base:
            return base(x, t, encoder_hidden_states=emb).sample
    return base_eps


# -----------------------------------------------------------------------------------------------------------
# Reward composition (paper Fig. 8: normalized gradients beat raw ones)
#
#   x   = decode(x0_hat)                                 (B,3,H,W) in [0,1]
#   g_i = d r_i(x, c) / d x                              a backward through reward model i only, not the generator
#   g   = sum_i w_i * g_i / (||g_i||_per-sample + eps)   reward i pulls each sample with strength w_i (0 if g_i = 0)
#   surrogate = - sum(stopgrad(g) * x) / B               d surrogate / d theta = - g . dx/dtheta / B
# our reading: the norm is taken per sample (each reward's term has norm w_i in each image), not over the batch, so
# one image with a huge gradient cannot drown the others. The image rewards are normalized in pixel space and cfg in
# latent space (where its gradient lives): each has norm w_i in its own space, so cfg=1,hps=1 is not an equal pull
# on theta; set the weights with that in mind (the decoder's Jacobian scales the pixel-space term).

def normalize_gradient(g, per="sample", eps=1e-8):
    """g / ||g|| for each sample separately: (B,...) -> (B,...), each sample of unit L2 norm (or 0 if g was 0; our
    choice: eps = 1e-8 only guards that division). per="batch" (an ablation): one norm for the whole batch."""
    norm = g.flatten(1).norm(dim=1) if per == "sample" else g.norm().expand(len(g))  # (B,)
    return g / (norm.view(-1, *([1] * (g.dim() - 1))) + eps)


def reward_gradient(reward, x, prompts, text_emb, generator=None):
    """(scores (B,), d score / d x (same shape as x)) for one reward, backpropagating through the reward model
    only: x is detached, so the generator's graph is untouched here."""
    if hasattr(reward, "gradient"):  # a reward defined through its gradient (cfg)
        return reward.gradient(x.detach(), prompts, text_emb, generator)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = reward(x, prompts, text_emb)  # (B,)
        (grad,) = torch.autograd.grad(scores.sum(), x)
    return scores.detach(), grad


def composed_reward_gradients(rewards, weights, pixels, latents, prompts, text_emb, generator=None,
                              normalize="sample"):
    """sum_i w_i g_i / ||g_i|| in pixel space (image rewards) and in latent space (cfg); plus the logged values.
    The ablations of Fig. 8: normalize="none" sums the raw w_i g_i, "batch" takes one norm per reward per batch."""
    grads = {"pixels": torch.zeros_like(pixels), "latents": torch.zeros_like(latents)}
    scores = {}
    for name, reward in rewards.items():
        x = pixels if reward.space == "pixels" else latents
        score, grad = reward_gradient(reward, x, prompts, text_emb, generator)
        grad = grad.float() if normalize == "none" else normalize_gradient(grad.float(), normalize)
        grads[reward.space] += weights[name] * grad
        scores[getattr(reward, "log_as", name)] = score  # (B,) raw, for logging
    return grads["pixels"], grads["latents"], scores


# -----------------------------------------------------------------------------------------------------------
# Regularizers (paper section 3.3; Fig. 11: without the weight regularization, reward hacking)
#   1. weight regularization  lambda * ||theta - theta_0||^2   (keeps the generator near the pretrained model)
#   2. LoRA: a low-rank update is itself a constraint (and the way to fit a 24 GB GPU)
#   3. random eta sampling: in generate(random_eta=True)
#   4. per-reward gradient normalization + several complementary rewards: in the reward composition
# Plus our engineering choices: gradient clipping at 1.0 and AdamW with weight_decay 0. The anchor to theta_0
# replaces decay: in full fine-tuning decay would pull theta toward 0, away from the pretrained model; under LoRA it
# would pull A and B toward 0, i.e. toward theta_0 too, a second anchor whose strength lambda would not set.
# No KL term, no diffusion loss, no distillation loss.

def make_trainable(unet, cfg, device, frozen_dtype):
    """What theta is, and where theta_0 lives. Returns the frozen copy theta_0 (full fine-tuning) or None (LoRA).
    (SD1.5's UNet has no dropout or batch norm, so its train/eval mode changes nothing.)"""
    if cfg.lora_rank > 0:
        # LoRA: theta = theta_0 + delta W, delta W = scaling * B @ A on each adapted layer; theta_0 is the frozen
        # base weights themselves (bf16 on a GPU), no copy needed. our choice, as diffusers' own SD LoRA training:
        # adapters on the attention projections (to_q, to_k, to_v, to_out), alpha = rank (scaling 1), A Gaussian
        # and B zero at init (so theta = theta_0 at step 0), adapter weights in fp32 (trained under autocast).
        from peft import LoraConfig
        torch.manual_seed(cfg.seed)  # the adapters' random init depends on the seed alone
        cast(unet.requires_grad_(False), device, frozen_dtype)  # cast = module.to (Plumbing)
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        return None
    # Full fine-tuning: every UNet weight in fp32, and a frozen fp32 copy theta_0 for the anchor (fp32 so that
    # ||theta - theta_0|| is exactly 0 at the start; the copy also serves as the base model of the cfg reward).
    unet.to(device, torch.float32)
    return copy.deepcopy(unet).requires_grad_(False).eval()


def trainable_parameters(unet):
    """What the optimizer updates: the LoRA adapters, or every UNet weight in full fine-tuning."""
    return [p for p in unet.parameters() if p.requires_grad]


def lora_layers(unet):
    """The LoRA-adapted layers of a peft-injected UNet: [(lora_A, lora_B, scaling)] for the active adapter."""
    from peft.tuners.lora import LoraLayer
    layers = []
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                if name in module.lora_A:
                    layers.append((module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]))
    return layers


def weight_regularization(unet, frozen_unet):
    """||theta - theta_0||^2.
    Full fine-tuning: sum over all UNet parameters against the frozen fp32 copy theta_0.
    LoRA: theta - theta_0 = delta W = scaling * B @ A per adapted layer, so the same quantity is
          sum_layers ||scaling * B @ A||_F^2 (the frozen base weights cancel out).
    our choice: lambda = 1e-2 (--weight-reg); the paper gives no value, and this one is untuned (README). Because
    the reward gradient has a fixed per-sample scale in pixel (or latent) space, lambda sets how large the update may
    grow before the anchor pulls back as hard as the rewards push. 'reg' and every reward are logged: raise lambda if
    rewards keep rising while the samples degrade (hacking), lower it if the rewards stall while 'reg' keeps growing.
    Neither sum saves an extra weight-sized tensor for the backward."""
    if frozen_unet is None:  # LoRA
        total = 0.0
        for A, B, scaling in lora_layers(unet):  # A (r,in), B (out,r)
            # ||B @ A||_F^2 = trace(A^T B^T B A) = sum((B^T B) * (A A^T)): two (r,r) matrices instead of the
            # (out,in) delta W of every adapted layer in the graph
            A, B = A.float(), B.float()
            total = total + scaling ** 2 * ((B.T @ B) * (A @ A.T)).sum()
        return torch.as_tensor(total, dtype=torch.float32)
    # mse_loss(sum) is ||p - p0||^2 with only p and p0 themselves saved for the backward; (p - p0).pow(2).sum()
    # would save the difference, a second copy of every weight, held until the backward
    return sum(F.mse_loss(p, p0, reduction="sum") for p, p0 in zip(unet.parameters(), frozen_unet.parameters()))


@dataclass
class Models:
    """Everything R0 holds. paper: only the generator's weights theta move; the VAE, the text encoder and every
    reward model are frozen (they pass gradients through, never store any)."""
    tokenizer: object
    text_encoder: object        # frozen
    vae: object                 # frozen
    unet: object                # the generator g_theta (trainable: all weights, or LoRA adapters)
    frozen_unet: object         # theta_0: a frozen copy for full fine-tuning; None with LoRA (the adapters switch off)
    scheduler_config: dict      # the base model's scheduler config (for the saved pipeline)
    alphas_cumprod: torch.Tensor  # (1000,) on the CPU: generate() reads it as Python floats
    rewards: dict               # name -> reward (frozen)
    reward_weights: dict        # name -> w_i
    device: str


def set_up_r0(tokenizer, text_encoder, vae, unet, scheduler_config, cfg):
    """The pretrained SD1.5 parts -> Models: frozen parts frozen (our choice: in bf16 on a GPU, as the trainable UNet
    computes under autocast; they only run forward and pass gradients through), theta and theta_0 set up, and the
    rewards of --rewards built."""
    frozen_dtype = torch.float32 if cfg.precision == "fp32" else torch.bfloat16
    alphas_cumprod = sd15_alphas_cumprod(scheduler_config["beta_start"], scheduler_config["beta_end"])
    for module in (text_encoder, vae):  # requires_grad_(False): the backward goes *through* the VAE decoder to the
        cast(module.requires_grad_(False).eval(), cfg.device, frozen_dtype)  # generator, storing nothing for it
    frozen_unet = make_trainable(unet, cfg, cfg.device, frozen_dtype)  # theta (LoRA or all weights) and theta_0
    rewards = {}
    for name in cfg.rewards:  # each loaded once, frozen, kept on the device (REWARDS: Plumbing)
        if name == "cfg":  # the base model theta_0 itself, unconditional = the empty prompt
            uncond = encode_prompts(tokenizer, text_encoder, [""])  # (1,77,D)
            rewards[name] = ImplicitCfgReward(make_base_eps(unet, frozen_unet), uncond, alphas_cumprod.to(cfg.device))
        else:
            rewards[name] = REWARDS[name].load(cfg.tiny, cfg.device, frozen_dtype)
    return Models(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, frozen_unet=frozen_unet,
                  scheduler_config=scheduler_config, alphas_cumprod=alphas_cumprod, rewards=rewards,
                  reward_weights=dict(cfg.rewards), device=cfg.device)


# -----------------------------------------------------------------------------------------------------------
# The training step: R0, and R0+ (paper section 4; Fig. 12: R0+ converges faster). One micro-batch. (The paper's
# R0+ also adds a high-resolution guidance loss, Fig. 14, whose definition we could not read: not here, README.)
#
#    z ~ N(0,I), c --> [UNet step 1] --> ... --> [UNet step K] --> x0_hat --> VAE decode --> x (pixels in [0,1])
#                      \______ R0+: steps before k run without gradient; x0_hat is taken at step k ______/
#
#    x --> r_hps(x), r_clip(x), ...   x0_hat --> cfg           each: a backward through that reward model only
#          g_hps,    g_clip, ...                 g_cfg          (the image gradient, detached from the generator)
#    g = sum_i w_i g_i / ||g_i||  (per sample, in pixel or latent space)
#    surrogate = -(<stopgrad(g_pix), x> + <stopgrad(g_lat), x0_hat>) / B  +  lambda ||theta - theta_0||^2
#    ONE backward of that through the decoder and the UNet steps (whatever the number of rewards)
#
# One optimizer step, in call order (optimizer_step, Plumbing; a run's first step retries at half the micro-batch
# if the GPU runs out of memory):
#    for each of --grad-accum micro-batches:  prompts = next B prompts  ->  loss = r0_step(prompts): encode_prompts
#       -> generate -> decode -> composed_reward_gradients -> surrogate + lambda reg  ->  (loss / grad_accum).backward()
#    -> clip the gradient to global norm 1.0 (our choice)  ->  AdamW step (make_optimizer)  ->  zero the gradients
# (From the first micro-batch whose loss or rewards are not finite, none is backpropagated and the update is
# skipped, as on a non-finite gradient; several GPUs average their gradients before clipping: Plumbing.)
# The hyperparameters read as cfg.* and their defaults (each labelled ours or the paper's): OPTIONS, under Plumbing.

def r0_step(m, prompts, cfg, generator):
    """One micro-batch of R0 (or R0+). Returns (loss, stats); the caller calls loss.backward().
    m: Models, prompts: list of B strings, generator: this run's random stream (noise, eta, R0+'s k, cfg's t)."""
    B, K = len(prompts), cfg.steps
    h = cfg.resolution // 8
    text_emb = encode_prompts(m.tokenizer, m.text_encoder, prompts)  # (B,77,768), no grad
    noise = torch.randn((B, 4, h, h), generator=generator, device=m.device)  # z ~ N(0,I)
    if cfg.r0_plus:
        # R0+ (paper 4): supervise x0_hat at a random step k; steps before k run without gradient, so the
        # backward graph holds one UNet call instead of K: faster, less memory, and every step gets direct signal.
        # our reading: k drawn uniformly from all K steps, one k per micro-batch, the steps before k sampled with
        # random eta too (they are the same generator). (k = K-1 rewards the same x0_hat as plain R0, but its
        # gradient flows through the last UNet call only.)
        k = int(torch.randint(0, K, (1,), generator=generator, device=m.device))
        last_step, grad_from_step = k, k
    else:
        k, last_step, grad_from_step = None, K - 1, 0  # R0: backprop through all K steps
    with autocast(m.device, cfg.precision):  # bf16 on a GPU (Plumbing: autocast)
        # (--no-random-eta: eta = 0, the ablation of 3.3's regularizer)
        x0_hat = generate(m.unet, noise, text_emb, K, m.alphas_cumprod, random_eta=cfg.random_eta, generator=generator,
                          last_step=last_step, grad_from_step=grad_from_step)  # (B,4,h,w), in the graph
        pixels = decode(m.vae, x0_hat)  # (B,3,H,W) in [0,1], in the graph
        g_pix, g_lat, scores = composed_reward_gradients(m.rewards, m.reward_weights, pixels, x0_hat, prompts,
                                                         text_emb, generator, cfg.normalize)
    # The surrogate whose gradient w.r.t. theta is -(normalized, weighted reward gradient) . d(x)/d(theta).
    # Its *value* means nothing (it is -g.x); watch the logged rewards, not the loss. our choice: the mean over
    # the batch (1/B), so that the step's size does not grow with the batch.
    surrogate = -((g_pix * pixels).sum() + (g_lat * x0_hat).sum()) / B
    reg = weight_regularization(m.unet, m.frozen_unet)
    loss = surrogate + cfg.weight_reg * reg
    stats = {name: s.float().mean().item() for name, s in scores.items()}
    stats.update(reg=reg.item(), surrogate=surrogate.item(), **({"k": k} if cfg.r0_plus else {}))
    return loss, stats


def make_optimizer(params, cfg):
    # our choice: AdamW without weight decay (see Regularizers); on a GPU the fused kernel updates every tensor in a
    # few launches
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=cfg.device.startswith("cuda"))


# ===========================================================================================================
# Plumbing. The method is complete above; everything below serves it: the config, the reward models' classes and
# loaders, precision, loading, prompts and images, checkpoints, the training loop and the command line.
# ===========================================================================================================
# -----------------------------------------------------------------------------------------------------------
# Config: name -> (default, what it is), each a flag (output_dir: --output-dir); `python r0.py --help` prints it. Every
# default is for a real SD1.5 run on one 24 GB GPU (README); --tiny swaps in TINY_PRESET; typed flags override both.

OPTIONS = dict(
    # our choice: vanilla SD1.5 (the paper's Table 1 fine-tunes Realistic Vision, an SD1.5 fine-tune)
    model=("stable-diffusion-v1-5/stable-diffusion-v1-5", "hub id or local diffusers folder of an SD1.5 model"),
    tiny=(False, "tiny SD1.5-shaped models built in code (a miniature pretraining): offline, CPU (the demo)"),
    prompts=(None, "text file, one prompt a line ('#' comments and blank lines skipped)"),
    output_dir=("runs/r0", "the run folder: everything a run writes goes here"),
    # --- generator (paper 3.2, 4) ---
    steps=(4, "K, the number of generator steps, 1..8 (paper: 4)"),
    resolution=(512, "image side in pixels, a multiple of 8 (SD1.5 was trained at 512)"),
    r0_plus=(False, "R0+ (paper 4): rewards on x0_hat of a random intermediate step"),
    # --- rewards --- our choice: HPS v2.1 and CLIP score at equal weight (relative pulls: gradients are normalized per
    # reward); CLIP keeps text alignment while HPS pushes preference, each checking the other's hacking.
    rewards=("hps=1.0,clip=1.0", "name=weight list from {rewards}; a name alone means weight 1.0"),
    # --- regularizers (paper 3.3) --- our choice: LoRA 64 fits 24 GB and low rank is itself a regularizer; full
    # fine-tuning needs a larger GPU (README). lambda: see weight_regularization(). Clipping: standard in fine-tuning.
    lora_rank=(64, "LoRA rank; 0 = full fine-tuning"),
    weight_reg=(1e-2, "lambda of lambda*||theta - theta_0||^2"),
    grad_clip=(1.0, "max global gradient norm"),
    random_eta=(True, "random eta in training (paper 3.3); --no-random-eta: eta = 0 (an ablation)"),
    normalize=("sample", "each reward's gradient normalized per sample (paper Fig. 8); ablations: batch, none (raw)"),
    # --- optimization (the paper gives none of these) --- our choice: the usual LoRA rate for SD1.5 (~1e-5 with
    # --lora-rank 0); the largest LoRA micro-batch that fits 24 GB (README; halved on OOM); 2000 steps, not tuned.
    lr=(1e-4, "AdamW learning rate"),
    batch_size=(4, "images per micro-batch"),
    grad_accum=(1, "micro-batches per optimizer step: effective batch = batch_size * grad_accum"),
    max_steps=(2000, "optimizer steps"),
    seed=(0, "seed of prompts, noise, eta and LoRA init"),
    # --- system --- our choice: fp32 on CPUs, which without bf16 units emulate it, slowly
    device=("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."),
    precision=("auto", "bf16 (autocast, fp32 trainable weights) or fp32; auto: bf16 on a GPU that has it, else fp32"),
    grad_checkpointing=(True, "recompute activations in backward: UNet, VAE decoder, reward towers"),
    # --- logging and long runs ---
    sample_every=(100, "a PNG grid of fixed prompts at fixed seeds every N steps (and at step 0)"),
    num_sample_prompts=(4, "prompts in that grid, spread over the prompt file"),
    num_sample_seeds=(2, "seeds per prompt in that grid"),
    checkpoint_every=(200, "steps between checkpoints (and one at the end, and on Ctrl-C / SIGTERM)"),
    keep_checkpoints=(3, "keep the newest N checkpoints"),
    max_bad_steps=(10, "stop after N non-finite steps in a row (each one skipped)"),
    # our choice: the longest expected wait is rank 0 writing one checkpoint (full fine-tuning: 10 GB) and a grid;
    # 20 minutes covers that at 10 MB/s and bounds how long a hang idles every GPU
    dist_timeout=(20, "torchrun: minutes a process waits for the others before the run stops; raise for a slow disk"),
    resume=(None, "a run folder to continue from its latest checkpoint, or 'auto' (= --output-dir, if it has one)"),
    overwrite=(False, "replace the run already in --output-dir"),
)
DEFAULTS = {name: default for name, (default, _) in OPTIONS.items()}

# --tiny: the same code on tiny models built in code, minutes on a CPU: 64 px, the toy colour reward, a bigger step
# (tiny models pretrained in miniature), no gradient checkpointing (saves nothing; tests turn it on for the GPU path).
TINY_PRESET = dict(output_dir="runs/tiny", resolution=64, rewards="color=1.0", lora_rank=8, lr=1e-2, batch_size=16,
                   max_steps=400, grad_checkpointing=False, sample_every=50, checkpoint_every=100, num_sample_prompts=6,
                   num_sample_seeds=4)


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, no network), exit code 2, or a run stopped on purpose (an
    interrupt: 130/143, too many non-finite steps: 3). main() prints it as one sentence."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


# -----------------------------------------------------------------------------------------------------------
# Details the method uses, kept out of its way: the offline demo's toy rewards, parsing --rewards, precision contexts.

COLOURS = {  # the toy colour reward's; our choice: typical sRGB renderings of each word
    "red": (0.85, 0.10, 0.10), "orange": (0.95, 0.55, 0.05), "yellow": (0.95, 0.90, 0.15),
    "green": (0.15, 0.65, 0.20), "blue": (0.10, 0.25, 0.85), "purple": (0.50, 0.15, 0.65),
    "pink": (0.95, 0.55, 0.75), "brown": (0.45, 0.28, 0.12), "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95), "gray": (0.50, 0.50, 0.50),
}
_COLOUR_WORD = re.compile(r"\b(" + "|".join([*COLOURS, "grey"]) + r")\b", re.IGNORECASE)


def colour_of(prompt):
    """The first colour word of the prompt ('a red fox in green grass' -> 'red'; 'grey' -> 'gray'), or None."""
    m = _COLOUR_WORD.search(prompt)
    return m.group(1).lower().replace("grey", "gray") if m else None


def dominant_colour(pixels):
    """(B,3,H,W) in [0,1] -> the palette word nearest to each image's mean colour (used for colour accuracy)."""
    names, palette = list(COLOURS), torch.tensor(list(COLOURS.values()), device=pixels.device)  # P names, (P,3)
    mean = pixels.float().mean(dim=(2, 3))  # (B,3)
    return [names[i] for i in torch.cdist(mean, palette).argmin(dim=1).tolist()]


class ColourReward(torch.nn.Module):
    """color: r(x, c) = -||mean_rgb(x) - rgb(colour word of c)||^2, and 0 for prompts without a colour word.
    A toy with a known optimum: it lets a tiny random generator *visibly* learn text conditioning offline."""

    space = "pixels"

    def forward(self, pixels, prompts, text_emb=None):
        target = torch.tensor([COLOURS.get(colour_of(p), (0, 0, 0)) for p in prompts], device=pixels.device)  # (B,3)
        has_colour = torch.tensor([colour_of(p) is not None for p in prompts], device=pixels.device)
        mean = pixels.mean(dim=(2, 3))  # (B,3)
        return -((mean - target) ** 2).sum(-1) * has_colour  # (B,), 0 is perfect


class BrightnessReward(torch.nn.Module):
    """bright: r(x) = mean luma (0.299 R + 0.587 G + 0.114 B), 0-255. A toy on another scale than color's, as real
    rewards are (HPS a cosine, ImageReward ~N(0,1)): ~100x color's raw gradient, for Fig. 8's normalization ablation."""

    space = "pixels"

    def forward(self, pixels, prompts, text_emb=None):
        luma = torch.tensor([0.299, 0.587, 0.114], device=pixels.device).view(1, 3, 1, 1)
        return 255 * (pixels * luma).sum(1).mean(dim=(1, 2))  # (B,)


class ProxyReward(torch.nn.Module):
    """proxy (and proxy_b): a small learned colour classifier, the toy's stand-in for HPS and ImageReward, which are
    learned models with blind spots that a generator can hack: r(x, c) = log p(colour word of c | x), 0 for prompts
    without one. The exact mean-colour rule (`color`) stays the true score, which training with proxy never sees."""

    space = "pixels"

    def __init__(self):
        super().__init__()
        conv, relu = torch.nn.Conv2d, torch.nn.ReLU
        self.net = torch.nn.Sequential(conv(3, 16, 3, 2, 1), relu(), conv(16, 32, 3, 2, 1), relu(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, len(COLOURS)))

    def forward(self, pixels, prompts, text_emb=None):
        logp = self.net(pixels.to(self.net[0].weight.dtype)).float().log_softmax(-1)  # (B,11)
        wanted = torch.tensor([list(COLOURS).index(colour_of(p) or "red") for p in prompts], device=pixels.device)
        has_colour = torch.tensor([colour_of(p) is not None for p in prompts], device=pixels.device)
        return logp.gather(1, wanted[:, None])[:, 0] * has_colour  # (B,)

    def predict(self, pixels):  # the palette word the proxy sees in each image
        return [list(COLOURS)[i] for i in self.net(pixels.to(self.net[0].weight.dtype)).argmax(-1).tolist()]


@functools.lru_cache(maxsize=2)
def fit_proxy(seed, per_colour=3, steps=600):
    """our choice, fixed before any claim was run: 3 images of each palette colour (33 in all), each a random texture
    the tiny decoder paints (toy_textures) shifted to that colour, and 600 full-batch Adam steps (lr 1e-2) of cross
    entropy. Few images, and from another distribution than the generator's: as human judgements are for HPS."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        proxy = ProxyReward()
        labels = torch.arange(len(COLOURS)).repeat_interleave(per_colour)  # (33,)
        colours = torch.tensor(list(COLOURS.values()))[labels].view(-1, 3, 1, 1)
        images = (colours + toy_textures(len(labels), torch.Generator().manual_seed(seed))).clamp(0, 1)  # (33,3,64,64)
        fit(list(proxy.parameters()), lambda: F.cross_entropy(proxy.net(images), labels), steps=steps, lr=1e-2)
    return proxy.requires_grad_(False).eval()


def parse_rewards(spec):
    """'hps=1.0,clip=0.5' -> {'hps': 1.0, 'clip': 0.5} ('hps' alone means weight 1.0), with clear errors."""
    weights = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if name not in REWARDS:
            raise UserError(f"unknown reward '{name}' in --rewards; choose from {', '.join(REWARDS)} "
                            f"(e.g. --rewards hps=1.0,clip=1.0).")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise UserError(f"reward weight '{value}' for '{name}' is not a number; write --rewards {name}=1.0.")
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"reward weight for '{name}' must be a finite number >= 0, got {value}.")
        if name in weights:
            raise UserError(f"reward '{name}' appears twice in --rewards; give each reward once.")
        weights[name] = weight
    if not weights or sum(weights.values()) == 0:
        raise UserError("--rewards names no reward with a positive weight; e.g. --rewards hps=1.0,clip=1.0.")
    return weights


def native_bf16(device):
    """Whether `device` is a GPU with native bf16 (Ampere and newer); CPUs and older GPUs emulate it, slowly."""
    return str(device).startswith("cuda") and torch.cuda.is_bf16_supported(False)


def autocast(device, precision):
    """bf16 autocast for the UNet's fp32 trainable weights, on CPUs too (so tests run the GPU's path); none for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def own_dtype(device):
    """Autocast off: frozen bf16 models (VAE, reward towers) compute in their own dtype, as diffusers runs them. our
    choice (speed, same exactness): autocast would cast each GroupNorm, LayerNorm and softmax to fp32 and back (CUDA's
    bf16 norms accumulate in fp32 anyway), large in the 512 px VAE decoder. test_r0.py checks that both ways agree."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


# -----------------------------------------------------------------------------------------------------------
# Reward models: the registry, each reward's class (frozen model, caches, memory) and loader. To add one (PickScore):
#   1. a class with the reward interface ("Rewards", above), optionally enable_gradient_checkpointing() (open_clip:
#      as ClipFamilyReward's; transformers: checkpoint_transformers_layers());
#   2. a loader (tiny, device, dtype) -> the frozen reward: its real weights (hub_file, load_tensors), or with tiny a
#      random-weight twin of the same classes, small enough for a CPU;
#   3. a line in REWARDS (name, loader, hub downloads, sample.py's report); --rewards, test_r0.py and sample.py take it.

@dataclass
class Reward:
    load: object            # (tiny, device, dtype) -> the reward; None: built from the generator itself (cfg)
    downloads: list = ()    # [(what it is, hub repo, files: any one of them will do, the first is the one to get)]
    scale: float = 1.0      # sample.py reports scale x score (the paper's tables: 100 x a cosine)
    about: str = ""         # sample.py's note on its weights; "" = not a --score metric


class ClipFamilyReward(torch.nn.Module):
    """hps and clip: clip_score on an open_clip model, frozen, its text features computed once per prompt."""

    space = "pixels"

    def __init__(self, clip_model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = clip_model.requires_grad_(False).eval(), tokenizer
        sequence_first(self.model.visual.transformer)  # speed only, the same numbers (see sequence_first)
        self._text = {}  # prompt -> (D,) normalized text feature

    @torch.no_grad()  # text features carry no gradient: only the image path does
    def text_features(self, prompts):
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]  # new prompts, in order, once
        if missing:
            device = next(self.model.parameters()).device
            feats = F.normalize(self.model.encode_text(self.tokenizer(missing).to(device)).float(), dim=-1)  # (M,D)
            self._text.update(zip(missing, feats))
        return torch.stack([self._text[p] for p in prompts])  # (B,D), unit norm

    def forward(self, pixels, prompts, text_emb=None):
        return clip_score(self.model, pixels, self.text_features(prompts))  # (B,)

    def enable_gradient_checkpointing(self):
        self.model.set_grad_checkpointing(True)


def sequence_first(transformer):
    """our choice (speed; the same numbers): open_clip's image transformer in its sequence-first (L,B,D) layout.
    Batch-first, nn.MultiheadAttention transposes its input to (L,B,D) as a strided view, which matmul (gradient to
    the image, not into the frozen weights) cannot fold into one product: the input projection runs as L=257 small
    ones. test_r0.py checks scores and image gradients against open_clip's layout, and that the slow product is gone."""
    if all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in transformer.resblocks):  # (open_clip's default)
        transformer.batch_first = False  # open_clip's Transformer then transposes (B,L,D) <-> (L,B,D) around blocks
        for b in transformer.resblocks:
            b.attn.batch_first = False


class ImageRewardReward(torch.nn.Module):
    """imagereward: imagereward_score on transformers' BLIP towers and MLP head, frozen; prompts tokenized once each."""

    space = "pixels"

    def __init__(self, vision_config, text_config, tokenizer):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel
        self.vision = BlipVisionModel(vision_config)  # BLIP's ViT
        self.text = BlipTextModel(text_config, add_pooling_layer=False)  # BLIP's BERT with cross-attention
        self.mlp = preference_head(text_config.hidden_size)
        self.tokenizer, self._tokens = tokenizer, {}  # prompt -> (input_ids, attention_mask)
        self.requires_grad_(False).eval()  # frozen: gradients flow through it to the image, never into it

    def tokens(self, prompts):  # as ImageReward: padded to 35 tokens, truncated; [CLS] first (no [ENC] swap)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._tokens]
        if missing:
            enc = self.tokenizer(missing, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            self._tokens.update(zip(missing, zip(enc["input_ids"], enc["attention_mask"])))
        ids, mask = zip(*(self._tokens[p] for p in prompts))
        return torch.stack(ids).to(self.mlp[0].weight.device), torch.stack(mask).to(self.mlp[0].weight.device)

    def forward(self, pixels, prompts, text_emb=None):
        return imagereward_score(self, pixels, *self.tokens(prompts))  # (B,)

    def enable_gradient_checkpointing(self):
        checkpoint_transformers_layers(self)


def preference_head(dim):
    """ImageReward's MLP, and the LAION aesthetic predictor's (sample.py): dim -> 1024 -> 128 -> 64 -> 16 -> 1 with no
    activations; the dropouts (off in eval mode) are kept only so that the indices match their checkpoints."""
    L, drop = torch.nn.Linear, torch.nn.Dropout
    return torch.nn.Sequential(L(dim, 1024), drop(0.2), L(1024, 128), drop(0.2), L(128, 64), drop(0.1), L(64, 16),
                               L(16, 1))


def checkpoint_transformers_layers(model):
    """Gradient checkpointing for a frozen transformers model, which checkpoints a layer only while .training is set
    (and BlipTextModel refuses gradient_checkpointing_enable()): each layer is switched on as transformers does, with
    only its flag set (at dropout 0, as in BLIP and CLIP, layers read it for nothing else; heads stay in eval mode)."""
    import torch.utils.checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            layer.gradient_checkpointing, layer.training = True, True
            layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def load_clip_family(name, tiny, device, dtype):
    """hps or clip: open_clip ViT-H-14, with HPS v2.1's or CLIP-score's weights (or, tiny, a random tiny twin)."""
    import open_clip
    tokenizer = open_clip.get_tokenizer("ViT-H-14")  # open_clip's bundled BPE: no download
    if tiny:
        return ClipFamilyReward(cast(build_tiny_clip_tower(seed=1 if name == "hps" else 2)[0], device, dtype),
                                tokenizer)
    path = hub_file(name, REWARDS[name].downloads[0])  # open_clip is handed the file: it never goes to the network
    print(f"{name}: open_clip ViT-H-14 with the weights of {path}")
    if name == "clip":
        model = open_clip.create_model("ViT-H-14", pretrained=path)
    else:  # HPS v2.1 is a full fine-tune of ViT-H-14 (both towers), saved as a training checkpoint under 'state_dict'
        model = open_clip.create_model("ViT-H-14", pretrained=None)  # the architecture; the weights come next
        state = load_tensors(path, "HPS v2.1 checkpoint")["state_dict"]  # HPSv2's own loader reads this key
        missing, _ = model.load_state_dict(state, strict=False)  # tolerates extra keys of other open_clip versions
        if missing:
            raise UserError(f"{path} does not fit open_clip's ViT-H-14 (missing {missing[:3]}...); re-download it.")
    return ClipFamilyReward(cast(model, device, dtype), tokenizer)


def load_imagereward(tiny, device, dtype):
    """ImageReward.pt on BLIP's towers; tiny: a random twin reading CLIP's tokens (BERT's vocabulary is a download)."""
    if tiny:
        with torch.random.fork_rng():
            torch.manual_seed(3)
            reward = ImageRewardReward(*imagereward_configs("tiny"), sd15_tokenizer_offline())
    else:
        from transformers import BertTokenizer
        weights, vocab = (hub_file("imagereward", download) for download in REWARDS["imagereward"].downloads)
        tokenizer = BertTokenizer(vocab)  # bert-base-uncased (lower-cased) plus BLIP's two tokens, as ImageReward
        tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        reward = ImageRewardReward(*imagereward_configs("full"), tokenizer)
        reward.load_state_dict(imagereward_key_map(load_tensors(weights, "ImageReward checkpoint")))
        print(f"imagereward: BLIP ViT-L + BERT with the weights of {weights}")
    cast(reward, device, dtype).mlp.float()  # the towers in dtype, the head in fp32 (as ImageReward computes it)
    return reward


# ImageReward.pt's keys -> ImageRewardReward's, one rule each (full matches, in order); test_r0.py checks keys, shapes.
_V, _T, _P = r"blip\.visual_encoder\.", r"blip\.text_encoder\.", r"\.(weight|bias)"
IMAGEREWARD_KEY_RULES = [  # BLIP's timm-style ViT -> BlipVisionModel
    (_V + r"cls_token", r"vision.embeddings.class_embedding"),
    (_V + r"pos_embed", r"vision.embeddings.position_embedding"),
    (_V + r"patch_embed\.proj" + _P, r"vision.embeddings.patch_embedding.\1"),
    (_V + r"blocks\.(\d+)\.norm([12])" + _P, r"vision.encoder.layers.\1.layer_norm\2.\3"),
    (_V + r"blocks\.(\d+)\.attn\.qkv" + _P, r"vision.encoder.layers.\1.self_attn.qkv.\2"),
    (_V + r"blocks\.(\d+)\.attn\.proj" + _P, r"vision.encoder.layers.\1.self_attn.projection.\2"),
    (_V + r"blocks\.(\d+)\.mlp\.(fc[12])" + _P, r"vision.encoder.layers.\1.mlp.\2.\3"),
    (_V + r"norm" + _P, r"vision.post_layernorm.\1"),
    # BLIP's med.py BERT -> BlipTextModel, a port of it: the same names under a new prefix
    (_T + r"(embeddings\.(word|position)_embeddings\.weight|embeddings\.LayerNorm" + _P + ")", r"text.\1"),
    (_T + r"(encoder\.layer\.\d+\.(attention|crossattention)\.(self\.(query|key|value)|output\.(dense|LayerNorm))"
     + _P + ")", r"text.\1"),
    (_T + r"(encoder\.layer\.\d+\.(intermediate\.dense|output\.(dense|LayerNorm))" + _P + ")", r"text.\1"),
    (r"mlp\.layers\.([02467])" + _P, r"mlp.\1.\2"),  # the head: same indices
]
# in the checkpoint, never read by the score: BLIP's contrastive projections, and the text positions 0..511 (a buffer)
IMAGEREWARD_UNUSED_KEYS = {"blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                           "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"}


def imagereward_key_map(state):
    """ImageReward.pt's state dict -> ImageRewardReward's (strict). An unknown key is refused, never half-loaded."""
    out = {}
    for key, value in state.items():
        match = next((m.expand(r) for p, r in IMAGEREWARD_KEY_RULES if (m := re.fullmatch(p, key))), None)
        if match is not None:
            out[match] = value
        elif key not in IMAGEREWARD_UNUSED_KEYS:
            raise UserError(f"unexpected key '{key}' in the ImageReward checkpoint; is it THUDM/ImageReward's "
                            "ImageReward.pt? Re-download it.")
    return out


def imagereward_configs(size):
    """(BlipVisionConfig, BlipTextConfig) of ImageReward ('full'), or of a tiny twin with the same classes ('tiny').
    transformers' defaults differ from BLIP's (LayerNorm eps, 8 text heads, 384 px): every number is given."""
    from transformers import BlipTextConfig, BlipVisionConfig
    full = size == "full"
    vision = BlipVisionConfig(  # BLIP's ViT-L/16 at 224: exact GELU, LayerNorm eps 1e-6
        hidden_size=1024 if full else 64, intermediate_size=4096 if full else 256, num_hidden_layers=24 if full else 2,
        num_attention_heads=16 if full else 2, image_size=224, patch_size=16 if full else 32, hidden_act="gelu",
        layer_norm_eps=1e-6, initializer_range=0.02)
    text = BlipTextConfig(  # med_config.json: BERT-base, 30522 + [DEC] + [ENC] tokens (the tiny twin: CLIP's 49408)
        vocab_size=30524 if full else 49408, hidden_size=768 if full else 32, intermediate_size=3072 if full else 64,
        num_hidden_layers=12 if full else 2, num_attention_heads=12 if full else 2,
        max_position_embeddings=512 if full else 64, encoder_hidden_size=vision.hidden_size, hidden_act="gelu",
        layer_norm_eps=1e-12, pad_token_id=0, is_decoder=True)  # is_decoder: only makes it build the cross-attention
    return vision, text


REWARDS = {  # name -> Reward, in the order of --help and of sample.py's tables
    "hps": Reward(functools.partial(load_clip_family, "hps"), [("HPS v2.1 weights", "xswu/HPSv2",
                                                                ("HPS_v2.1_compressed.pt",))],
                  100, "HPS v2.1 (xswu/HPSv2, HPS_v2.1_compressed.pt), 100 x cosine"),
    "clip": Reward(functools.partial(load_clip_family, "clip"),
                   [("CLIP-score weights (ViT-H-14 laion2b_s32b_b79k)", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                     ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))],
                   100, "CLIP score, open_clip ViT-H-14 laion2b_s32b_b79k, 100 x cosine"),
    "imagereward": Reward(load_imagereward, [("ImageReward weights", "THUDM/ImageReward", ("ImageReward.pt",)),
                                             ("tokenizer of ImageReward (bert-base-uncased)",
                                              "google-bert/bert-base-uncased", ("vocab.txt",))],
                          1, "ImageReward (THUDM/ImageReward, ImageReward.pt)"),
    "cfg": Reward(None),  # the frozen base UNet: built by set_up_r0
    "color": Reward(lambda tiny, device, dtype: ColourReward()),
    "bright": Reward(lambda tiny, device, dtype: BrightnessReward()),
    "proxy": Reward(lambda tiny, device, dtype: cast(copy.deepcopy(fit_proxy(0)), device, dtype)),
    "proxy_b": Reward(lambda tiny, device, dtype: cast(copy.deepcopy(fit_proxy(1)), device, dtype)),  # other data
}
TOY_REWARDS = ("color", "bright", "proxy", "proxy_b")  # a run with one of them measures the toy's held-out scores


def load_tensors(path, what):
    """torch.load that cannot run code: weights_only=True reads only tensors, numbers, strings and containers (all our
    checkpoints and reward weights hold), so a tampered file (cached, or a run folder handed to you) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch names the object it refused: "... GLOBAL posix.system ..."
        refused = next(iter(re.findall(r"GLOBAL ([\w.]+)", str(err))), "an object")
        raise UserError(f"{path} is not a plain {what}: it holds {refused}, and a Python object could run code when "
                        "loaded, so it was refused unread; use a file from a source you trust.")
    except (RuntimeError, EOFError) as err:  # truncated or not a torch file at all
        raise UserError(f"{path} is not a readable {what} ({str(err).splitlines()[0][:100]}); use an intact copy "
                        "(weights: download them again).")


def hub_file(name, download):
    """The local path of one of a reward's hub files (REWARDS[name].downloads): a cached file first, then a download."""
    from huggingface_hub import hf_hub_download
    what, repo, files = download
    cached = next(filter(None, (in_cache(repo, f) for f in files)), None)
    return cached or from_hub(lambda local: hf_hub_download(repo, files[0], local_files_only=local),
                              f"the {what} ({repo})", f"pre-download it (hf download {repo} {files[0]}), leave "
                              f"{name} out (of --rewards, or sample.py's --score-with), or run offline with --tiny.")


# -----------------------------------------------------------------------------------------------------------
# Loading: SD1.5 from the hub or a folder, and the tiny twins built in code for --tiny and the tests.

def tiny_sd15_configs():
    """The tiny UNet / VAE / text encoder: SD1.5's block types and interfaces, widths that run in seconds on a CPU."""
    unet = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,  # 4 blocks: 8x
               block_out_channels=(8, 8, 16, 16), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215, mid_block_add_attention=False)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
    return unet, vae, text


# SD1.5's scheduler (the PNDM config on the hub, read by any diffusers scheduler): the DDPM chain we sample on.
SD15_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", prediction_type="epsilon", set_alpha_to_one=False,
                             steps_offset=1, clip_sample=False, skip_prk_steps=True)


def sd15_tokenizer_offline():
    """SD1.5's exact CLIP tokenizer (49408 tokens, pad = eos = 49407), rebuilt offline from open_clip's BPE merges.
    Token order as CLIP's: 256 byte symbols, the same with '</w>', the 48894 merges, <|startoftext|>, <|endoftext|>."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({token: i for i, token in enumerate(vocab)}, f)
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        # positional paths: CLIPTokenizer(vocab_file, merges_file). (A wrong keyword silently gives 2 tokens.)
        tokenizer = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                                  pad_token="<|endoftext|>", model_max_length=77)
    assert len(tokenizer) == 49408 and tokenizer.pad_token_id == 49407
    return tokenizer


def build_tiny_sd15(seed=0):
    """Fresh copies of tiny SD1.5 (tokenizer, text_encoder, vae, unet), built once per seed (tests need it often)."""
    return copy.deepcopy(_build_tiny_sd15(seed))


@functools.lru_cache(maxsize=2)
def _build_tiny_sd15(seed):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    unet_cfg, vae_cfg, text_cfg = tiny_sd15_configs()
    with torch.random.fork_rng():  # building leaves the global RNG as it found it (cached or not)
        torch.manual_seed(seed)
        unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg, bos_token_id=49406, eos_token_id=49407,
                                                    pad_token_id=49407))
        tokenizer = sd15_tokenizer_offline()
        prompts = ["a photo", "a red fox", "a blue car", "a green tree"]  # the denoiser's conditions (ignored)
        pretrain_tiny(vae, unet, encode_prompts(tokenizer, text_encoder, prompts), seed)  # our choice: see there
    return tokenizer, text_encoder, vae, unet


def pretrain_tiny(vae, unet, text_emb, seed):
    """Our choice, tiny models only: miniature pretrainings, so that the toy starts where R0 starts. The VAE decoder
    learns SD1.5's near-linear colour behaviour over the whole colour cube: a random decoder paints mid-gray whatever
    the latent (its GroupNorms standardize global shifts away), and one taught only near gray cannot make yellow, green
    or purple. The UNet learns to denoise: R0 fine-tunes a *pretrained* UNet; a random one's eps is unrelated to x_t, so
    the first x0_hat = (x_t - 0.998 eps) / 0.068 is ~15x too large, saturates the decoder and drowns the text signal. A
    few dozen DDPM-loss steps on toy latents fix that; they ignore the text, so colour conditioning is still learned
    from the reward alone. Deterministic per machine and thread count (they set the order of float sums)."""
    alphas_cumprod, h, g = sd15_alphas_cumprod(), unet.config.sample_size, torch.Generator()

    def decoder_loss(batch=8):
        # toy latents: textures + a per-image shift, colour uniform over the RGB cube (via LATENT_RGB's pseudo-inverse)
        rgb = torch.rand((batch, 3), generator=g) * 2 - 1  # (B,3) in [-1,1]
        z = torch.randn((batch, 4, h, h), generator=g) + (rgb @ torch.linalg.pinv(LATENT_RGB)).view(batch, 4, 1, 1)
        target = F.interpolate(latent_to_rgb(z).clamp(-1, 1), scale_factor=8, mode="bilinear")  # (B,3,8h,8w)
        return F.mse_loss(vae.decode(z / vae.config.scaling_factor).sample, target)

    def denoiser_loss(batch=16):
        z0, eps = torch.randn((2, batch, 4, h, h), generator=g)  # toy data z0 ~ N(0, I): random colour textures
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * eps  # forward diffusion of the toy data
        c = text_emb[torch.randint(0, len(text_emb), (batch,), generator=g)]
        return F.mse_loss(unet(x_t, t, encoder_hidden_states=c).sample, eps)
    g.manual_seed(seed)
    fit([*vae.decoder.parameters(), *vae.post_quant_conv.parameters()], decoder_loss, steps=400, lr=1e-2)
    g.manual_seed(seed)
    fit(list(unet.parameters()), denoiser_loss, steps=60, lr=3e-3)


# SD1.5's near-linear map from (scaled) latent channels (rows) to RGB in [-1,1] (columns), as in latent previews
LATENT_RGB = torch.tensor([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
                           [-0.2120, -0.2616, -0.7177]])  # (4,3)


def latent_to_rgb(z):
    return torch.einsum("bchw,cd->bdhw", z, LATENT_RGB)  # (B,4,h,w) -> (B,3,h,w), about [-1,1]


def toy_textures(n, generator, size=64):
    """(n,3,size,size) zero-mean textures in [0,1] units: what the tiny decoder paints from latent noise."""
    rgb = F.interpolate(latent_to_rgb(torch.randn((n, 4, size // 8, size // 8), generator=generator)) / 2,
                        size=size, mode="bilinear")
    return rgb - rgb.mean(dim=(2, 3), keepdim=True)


def fit(params, loss, steps, lr):
    """A few Adam steps on loss(): the tiny models' miniature pretrainings. Leaves no gradients behind."""
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def build_tiny_clip_tower(seed=0):
    """(model, tokenizer): a tiny random open_clip CLIP of ViT-H-14's classes (HPS v2.1's / CLIP score's), shrunk."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    with torch.random.fork_rng():  # leave the global RNG as we found it
        torch.manual_seed(seed)
        model = open_clip.CLIP(
            embed_dim=32, vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=32, image_size=224),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
    return model, open_clip.get_tokenizer("ViT-H-14")  # ViT-H-14's tokenizer is open_clip's bundled BPE


def hub_unreachable():
    """True if the hub is clearly unreachable (HF_HUB_OFFLINE=1, or no connection and no proxy): cache only, no retry."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    import socket
    from urllib.parse import urlparse
    try:
        socket.create_connection((urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname, 443),
                                 timeout=3).close()
        return False
    except OSError:
        return True


def in_cache(repo, filename):
    """The local path of a hub file if the Hugging Face cache holds it, else None. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache
    path = try_to_load_from_cache(repo, filename)
    return path if isinstance(path, str) else None


def check_downloads(model, downloads, also_missing=()):
    """Before anything loads: if the hub is unreachable, one sentence names every missing download and its command."""
    missing = list(also_missing)
    if model and not os.path.isdir(model) and not in_cache(model, "model_index.json"):
        missing.insert(0, f"the SD1.5 model '{model}' (hf download {model})")
    for what, repo, files in downloads:
        if not any(in_cache(repo, f) for f in files):
            missing.append(f"the {what} (hf download {repo} {files[0]})")
    if missing and hub_unreachable():
        raise UserError(f"the Hugging Face hub is unreachable and the local cache lacks {'; '.join(missing)}; download "
                        f"{'them' if len(missing) > 1 else 'it'} on a machine with network into the same cache "
                        "(HF_HOME), or run offline with --tiny.")


def from_hub(load, what, how):
    """load(local_files_only): the local cache (or a local folder) first, the network only if it is reachable; a
    failure becomes one sentence: what was being loaded, the first line of the cause, what to do (`how`)."""
    for local in (True, False):
        try:
            return load(local)
        except Exception as err:  # not in the cache, offline, a gated or misspelled repo, ...
            if not local or hub_unreachable():
                offline = "the hub is unreachable and it is not in the local cache; " if local else ""
                raise UserError(f"could not load {what} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                                f"{offline}{how}")


def load_sd15(model):
    """SD1.5 components from a hub id or a local diffusers folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    how = (f"pre-download it (hf download {model}), pass a local diffusers folder with --model, "
           "or run offline with --tiny.")
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise UserError(f"--model {model} is a folder but not a diffusers pipeline (no model_index.json); "
                        "pass an SD1.5 diffusers folder or a hub id.")
    def part(cls, sub):  # each component lives in its own subfolder of a diffusers pipeline repo
        return from_hub(lambda local: cls.from_pretrained(model, subfolder=sub, local_files_only=local),
                        f"the {sub} of '{model}'", how)
    scheduler_config = dict(part(DDIMScheduler, "scheduler").config)  # SD1.5's PNDM config: any class reads it
    return (part(CLIPTokenizer, "tokenizer"), part(CLIPTextModel, "text_encoder"), part(AutoencoderKL, "vae"),
            part(UNet2DConditionModel, "unet"), scheduler_config)


def check_sd15_shaped(text_encoder, vae, unet, scheduler_config):
    """Refuse models this file cannot train, with a sentence that says why (SDXL, SD2 v-prediction, ...)."""
    pred = scheduler_config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise UserError(f"the base model's scheduler predicts '{pred}', but R0's generator is built on an "
                        "epsilon-prediction UNet (SD1.5); pass an SD1.5 model.")
    if scheduler_config.get("beta_schedule") != "scaled_linear" or scheduler_config.get("num_train_timesteps") != 1000:
        raise UserError("the base model's noise schedule is not SD1.5's (scaled_linear, 1000 steps); "
                        "pass an SD1.5 model.")
    changed = [k for k in ("trained_betas", "rescale_betas_zero_snr") if scheduler_config.get(k)]
    if changed:  # sd15_alphas_cumprod rebuilds the schedule from beta_start/beta_end alone: it would ignore these
        raise UserError(f"the base model's scheduler sets {' and '.join(changed)}, a noise schedule other than SD1.5's "
                        "that this file does not rebuild; pass an SD1.5 model with the standard schedule.")
    if unet.config.in_channels != 4 or vae.config.latent_channels != 4:
        raise UserError("the base model's UNet/VAE are not SD1.5-shaped (4 latent channels); pass an SD1.5 model.")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size or unet.config.addition_embed_type:
        raise UserError("the base model's UNet does not take a single CLIP text encoder's hidden states "
                        "(SDXL or another family?); pass an SD1.5 model.")


def load_models(cfg):
    """Everything a run needs: --model's weights (or with --tiny the tiny twins), set up for R0 by set_up_r0."""
    if cfg.tiny:
        tokenizer, text_encoder, vae, unet = build_tiny_sd15(seed=cfg.seed)
        scheduler_config = dict(SD15_SCHEDULER_CONFIG)
    else:  # offline: every missing download in one sentence, before anything loads
        check_downloads(cfg.model, [d for name in cfg.rewards for d in REWARDS[name].downloads])
        tokenizer, text_encoder, vae, unet, scheduler_config = load_sd15(cfg.model)
    check_sd15_shaped(text_encoder, vae, unet, scheduler_config)  # refuse SDXL, v-prediction, ... before any work
    m = set_up_r0(tokenizer, text_encoder, vae, unet, scheduler_config, cfg)
    towers = [name for name in m.rewards if cfg.tiny and REWARDS[name].downloads]
    if towers and rank() == 0:
        print(f"note: --tiny builds {', '.join(towers)} as tiny towers with random weights, not the real reward "
              "models: training against them checks the code path, not image quality.")
    if cfg.grad_checkpointing:  # trade compute for memory on every module the backward passes through
        for module in (m.unet, m.vae, *m.rewards.values()):
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
    return m


def cast(module, device, dtype):
    """module.to(device, dtype), nn.Module's way (diffusers' .to warns of fp32 modules even where there are none)."""
    return torch.nn.Module.to(module, device, dtype)

# -----------------------------------------------------------------------------------------------------------
# Prompts, images, the saved pipeline

def load_prompts(path):
    """Prompts from a UTF-8 text file, one a line; '#' comments and blank lines are skipped."""
    if path is None:
        raise UserError("no prompt file given; pass --prompts FILE (one prompt a line, e.g. prompts.txt).")
    if not os.path.exists(path):
        raise UserError(f"prompt file '{path}' does not exist; pass --prompts with a text file of prompts.")
    if os.path.isdir(path):
        raise UserError(f"'{path}' is a directory, not a prompt file; pass --prompts with a text file.")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not text
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompt file '{path}' is not UTF-8 text; save it as UTF-8.")
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserError(f"prompt file '{path}' holds no prompts (only blank lines or '#' comments); "
                        "add one prompt a line.")
    return prompts


@torch.no_grad()
def sample_images(m, prompts, seeds, steps, resolution, precision, eta=0.0, batch_size=8):
    """Images (N,3,H,W) in [0,1] of the few-step generator, one per (prompt, seed), deterministic per seed; each model
    in its own dtype, as diffusers runs it (autocast only for a UNet with fp32 weights); one host sync, at the end."""
    noise = torch.stack([initial_noise(s, resolution, "cpu") for s in seeds]).to(m.device)  # (N,4,h,w), one copy
    fp32_unet = precision == "bf16" and any(p.dtype == torch.float32 for p in m.unet.parameters())
    batch_size = batch_size if eta == 0 else 1  # eta > 0: one image per batch, its step noise from its own seed
    images = []
    for i in range(0, len(prompts), batch_size):
        gen = torch.Generator(m.device).manual_seed(seeds[i])  # eta>0 draws, on the device (CPU and GPU images differ)
        text_emb = encode_prompts(m.tokenizer, m.text_encoder, prompts[i : i + batch_size])
        with autocast(m.device, precision) if fp32_unet else contextlib.nullcontext():
            latents = generate(m.unet, noise[i : i + batch_size], text_emb, steps, m.alphas_cumprod, eta=eta,
                               generator=gen)
        images.append(decode(m.vae, latents))  # (b,3,H,W) fp32 in [0,1]
    return torch.cat(images).cpu()


def initial_noise(seed, resolution, device):
    """x_T for one image: (4,h,w) N(0,I), drawn on the CPU so a seed gives the same image on every device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((4, resolution // 8, resolution // 8), generator=g).to(device)


def save_grid(images, path, ncols, captions=None, row_labels=None):
    """(N,3,H,W) in [0,1] -> one PNG, row-major; optional caption under each image and label left of each row."""
    from PIL import Image, ImageDraw
    if (captions or row_labels) and images.shape[-1] < 128:  # small (tiny-model) images: make room for text
        images = F.interpolate(images, scale_factor=math.ceil(128 / images.shape[-1]), mode="nearest")
    N, _, H, W = images.shape
    captions = [textwrap.wrap(c, max(W // 6 - 1, 1), max_lines=3, placeholder="~") or [""] for c in captions or []]
    cap_h = 2 + 11 * max(map(len, captions)) if captions else 0  # (PIL's default font: ~6 px a character, 11 a line)
    label_w = 6 * max(map(len, row_labels)) + 8 if row_labels else 0
    nrows = math.ceil(N / ncols)
    grid = Image.new("RGB", (label_w + ncols * W, nrows * (H + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        x, y = label_w + c * W, r * (H + cap_h)
        grid.paste(Image.fromarray((img.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()), (x, y))
        for line, text in enumerate(captions[i] if captions else []):
            draw.text((x + 2, y + H + 1 + 11 * line), text, fill="black")
    for r, label in enumerate(row_labels or []):
        draw.text((4, r * (H + cap_h) + H // 2 - 6), label, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


HELD_OUT_SEEDS = range(1000, 1004)  # the toy's measures: seeds that training and the progress grids never use


def held_out_prompts(prompts):
    """our choice: about a fifth of the colour prompts, which a toy run never trains on (per colour, in file order,
    the 3rd, 8th, 13th, ...): the measures on them show whether the conditioning generalizes to unseen prompts."""
    count = {}
    for p in filter(colour_of, prompts):
        count[colour_of(p)] = count.get(colour_of(p), 0) + 1
        if count[colour_of(p)] % 5 == 3:
            yield p


def content_kept(images, base):
    """Mean over images and channels of the correlation of each image with the base model's image of the same prompt
    and seed: 1.0 keeps all of its structure. Blind to colour (an affine change per channel keeps 1.0); it falls as
    structure is lost (a flat field: 0) or replaced (texture the base image does not have)."""
    x, y = (t.flatten(2) - t.flatten(2).mean(-1, keepdim=True) for t in (images, base))  # (N,3,HW), centred
    return ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1) + 1e-8)).mean().item()


def held_out_images(m, cfg, prompts, eta=0.0):
    """Each prompt at each of HELD_OUT_SEEDS, prompt-major: (4 len(prompts),3,H,W) in [0,1]."""
    return sample_images(m, [p for p in prompts for _ in HELD_OUT_SEEDS], [s for _ in prompts for s in HELD_OUT_SEEDS],
                         cfg.steps, cfg.resolution, cfg.precision, eta)


@torch.no_grad()
def toy_measures(m, cfg, seen, unseen, base, eta=0.0):
    """The toy's held-out measures of the generator's final output, each colour prompt at HELD_OUT_SEEDS: the true
    score, colour_accuracy (the mean colour's nearest palette word is the prompt's: chance 1 in 11) on training
    prompts, per colour and on held-out ones (_unseen); content_kept against `base` (the base model's images of
    these prompts and seeds); and on the training prompts' images the mean of every image reward (proxies: their
    own accuracy too) and of `color`, the true score in the reward's units."""
    prompts = [p for p in seen + unseen for _ in HELD_OUT_SEEDS]
    images = held_out_images(m, cfg, seen + unseen, eta)  # (N,3,H,W) in [0,1]
    n = len(seen) * len(HELD_OUT_SEEDS)  # the first n images: training prompts
    hit = [colour_of(p) == got for p, got in zip(prompts, dominant_colour(images))]
    wanted = [colour_of(p) for p in prompts[:n]]
    out = {"colour_accuracy": sum(hit[:n]) / max(n, 1), "colour_accuracy_unseen": sum(hit[n:]) / max(len(hit) - n, 1),
           "colour_accuracy_per_colour": {c: sum(h for w, h in zip(wanted, hit) if w == c) / wanted.count(c)
                                          for c in sorted(set(wanted))},
           "content_kept": content_kept(images, base), "color_held_out": ColourReward()(images[:n], prompts[:n]).mean().item()}
    for name, reward in m.rewards.items():
        if reward.space == "pixels":
            out[f"{name}_held_out"] = reward(images[:n].to(m.device), prompts[:n]).float().mean().item()
        if hasattr(reward, "predict"):
            out[f"{name}_accuracy"] = sum(map(str.__eq__, reward.predict(images[:n].to(m.device)), wanted)) / max(n, 1)
    return out


def write_curves(out_dir, summary):
    """<out>/curves.png from log.jsonl, 4 panels a row: each logged number of the step (rewards, reg), then each
    measure of the progress grids (content_kept, the toy's held-out scores) from the base model's, at step 0."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    log = read_log(os.path.join(out_dir, "log.jsonl"))
    skip = ("step", "loss", "surrogate", "grad_norm", "lr", "seconds", "peak_mem_gb", "skipped", "k", "measures")
    curves = {k: [(r["step"], r[k]) for r in log if k in r] for k in dict.fromkeys(k for r in log for k in r)
              if k not in skip}
    before = summary.get("before", {})
    for k in dict.fromkeys(k for r in log for k, v in r.get("measures", {}).items() if isinstance(v, float)):
        curves[k] = ([(0, before[k])] if k in before else []) + [(r["step"], r["measures"][k]) for r in log
                                                                 if k in r.get("measures", {})]
    rows = math.ceil(len(curves) / 4)
    fig, axes = plt.subplots(rows, min(len(curves), 4), figsize=(3.2 * min(len(curves), 4), 2.6 * rows), squeeze=False)
    for ax, (key, points) in zip(axes.flat, curves.items()):
        ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=80)
    plt.close(fig)


def sd_pipeline(tokenizer, text_encoder, vae, unet, scheduler):
    """diffusers' StableDiffusionPipeline of these parts (no safety checker: SD1.5's is a separate download)."""
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def few_step_scheduler(scheduler_config):
    """The diffusers scheduler that reproduces generate(eta=0): DDIM, trailing spacing, final alpha = 1."""
    from diffusers import DDIMScheduler
    return DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False, thresholding=False, rescale_betas_zero_snr=False)


def merged_unet(unet, base):
    """The trained generator as a plain fp32 CPU diffusers UNet: `base` (the source UNet at full precision: training's
    frozen copy is bf16 and would round SD1.5) with the trained change folded in (LoRA: peft's fp32 merge)."""
    base = cast(base.requires_grad_(False), "cpu", torch.float32)
    if getattr(unet, "peft_config", None):
        from peft import set_peft_model_state_dict
        from peft.utils import get_peft_model_state_dict
        base.add_adapter(copy.deepcopy(unet.peft_config["default"]))  # the same targets, rank and scaling
        set_peft_model_state_dict(base, get_peft_model_state_dict(unet))  # the trained A and B
        base.fuse_lora(lora_scale=1.0)  # W <- W + scaling * B @ A
        base.unload_lora()  # drop the peft wrappers: plain diffusers layers that any pipeline can load
    else:
        base.load_state_dict(unet.state_dict())
    return base


def save_pipeline(m, cfg):
    """<out>/pipeline: a diffusers folder (fp32: --model's text encoder and VAE, merged_unet's UNet), its scheduler the
    few-step DDIM, so StableDiffusionPipeline.from_pretrained(out/pipeline)(prompt, num_inference_steps=4,
    guidance_scale=1.0) is our sampler. LoRA runs also write <out>/lora (pipe.load_lora_weights, on the base)."""
    from diffusers import StableDiffusionPipeline
    out_dir = cfg.output_dir  # the base reloaded at full precision (training holds bf16 copies of the frozen parts)
    tokenizer, text_encoder, vae, base_unet = build_tiny_sd15(cfg.seed) if cfg.tiny else load_sd15(cfg.model)[:4]
    pipe = sd_pipeline(tokenizer, cast(text_encoder, "cpu", torch.float32), cast(vae, "cpu", torch.float32),
                       merged_unet(m.unet, base_unet), few_step_scheduler(m.scheduler_config))
    pipe.save_pretrained(os.path.join(out_dir, "pipeline"))
    if getattr(m.unet, "peft_config", None):
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(m.unet))
        StableDiffusionPipeline.save_lora_weights(os.path.join(out_dir, "lora"), unet_lora_layers=layers,
                                                  safe_serialization=True)


# -----------------------------------------------------------------------------------------------------------
# Checkpoints, resume, interrupts: a run of hours must survive crashes, Ctrl-C, full disks and NaNs.

# Config keys a resumed run may change: none of them touches the optimization itself.
RESUMABLE_CHANGES = {"max_steps", "sample_every", "num_sample_prompts", "num_sample_seeds", "checkpoint_every",
                     "keep_checkpoints", "max_bad_steps", "dist_timeout", "device", "grad_checkpointing", "prompts",
                     "resume", "overwrite", "output_dir"}
RUN_FILES = ("config.json", "log.jsonl", "summary.json", "curves.png", "checkpoints", "samples", "pipeline", "lora")


class PromptOrder:
    """Shuffled epochs of prompts, checkpointed so that a resume sees the same prompts as an uninterrupted run."""

    def __init__(self, prompts, seed):
        self.prompts, self.rng, self.queue = prompts, random.Random(seed), []

    def batch(self, n):
        """The next n prompts; a new shuffled epoch starts whenever the current one runs out."""
        out = []
        while len(out) < n:
            self.queue = self.queue or self.rng.sample(self.prompts, len(self.prompts))
            out.append(self.queue.pop())
        return out

    def state_dict(self):
        return {"rng": self.rng.getstate(), "queue": list(self.queue)}

    def load_state_dict(self, state):
        self.rng.setstate(state["rng"])
        self.queue = list(state["queue"])


def frozen_fingerprint(m):
    """The frozen models a run trains against, cheaply (once per run): per module (theta_0, text encoder, VAE, each
    reward model), the float64 sum of |w|. The tiny models come from a miniature pretraining whose float sums depend
    on the machine and the thread count, and a hub model's local snapshot can change: a resume checks this."""
    modules = [m.unet if m.frozen_unet is None else m.frozen_unet, m.text_encoder, m.vae, *m.rewards.values()]
    return [sum(p.detach().double().abs().sum().item() for p in module.parameters() if not p.requires_grad)
            for module in modules if isinstance(module, torch.nn.Module)]


def checkpoint_files(out_dir):
    """Finished checkpoints of a run, oldest first (temporary files of an interrupted write are ignored)."""
    folder = os.path.join(out_dir, "checkpoints")
    names = sorted(f for f in os.listdir(folder) if re.fullmatch(r"step_\d{6}\.pt", f)) if os.path.isdir(folder) else []
    return [os.path.join(folder, f) for f in names]


def save_checkpoint(out_dir, step, m, optimizer, generator, order, cfg, prompts_hash, fingerprint, last=None):
    """<out>/checkpoints/step_NNNNNN.pt, all an exact resume needs, written to a temp file and renamed (atomic: a crash
    never corrupts the latest); the oldest beyond --keep-checkpoints go. A failed write (a full disk) stops the run,
    the previous checkpoint (`last`) intact."""
    state = {
        "step": step,
        "trainable": {n: p.detach().cpu() for n, p in m.unet.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "ranks": gather_from_ranks({  # every process's random streams (one process: a list of one)
            "generator": generator.get_state(),  # latents, eta, noise, R0+ step, cfg timesteps
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(cfg.device) if cfg.device.startswith("cuda") else None,  # its GPU's
            "python_rng": random.getstate(),  # (NumPy is not used for randomness)
            "order": order.state_dict(),
            "weights_sum": torch.stack([p.detach().double().sum() for p in trainable_parameters(m.unet)]).sum().item()}),
        "config": vars(cfg),
        "prompts_sha256": prompts_hash,
        "fingerprint": fingerprint, "threads": torch.get_num_threads(),  # of the frozen models (see frozen_fingerprint)
    }
    path = os.path.join(out_dir, "checkpoints", f"step_{step:06d}.pt")
    failed = None
    if rank() == 0:  # several processes: rank 0 writes
        sums = [r["weights_sum"] for r in state["ranks"]]
        if len(set(sums)) > 1:  # several processes must hold the same weights
            print(f"warning: the processes hold different weights at step {step} (sums of their weights: {sums}).")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(state, path + ".tmp")  # (a full disk: OSError, or RuntimeError from torch's zip writer)
            os.replace(path + ".tmp", path)
            for old in checkpoint_files(out_dir)[: -cfg.keep_checkpoints]:
                os.remove(old)
        except (OSError, RuntimeError) as err:
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")
            failed = getattr(err, "strerror", None) or str(err).splitlines()[0]
    if any_rank(failed is not None, cfg.device):  # a run that cannot save its progress stops, on every rank
        raise UserError(f"could not write checkpoint {path} ({failed or 'on rank 0'}); stopped, so that no more "
                        f"training is lost: the last checkpoint is {last or 'none'}. Free some disk space, then "
                        f"{launcher(world_size())} r0.py --resume {out_dir}", exit_code=1)
    return path


def load_checkpoint(path, m, optimizer, generator, order, prompts_hash, cfg, fingerprint):
    """Restore a save_checkpoint() file into freshly built models / optimizer / generators. Returns its step."""
    state = load_tensors(path, "r0.py checkpoint")
    if state["prompts_sha256"] != prompts_hash:  # the saved data order would index into different prompts
        raise UserError(f"the prompts in {state['config']['prompts']} differ from those the run was trained on; resume "
                        "with the same prompt file, or start a new run.")
    saved = state.get("fingerprint")  # (none in checkpoints before it existed)
    if saved and not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(saved, fingerprint, strict=True)):
        raise UserError(f"the frozen models (theta_0, VAE, text encoder, rewards) differ from those {cfg.output_dir} was "
                        "trained from: another snapshot of --model, or --tiny's models rebuilt on another machine or "
                        f"thread count (the run had {state['threads']} threads: OMP_NUM_THREADS={state['threads']}); "
                        "resume where it was trained, or start a new run.")
    trained_by = len(state["ranks"])  # each process continues its own random streams: the count cannot change
    if trained_by != world_size():
        raise UserError(f"{cfg.output_dir} was trained by {trained_by} process{'es' if trained_by > 1 else ''} and "
                        f"this is {world_size()}; resume it with the same number ({launcher(trained_by)} r0.py "
                        "--resume ...).")
    params = dict(m.unet.named_parameters())
    for name, value in state["trainable"].items():  # only the trainable tensors were saved (LoRA: a few MB)
        params[name].data.copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    mine = state["ranks"][rank()]
    generator.set_state(mine["generator"])
    torch.set_rng_state(mine["torch_rng"])
    if isinstance(mine["cuda_rng"], torch.Tensor) and cfg.device.startswith("cuda"):  # (no cpu <-> cuda: resolve_config)
        torch.cuda.set_rng_state(mine["cuda_rng"], cfg.device)
    random.setstate(mine["python_rng"])
    order.load_state_dict(mine["order"])
    return state["step"]


class StopOnSignal:
    """SIGINT / SIGTERM: finish the current step, save a checkpoint, exit. A second signal exits at once."""
    signum = None  # the signal received, if any

    def __call__(self, signum, frame):
        if self.signum is not None:
            print("\nsecond interrupt: exiting now, without a checkpoint.", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print("\ninterrupt: finishing this step, then saving a checkpoint (interrupt again to quit at once).",
              file=sys.stderr, flush=True)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

# -----------------------------------------------------------------------------------------------------------
# Several GPUs, nanoGPT-style: torchrun --standalone --nproc_per_node N r0.py ... trains one generator on N processes
# (python r0.py: one; all below is then a no-op). Each rank draws its own prompts and noise (seed + rank); the gradients
# are averaged over the ranks every optimizer step, so all hold the same weights; rank 0 writes. our choice: DDP's
# arithmetic by hand (its reducer expects one forward per backward; we call the UNet K times, the cfg reward once more).

def init_distributed(device, timeout_minutes):
    """Join torchrun's process group (NCCL or gloo) on this rank's device; returns (rank, processes): (0, 1) alone.
    A collective that waits longer than --dist-timeout fails, and torchrun stops every process."""
    if "RANK" not in os.environ:  # not started by torchrun
        return 0, 1
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank(), world_size()


def several_ranks():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if several_ranks() else 0


def world_size():
    return dist.get_world_size() if several_ranks() else 1


def average_gradients_over_ranks(params, finite):
    """Several processes: every gradient becomes the mean over the ranks (what one process would compute on all their
    micro-batches), unless some rank's were non-finite: then all skip the step. Returns whether it goes ahead."""
    if not several_ranks():
        return finite
    if any_rank(not finite, params[0].device):
        return False
    for p in (p for p in params if p.grad is None):  # (a weight that took no part in this rank's graph)
        p.grad = torch.zeros_like(p)
    for work in [dist.all_reduce(p.grad, async_op=True) for p in params]:  # sums (gloo has no mean)
        work.wait()
    torch._foreach_div_([p.grad for p in params], dist.get_world_size())
    return True


def launcher(processes):
    """The command that starts r0.py with this many processes (for the messages that say how to resume)."""
    return f"torchrun --nproc_per_node {processes}" if processes > 1 else "python"


def any_rank(flag, device):
    """True on every rank if `flag` is true on one of them (a NaN, or a Ctrl-C that reached one process)."""
    if not several_ranks():
        return bool(flag)
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_from_ranks(obj):
    """[obj of rank 0, obj of rank 1, ...], on every rank; [obj] for one process."""
    if not several_ranks():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -----------------------------------------------------------------------------------------------------------
# Training loop. One optimizer step (its call order is written above r0_step), then the loop around it.

def accumulate_gradients(m, order, cfg, generator):
    """Forward and backward of --grad-accum micro-batches: p.grad then holds the gradient of the mean of their losses.
    Returns (their stats, averaged; whether every loss and reward was finite)."""
    stats_sum, finite = {}, True
    for _ in range(cfg.grad_accum):
        loss, stats = r0_step(m, order.batch(cfg.batch_size), cfg, generator)  # order: PromptOrder, shuffled epochs
        stats["loss"] = loss.item()
        finite = finite and all(math.isfinite(v) for v in stats.values())
        if finite:  # no point pushing NaNs through the graph
            (loss / cfg.grad_accum).backward()  # ONE backward through decoder + generator per micro-batch
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + v / cfg.grad_accum
    return stats_sum, finite


def apply_update(optimizer, params, cfg, finite):
    """Clip the gradient (our choice: global norm 1.0), then AdamW. A non-finite loss, reward or gradient skips the
    update: weights and optimizer state stay exactly as they were. Returns (grad norm before clipping, applied)."""
    finite = average_gradients_over_ranks(params, finite)  # several GPUs: the mean over the ranks
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item() if finite else float("nan")
    applied = finite and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients as soon as they are used
    return grad_norm, applied


def optimizer_step(m, optimizer, params, order, cfg, generator, first=False):
    """One optimizer step. Returns (stats, grad norm before clipping, applied). A run's first step (first=True) may
    not fit: if any rank runs out of memory, all retry it at half the micro-batch and twice the accumulation (the
    same effective batch, exactly); an odd batch stops with advice."""
    rng = (generator.get_state(), order.state_dict())
    while True:
        try:
            stats, finite = accumulate_gradients(m, order, cfg, generator)
            out_of_memory = False
        except torch.OutOfMemoryError:
            if not first:
                raise
            out_of_memory = True
        # the ranks decide together, before any gradient is exchanged: a rank retrying alone would split the replicas
        if not first or not any_rank(out_of_memory, cfg.device):
            break
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        if cfg.batch_size == 1:
            raise UserError("out of GPU memory at --batch-size 1, the smallest micro-batch; use --r0-plus (one UNet call "
                            "in the graph), fewer rewards, a smaller --lora-rank or --resolution, or a larger GPU.")
        half = cfg.batch_size // 2 if cfg.batch_size % 2 == 0 else 1  # an odd batch: micro-batches of 1
        cfg.batch_size, cfg.grad_accum = half, cfg.grad_accum * (cfg.batch_size // half)
        if rank() == 0:
            print(f"out of GPU memory: retrying with --batch-size {cfg.batch_size} --grad-accum {cfg.grad_accum} "
                  "(the same effective batch)")
        generator.set_state(rng[0])  # the step starts again from its first draw
        order.load_state_dict(rng[1])
        write_config(cfg)  # a --resume continues with the batch that fits
    return stats, *apply_update(optimizer, params, cfg, finite)


def allocate_optimizer_state(optimizer, params):
    """AdamW creates its state (two fp32 copies of the trainable weights) in its first update, which would make step 2
    heavier than step 1, the one that retries out of memory: a step on zero gradients creates it now (weight decay 0
    and zero moments: no weight moves), and its step count is reset, so that the run is exactly as without it."""
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    except torch.OutOfMemoryError:  # a smaller micro-batch cannot cure this
        raise UserError("out of GPU memory for AdamW's state (two fp32 copies of the trainable weights); train LoRA "
                        "(a smaller --lora-rank) or use a larger GPU.")
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        state["step"].zero_()


def check_writable(path, flag):
    """Fail before minutes of loading, creating nothing, if path's nearest existing parent is not a writable folder."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {flag} {path} ({parent} is not a writable folder); choose a folder you can "
                        "write to.")


def write_atomic(path, text):
    """Write-then-rename, so a crash or a full disk never leaves a half-written config, summary or log."""
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")


def append_line(path, line):
    """One line onto log.jsonl; a write cut short (a full disk) is undone, so the file holds only whole lines."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise


def read_log(path):
    """log.jsonl's records (a line cut short by a crash is skipped)."""
    records = []
    for line in open(path) if os.path.exists(path) else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def write_or_warn(run, what, write, *args, **kwargs):
    """A write that must not end a run (a grid, a log line, curves.png, the summary): on a full disk, say so once
    and go on. (A checkpoint that cannot be written stops the run: save_checkpoint.)"""
    try:
        write(*args, **kwargs)
    except OSError as err:
        if not run.write_failed:
            print(f"warning: could not write {what} ({err.strerror or err}); training goes on and writes what it can "
                  "(it stops if a checkpoint cannot be written).")
        run.write_failed = True


def write_config(cfg):
    """<out>/config.json (rank 0): the resolved config a resume starts from, plus world_size and effective_batch."""
    if rank() == 0:
        saved = {k: v for k, v in vars(cfg).items() if k in OPTIONS}
        saved.update(world_size=world_size(), effective_batch=cfg.batch_size * cfg.grad_accum * world_size())
        path = os.path.join(cfg.output_dir, "config.json")
        try:
            write_atomic(path, json.dumps(saved, indent=2))
        except OSError as err:
            raise UserError(f"could not write {path} ({err.strerror}); free some disk space, then start again.")


def set_up_run(cfg):
    """Everything before the first step, ordered so that a mistake costs nothing: input checks, models, then files."""
    process, processes = init_distributed(cfg.device, cfg.dist_timeout)  # one process: rank 0 of 1; torchrun: see "Several GPUs"
    say = print if process == 0 else (lambda *args, **kwargs: None)  # rank 0 speaks (and writes) for all
    prompts = load_prompts(cfg.prompts)
    prompts_hash = hashlib.sha256("\n".join(prompts).encode()).hexdigest()  # a resume must see the same prompts
    existing = []  # a fresh run: the files of a run already in --output-dir (refused unless --overwrite)
    if cfg.resume_checkpoint is None:
        existing = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.output_dir, f))]
        if existing and not cfg.overwrite:
            raise UserError(f"{cfg.output_dir} already holds a run ({', '.join(existing)}); continue it with --resume "
                            f"{cfg.output_dir}, replace it with --overwrite, or choose another --output-dir.")
        check_writable(cfg.output_dir, "--output-dir")
    torch.manual_seed(cfg.seed + process)
    random.seed(cfg.seed + process)
    m = load_models(cfg)  # may fail (no network, not SD1.5): still nothing written
    if process == 0:  # now the folder; --overwrite removes the previous run's files (only those)
        os.makedirs(cfg.output_dir, exist_ok=True)
        for path in (os.path.join(cfg.output_dir, f) for f in existing):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    lengths = [len(ids) for ids in m.tokenizer(prompts, truncation=False, verbose=False).input_ids]
    if max(lengths) > m.tokenizer.model_max_length:  # one warning, not one per prompt
        say(f"warning: {sum(n > m.tokenizer.model_max_length for n in lengths)} of {len(prompts)} prompts are longer "
            f"than CLIP's {m.tokenizer.model_max_length}-token limit (longest: {max(lengths)} tokens); they are "
            "truncated, as SD1.5 itself does.")

    # the toy: about a fifth of the colour prompts held out of training, to measure on (held_out_prompts)
    toy = any(name in TOY_REWARDS for name in cfg.rewards) and any(map(colour_of, prompts))
    unseen = list(held_out_prompts(prompts)) if toy else []
    train_prompts = [p for p in prompts if p not in unseen]
    params = trainable_parameters(m.unet)
    optimizer = make_optimizer(params, cfg)
    allocate_optimizer_state(optimizer, params)  # before the first forward: the first step is the heaviest
    run = argparse.Namespace(
        m=m, params=params, optimizer=optimizer, prompts=prompts, prompts_hash=prompts_hash,
        generator=torch.Generator(cfg.device).manual_seed(cfg.seed + process),  # latents, eta, noise, R0+'s k, cfg's t
        order=PromptOrder(train_prompts, cfg.seed + process), start=0, say=say, main=process == 0, summary={},
        write_failed=False,
        log_path=os.path.join(cfg.output_dir, "log.jsonl") if process == 0 else os.devnull,  # others log nowhere
        summary_path=os.path.join(cfg.output_dir, "summary.json"))
    run.fingerprint = frozen_fingerprint(m)
    if cfg.resume_checkpoint:
        run.start = load_checkpoint(cfg.resume_checkpoint, m, run.optimizer, run.generator, run.order, prompts_hash,
                                    cfg, run.fingerprint)
        if run.main:  # drop log lines a crashed run wrote after its last checkpoint: they are about to be redone
            write_atomic(run.log_path, "".join(json.dumps(r) + "\n" for r in read_log(run.log_path)
                                               if r["step"] <= run.start))
            run.summary = json.load(open(run.summary_path)) if os.path.exists(run.summary_path) else {}
        say(f"resumed from {cfg.resume_checkpoint} (step {run.start})")
        if run.start >= cfg.max_steps:
            say(f"the run is already at step {run.start} of --max-steps {cfg.max_steps}: nothing to train; the "
                "pipeline and summary are written again from its last checkpoint (raise --max-steps to train further).")
    say(f"R0{'+' if cfg.r0_plus else ''} | {'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full fine-tuning'}"
        f" | {sum(p.numel() for p in params) / 1e6:.2f}M trainable | rewards {m.reward_weights} | {cfg.steps} steps"
        f" | {cfg.device} | batch {cfg.batch_size} x accumulation {cfg.grad_accum} x {processes} process"
        f"{'es' if processes > 1 else ''} = {cfg.batch_size * cfg.grad_accum * processes} images per step")
    write_config(cfg)

    n = min(cfg.num_sample_prompts, len(prompts))  # the progress grid: n prompts spread over the file x fixed seeds
    fixed_prompts = [prompts[round(i * (len(prompts) - 1) / max(n - 1, 1))] for i in range(n)]
    run.grid = ([p for p in fixed_prompts for _ in range(cfg.num_sample_seeds)],  # (prompts, seeds)
                [s for _ in fixed_prompts for s in range(cfg.num_sample_seeds)])
    run.held_out = ([p for p in train_prompts if colour_of(p)], unseen) if toy else None  # (seen, unseen)
    run.measures = {}  # the latest progress grid's measures
    if run.main:  # the base model's images of the same prompts and seeds, for content_kept
        with theta_0(m.unet, m.frozen_unet) as base:
            base_m = dataclasses.replace(m, unet=base)
            run.base = (held_out_images(base_m, cfg, sum(run.held_out, [])) if toy else
                        sample_images(base_m, *run.grid, cfg.steps, cfg.resolution, cfg.precision))
    if run.start == 0:
        run.summary["before"] = progress(run, cfg, 0)  # the 'before' picture, and its measures
        if toy and run.main:
            say(f"colour accuracy before training (held-out seeds): {run.summary['before']['colour_accuracy']:.1%} on "
                f"the training prompts, {run.summary['before']['colour_accuracy_unseen']:.1%} on {len(unseen)} held-out "
                f"ones (chance: 1 in {len(COLOURS)}; every untrained image is near gray)")
        write_or_warn(run, run.summary_path, write_atomic, run.summary_path, json.dumps(run.summary, indent=2))
    return run


def progress(run, cfg, step):
    """The progress grid <out>/samples/step_NNNNNN.png (a row per prompt) and its measures (returned): content_kept
    of its images, or for the toy all its held-out measures (toy_measures)."""
    if not run.main:
        return {}
    images = sample_images(run.m, *run.grid, cfg.steps, cfg.resolution, cfg.precision)
    path = os.path.join(cfg.output_dir, "samples", f"step_{step:06d}.png")
    write_or_warn(run, path, save_grid, images, path, cfg.num_sample_seeds, captions=run.grid[0])
    run.measures = (toy_measures(run.m, cfg, *run.held_out, run.base) if run.held_out else
                    {"content_kept": content_kept(images, run.base)})
    return run.measures


def train(cfg):
    """Train R0 as cfg says; returns the trained Models. The loop, nanoGPT's way: one optimizer step, one log line."""
    from tqdm import tqdm
    run = set_up_run(cfg)
    out, say, bad_steps, last_checkpoint = cfg.output_dir, run.say, 0, cfg.resume_checkpoint
    with StopOnSignal() as stop:
        bar = tqdm(range(run.start, cfg.max_steps), initial=run.start, total=cfg.max_steps, desc="R0",
                   dynamic_ncols=True, disable=not run.main)
        for step in bar:
            t0 = time.time()
            if cfg.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            stats, grad_norm, applied = optimizer_step(run.m, run.optimizer, run.params, run.order, cfg, run.generator,
                                                       first=step == run.start)  # first: halves the batch on OOM
            # one JSON line per step (several processes: rank 0's micro-batches; our choice: no all-reduce for a log)
            record = dict(step=step + 1, **stats, grad_norm=grad_norm, lr=cfg.lr, seconds=time.time() - t0,
                          peak_mem_gb=peak_memory_gb(cfg.device))
            bad_steps = 0 if applied else bad_steps + 1  # consecutive skipped steps; one good step resets it
            if not applied:
                record["skipped"] = "non-finite loss, reward or gradient"
                say(f"step {step + 1}: non-finite loss, reward or gradient; update skipped "
                    f"({bad_steps}/{cfg.max_bad_steps} in a row)")
            done = step + 1 == cfg.max_steps
            grid_step = (step + 1) % cfg.sample_every == 0 or done
            if grid_step and run.main:  # the progress grid, and its measures into this step's line
                record["measures"] = progress(run, cfg, step + 1)
            if run.main:
                write_or_warn(run, run.log_path, append_line, run.log_path, json.dumps(record))
            if grid_step and run.main:  # <out>/curves.png, refreshed with each progress grid
                write_or_warn(run, f"{out}/curves.png", write_curves, out, run.summary)
            bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if k not in ("loss", "surrogate")}
                            | {k: f"{run.measures[k]:.3g}" for k in ("colour_accuracy", "content_kept") if k in run.measures}
                            | {"s/it": f"{record['seconds']:.2f}"})
            if bad_steps >= cfg.max_bad_steps:
                raise UserError(
                    f"stopped at step {step + 1} after {bad_steps} steps in a row with non-finite values (NaN/Inf); "
                    f"the last good checkpoint is {last_checkpoint or 'none (no checkpoint was written yet)'}. "
                    "Lower --lr or check the rewards, then --resume.", exit_code=3)
            stopping = any_rank(stop.signum is not None, cfg.device)  # a signal to any rank stops all of them
            # checkpoint on schedule, at the end, and when a signal asked us to stop (never a state after a bad step)
            if applied and ((step + 1) % cfg.checkpoint_every == 0 or done or stopping):
                last_checkpoint = save_checkpoint(out, step + 1, run.m, run.optimizer, run.generator, run.order, cfg,
                                                  run.prompts_hash, run.fingerprint, last_checkpoint)
            if stopping and not done:  # Ctrl-C / SIGTERM arrived during this step: it is saved, now leave
                bar.close()
                raise UserError(f"interrupted at step {step + 1}; checkpoint {last_checkpoint}. Continue with: "
                                f"{launcher(world_size())} r0.py --resume {out}", exit_code=128 + (stop.signum or 15))
    if run.main:
        finish_run(run, cfg)
    return run.m


def finish_run(run, cfg):
    """The end: the toy's 'after' measures, a standard diffusers pipeline of the trained generator, the summary."""
    out, summary = cfg.output_dir, run.summary
    summary["after"] = after = run.measures or progress(run, cfg, cfg.max_steps)  # (the last grid's, if any)
    before = summary.get("before", {})
    if run.held_out:
        print(f"colour accuracy on held-out seeds, before -> after (chance: 1 in {len(COLOURS)}): "
              f"{before.get('colour_accuracy', math.nan):.1%} -> {after['colour_accuracy']:.1%} on the training "
              f"prompts, {before.get('colour_accuracy_unseen', math.nan):.1%} -> {after['colour_accuracy_unseen']:.1%} "
              f"on {len(run.held_out[1])} prompts never trained on; per colour: " + ", ".join(
                  f"{c} {before.get('colour_accuracy_per_colour', {}).get(c, math.nan):.0%} -> {v:.0%}"
                  for c, v in after["colour_accuracy_per_colour"].items()))
    print(f"content kept (correlation with the base model's images, which no reward scores): {after['content_kept']:.1%}")
    try:
        save_pipeline(run.m, cfg)
        write_atomic(run.summary_path, json.dumps(summary, indent=2))
    except (OSError, RuntimeError) as err:  # a full disk: the last checkpoint holds the trained weights
        raise UserError(f"could not write {out}/pipeline or its summary ({getattr(err, 'strerror', None) or err}); the "
                        f"trained weights are in {checkpoint_files(out)[-1]}: free some disk space, then "
                        f"python r0.py --resume {out} writes them.", exit_code=1)
    lora = f", LoRA adapters in {out}/lora" if getattr(run.m.unet, "peft_config", None) else ""
    print(f"done: progress grids in {out}/samples, curves in {out}/curves.png, diffusers pipeline in {out}/pipeline"
          f"{lora}, checkpoints in {out}/checkpoints, log in {out}/log.jsonl, summary in {out}/summary.json")


def peak_memory_gb(device):
    """Peak memory of this process so far: CUDA's max allocated (reset every step) or the CPU's peak RSS."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource  # CPU: peak resident set size of this process (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -----------------------------------------------------------------------------------------------------------
# Command line

class Parser(argparse.ArgumentParser):
    """argparse refusing a mistyped flag in one sentence (built with allow_abbrev=False: --prompt is not --prompts)."""

    def error(self, message):
        raise UserError(f"{message}; `python {self.prog} --help` lists every flag.")


def build_parser():
    """One flag per OPTIONS entry, its help ending in its default (and its --tiny value, where --tiny changes it)."""
    # argument_default=SUPPRESS: args holds only the typed flags, which override defaults, preset or saved config.
    p = Parser(prog="r0.py", description="R0: regularized reward maximization for few-step SD1.5 (arXiv 2503.13070)",
               argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for name, (default, what) in OPTIONS.items():
        if default is not None and default is not False:  # (seed's 0 is a default to show)
            what += f" (default {default}" + (f"; --tiny: {TINY_PRESET[name]})" if name in TINY_PRESET else ")")
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):  # on/off; one that is on by default also gets its --no-... form
            p.add_argument(flag, action=argparse.BooleanOptionalAction if default else "store_true", help=what)
        else:
            choices = {"precision": ["auto", "bf16", "fp32"], "normalize": ["sample", "batch", "none"]}.get(name)
            kind = parse_rewards if name == "rewards" else type(default) if default is not None else str
            p.add_argument(flag, type=kind, choices=choices, help=what.format(rewards=", ".join(REWARDS)))
    return p


def resolve_config(args):
    """Defaults <- --tiny preset <- typed flags; or, with --resume, the saved config <- typed flags (only harmless
    ones may differ). Then validate: one clear sentence per mistake, before anything is loaded or written."""
    typed = vars(args)  # only the flags on the command line (argument_default=SUPPRESS)
    cfg = dict(DEFAULTS)
    if typed.get("tiny"):
        cfg.update(TINY_PRESET)
    cfg.update(typed)
    if isinstance(cfg["rewards"], str):  # the default or --tiny's; typed ones are parsed by the parser
        cfg["rewards"] = parse_rewards(cfg["rewards"])  # {name: weight}
    cfg["resume_checkpoint"], trained_on = None, None  # the file a resumed run starts from, and its device
    if cfg["resume"]:
        run_dir = cfg["output_dir"] if cfg["resume"] == "auto" else cfg["resume"]
        found = checkpoint_files(run_dir)
        if found:
            with open(os.path.join(run_dir, "config.json")) as f:
                saved = json.load(f)
            if isinstance(saved.get("rewards"), str):  # written by r0.py before 869f30e: the --rewards text
                saved["rewards"] = parse_rewards(saved["rewards"])
            if isinstance(saved.get("normalize"), bool):  # before the per-batch ablation: on (per sample) or off
                saved["normalize"] = "sample" if saved["normalize"] else "none"
            changed = sorted(k for k, v in typed.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
            if changed:
                raise UserError(f"--resume cannot change {', '.join('--' + k.replace('_', '-') for k in changed)} "
                                f"(the run was trained with {', '.join(f'{k}={saved.get(k)}' for k in changed)}); "
                                "start a new run for that.")
            saved = {k: v for k, v in saved.items() if k in OPTIONS}  # its own config + the harmless typed flags
            cfg = {**DEFAULTS, **saved, **typed, "output_dir": run_dir, "resume_checkpoint": found[-1]}
            trained_on = saved["device"]
        elif cfg["resume"] != "auto":  # 'auto' without a checkpoint simply starts fresh
            raise UserError(f"--resume {run_dir}: no checkpoint found in {run_dir}/checkpoints; pass the --output-dir "
                            "of a run that has saved one.")
    cfg = argparse.Namespace(**cfg)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and "LOCAL_RANK" in os.environ:  # torchrun: each process on its own GPU
        cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device} asked for a GPU but PyTorch sees none; use --device cpu.")
    if cfg.precision == "auto":  # bf16 where the GPU computes it natively (Ampere and newer), else fp32
        cfg.precision = "bf16" if native_bf16(cfg.device) else "fp32"
        if cfg.device.startswith("cuda") and cfg.precision == "fp32" and os.environ.get("RANK", "0") == "0":
            print("note: this GPU has no native bf16 (it is older than Ampere): training in fp32, which needs more "
                  "memory than the README's bf16 table.")
    if trained_on and torch.device(trained_on).type != torch.device(cfg.device).type:
        raise UserError(f"--resume cannot move a run from {trained_on} to {cfg.device}: its random streams (noise, "
                        f"eta) are {torch.device(trained_on).type}'s and do not continue on another kind of device; "
                        f"resume it on {torch.device(trained_on).type}, or start a new run.")
    if not 1 <= cfg.steps <= 8:
        raise UserError(f"--steps must be between 1 and 8 (the paper uses 4), got {cfg.steps}.")
    for name in ("batch_size", "grad_accum", "max_steps", "resolution", "sample_every", "num_sample_prompts",
                 "num_sample_seeds", "checkpoint_every", "keep_checkpoints", "max_bad_steps", "dist_timeout"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive whole number, got {getattr(cfg, name)}.")
    if cfg.resolution % 8:
        raise UserError(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {cfg.resolution}.")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}.")
    if cfg.lora_rank < 0:
        raise UserError(f"--lora-rank must be 0 (full fine-tuning) or positive, got {cfg.lora_rank}.")
    if cfg.weight_reg < 0 or cfg.grad_clip <= 0:
        raise UserError("--weight-reg must be >= 0 and --grad-clip > 0.")
    return cfg


def quiet_libraries():
    """Only our bar and messages on the console: warnings untrue or useless here (diffusers passing huggingface_hub a
    deprecated argument; open_clip's 'random weights' for the model HPS weights fill next) are hidden; errors show."""
    import logging
    import warnings
    from diffusers.utils import logging as diffusers_logging
    import transformers
    diffusers_logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    handler = logging.StreamHandler()  # open_clip logs to the root logger; without a handler of ours, its first
    handler.setLevel(logging.ERROR)    # message installs one that also repeats every library's warnings
    logging.basicConfig(handlers=[handler], level=logging.ERROR)
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")


def main(argv=None):
    quiet_libraries()
    first_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for all (they fail alike)
    try:
        cfg = resolve_config(build_parser().parse_args(argv))
        train(cfg)
    except UserError as err:
        if first_rank:
            print(f"error: {err}" if err.exit_code == 2 else str(err), file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        if first_rank:
            print("interrupted before training started; nothing was saved.", file=sys.stderr)
        sys.exit(130)
    finally:
        if several_ranks():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
