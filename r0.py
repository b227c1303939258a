"""
R0: few-step text-to-image generation by regularized reward maximization, on Stable Diffusion 1.5.

Paper: Luo, Hu, Luo, Kawaguchi, Tang, "Rewards Are Enough for Fast Photo-Realistic Text-to-image Generation", arXiv
2503.13070 (v2: "Reward-Instruct"). The repository its abstract names, github.com/Luo-Yihong/R0, held no code on
2026-12-01, so this is written from what we could read: the abstract, figure captions and Table 1 (not the sections).
Each comment's label names its source; in one place:
  paper        a K-step generator from SD1.5 (Table 1: K=4); compositional rewards (abstract), HPS v2.1, ImageReward and
               CLIP score (Figs. 9-10); normalized reward gradients (Fig. 8); a weight anchor against hacking (Fig. 11);
               random eta (Figs. 5, 9); R0+'s intermediate supervision (Fig. 12); no distillation loss (abstract)
  third-party  summaries: the implicit CFG reward (Diff-Instruct++'s); LoRA and random eta read as regularizers
  our reading  the loss below; per-sample normalization; a squared-L2 anchor; eta ~ U[0,1] per step and sample;
               no CFG in the generator; backprop through all K steps; R0+ at one random step k; no diffusion loss
  our choice   what none of it fixes: timesteps, LoRA 64, lambda, lr, batch, reward weights (all untuned)
  not here     R0+'s high-resolution guidance loss (Fig. 14; its definition is in the text we could not read)

The idea: run the pretrained SD1.5 UNet as a K-step generator from pure noise (K=4, Table 1), decode, score the
images with differentiable reward models, and push the reward gradients back into the UNet, while regularizers keep
it from hacking the rewards (abstract). Prompts only: no distillation loss (abstract: diffusion losses are "an overly
expensive form of regularization") and, by our reading, no diffusion loss and no training images. The objective:
    L(theta) = - E_{c,z,eta} [ sum_i w_i r_i(decode(g_theta(z, c; eta)), c) ]  +  lambda ||theta - theta_0||^2
A step does not descend this L as written: each reward's image gradient is normalized to unit length first (Fig. 8),
so reward i pulls each image with strength w_i in its space (pixels; latents for cfg) whatever its scale, and lambda
weighs against these unit pulls, not reward values. The backward is of a surrogate ("Reward composition" below).

    python r0.py --tiny --prompts prompts.txt     # offline demo on a CPU: tiny models, a toy colour reward
    python r0.py --prompts prompts.txt            # SD1.5 + HPS v2.1 + CLIP score, LoRA, 512 px, one GPU
    python sample.py --run runs/r0 --prompt "a red fox in the snow"
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import glob
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

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------------------
# Config, at the top as in nanoGPT's train.py. Each name -> (default, help) becomes a flag, output_dir as --output-dir.
# The defaults are for SD1.5 on one GPU (sized by H100 runs of older code). --tiny swaps in TINY_PRESET; flags win.

OPTIONS = dict(
    # our choice: vanilla SD1.5 (Table 1's SD1.5 rows start from Realistic Vision, a fine-tune, by our reading)
    model=("stable-diffusion-v1-5/stable-diffusion-v1-5", "hub id or local diffusers folder of an SD1.5 model"),
    tiny=(False, "tiny SD1.5-shaped models built in code and the toy's colour reward: offline, minutes on a CPU"),
    prompts=(None, "text file, one prompt a line ('#' comments and blank lines skipped)"),
    output_dir=("runs/r0", "the run folder: everything a run writes goes here"),
    steps=(4, "K, the number of generator steps, 1..8 (paper, Table 1: 4)"),
    resolution=(512, "image side in pixels, a multiple of 8 (SD1.5 was trained at 512)"),
    r0_plus=(False, "R0+ (Fig. 12): train one random step k on its x0_hat (our reading; k in 0..K-1 our choice)"),
    # our choice: hps and clip at equal weights (CLIP limits the text alignment HPS may trade); imagereward costs memory
    rewards=("hps=1.0,clip=1.0", "name=weight list from {rewards}; a name alone means weight 1.0"),
    lora_rank=(64, "LoRA rank (our choice: 64); 0 = full fine-tuning"),
    weight_reg=(1e-2, "lambda of lambda ||theta - theta_0||^2 (our choice, untuned; raise it if grids degrade)"),
    grad_clip=(1.0, "max global gradient norm (our choice; it binds often: on the toy, every R0+ step at k = 0, 1)"),
    random_eta=(True, "random eta in training (Figs. 5, 9; its form our reading); --no-random-eta: eta = 0"),
    normalize=("sample", "each reward's gradient normalized (Fig. 8): per sample (our reading), per micro-batch, none"),
    # our choices, untuned, as none is in what we read: LoRA's usual rate (~1e-5 for --lora-rank 0), batch 4
    lr=(1e-4, "AdamW learning rate"),
    batch_size=(4, "images per micro-batch (lowered, with grad_accum raised, if a first step runs out of GPU memory)"),
    grad_accum=(1, "micro-batches per optimizer step, so the batch is batch_size * grad_accum"),
    max_steps=(2000, "optimizer steps"),
    seed=(0, "seed of the prompt order, every draw (noise, eta, k, t), LoRA's init and --tiny's SD1.5 twins"),
    device=("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."),
    precision=("auto", "bf16 (autocast over fp32 trainable weights), fp32, or auto (bf16 where the GPU has it)"),
    grad_checkpointing=(True, "recompute activations in backward (UNet, VAE decoder, reward towers)"),
    sample_every=(100, "a PNG grid of fixed prompts and seeds, and its measures, every N steps, at step 0 and the end"),
    num_sample_prompts=(4, "prompts in that grid, spread over the prompt file"),
    num_sample_seeds=(2, "seeds per prompt in that grid"),
    checkpoint_every=(200, "checkpoint every N steps, at the end and on Ctrl-C / SIGTERM (not of a skipped step)"),
    keep_checkpoints=(3, "keep the newest N checkpoints"),
    max_bad_steps=(10, "stop after N non-finite steps in a row (each one skipped)"),
    resume=(None, "a run folder to continue from its latest checkpoint, or 'auto' (= --output-dir, if it has one)"),
    overwrite=(False, "replace the run already in --output-dir"),
)
DEFAULTS = {name: default for name, (default, _) in OPTIONS.items()}
# --tiny runs in minutes on a CPU; lr 1e-2 suits the tiny models, pretrained in miniature
TINY_PRESET = dict(output_dir="runs/tiny", resolution=64, rewards="color=1.0", lora_rank=8, lr=1e-2, batch_size=16,
                   max_steps=400, grad_checkpointing=False, sample_every=50, checkpoint_every=100, num_sample_prompts=6,
                   num_sample_seeds=4)

# Precision under bf16: trainable weights fp32 in autocast; the frozen parts bf16 (full fine-tuning's theta_0: fp32)
def autocast(device, precision):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision != "fp32")

def autocast_off(device):
    return torch.autocast(device_type=torch.device(device).type, enabled=False)

def cast(module, device, dtype):  # module.to without diffusers' dtype warnings
    return torch.nn.Module.to(module, device, dtype)

# -----------------------------------------------------------------------------------------------------------
# Generator parameterization
# The pretrained eps-prediction UNet as a K-step generator g_theta(z, c; eta) from pure noise z ~ N(0,I). Step k at
# timestep t, with a_t = alpha_bar_t of SD1.5's DDPM schedule, and s = t - 1000 // K:
#       eps    = unet(x_t, t, c)
#       x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                        (DDIM eq. 9: the "predicted x0")
#       sigma  = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s)            (DDIM eq. 16)
#       x_s    = sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma^2) eps + sigma noise     (DDIM eq. 12)
# At the last step s < 0, so a_s := 1 and the output is x0_hat (for K = 6, 7 s = 0: x_0 at a_0 = 0.9991, as diffusers).
# Random eta (Figs. 5, 9) is DDIM's eta, U[0,1] per step and sample in training, 0 at inference; one UNet call a step,
# no CFG inside the generator (both our reading).

NUM_TRAIN_TIMESTEPS = 1000  # SD1.5's DDPM chain

def sd15_alphas_cumprod(beta_start=0.00085, beta_end=0.012):
    """SD1.5's 'scaled_linear' schedule, betas linear in sqrt-space. (1000,) alpha_bar_t, from ~1 down to ~0.0047."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()

def few_step_timesteps(num_steps):
    """Our choice: 'trailing' spacing, t_k = round(1000 - k 1000/K) - 1, so K=4 gives [999, 749, 499, 249] and the first
    step starts from pure noise. (SD1.5's 'leading' spacing would start at t=751 and leave visible noise.)"""
    assert 1 <= num_steps <= NUM_TRAIN_TIMESTEPS, num_steps
    step_ratio = NUM_TRAIN_TIMESTEPS / num_steps
    return [round(NUM_TRAIN_TIMESTEPS - k * step_ratio) - 1 for k in range(num_steps)]

def x0_from_eps(x_t, eps, alpha_bar_t):  # the clean latent that x_t and eps imply (DDIM eq. 9)
    return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5

def generate(unet, noise, text_emb, num_steps, alphas_cumprod, eta=0.0, random_eta=False, generator=None,
             stop_at=None):
    """The few-step generator g_theta: noise x_T (B,4,h,w), text_emb (B,77,D) -> its output latent (B,4,h,w).
    With random_eta, eta ~ U[0,1] per step and per sample, drawn from `generator` (a torch.Generator). For R0+,
    stop_at=k runs the steps before k without gradient and returns step k's x0_hat (k = K-1: the output)."""
    timesteps = few_step_timesteps(num_steps)
    # our choice: s = t - 1000 // K, diffusers' DDIM rule, so pipelines match (for K = 3, 6, 7 some s are t_(k+1) + 1)
    jump = NUM_TRAIN_TIMESTEPS // num_steps
    alphas = alphas_cumprod.tolist()
    B = noise.shape[0]
    x = noise.float()  # (B,4,h,w)
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and (stop_at is None or i >= stop_at)):  # R0+: from k
            a_t = alphas[t]
            t_batch = torch.full((B,), t, device=x.device, dtype=torch.long)
            eps = unet(x.to(unet.dtype), t_batch, encoder_hidden_states=text_emb.to(unet.dtype)).sample.float()
            x0_hat = x0_from_eps(x, eps, a_t)  # (B,4,h,w)
            if i == stop_at and i < num_steps - 1:  # R0+ stops here, and the rewards read this x0_hat
                return x0_hat
            s = t - jump
            a_s = alphas[s] if s >= 0 else 1.0  # s < 0, the last step: a_s = 1, so sigma = 0 and x = x0_hat
            if random_eta:  # (B,1,1,1), one eta per sample and step
                eta_i = torch.rand(B, generator=generator, device=x.device).view(B, 1, 1, 1)
            else:
                eta_i = torch.full((B, 1, 1, 1), float(eta), device=x.device)
            sigma = eta_i * ((1 - a_s) / (1 - a_t)) ** 0.5 * (1 - a_t / a_s) ** 0.5  # sigma^2 <= 1-a_s up to rounding
            step_noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = a_s**0.5 * x0_hat + (1 - a_s - sigma**2).clamp(min=0) ** 0.5 * eps + sigma * step_noise
    return x

def decode(vae, latents):
    """SD latents (B,4,h,w) -> pixels (B,3,8h,8w) in [0,1], as StableDiffusionPipeline computes them."""
    with autocast_off(latents.device):
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()  # (B,3,H,W) ~[-1,1]
    # our choice: the pipeline's clamp, so rewards see what users get (a clamped pixel passes no gradient)
    return (images / 2 + 0.5).clamp(0, 1)

@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts):
    """The condition c: (B,77,D) last hidden states (D=768 for SD1.5) of the frozen CLIP text encoder, no mask."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)  # (B,77)
    return text_encoder(ids)[0]

# -----------------------------------------------------------------------------------------------------------
# Rewards (abstract: "compositional rewards"; Figs. 9-10: quality rises as rewards are added; cfg: third-party)
#   hps          HPS v2.1: open_clip ViT-H-14 with HPS_v2.1_compressed.pt          ClipFamilyReward, clip_score
#   clip         CLIP score: open_clip ViT-H-14, laion2b_s32b_b79k                 ClipFamilyReward, clip_score
#   imagereward  ImageReward: BLIP ViT-L + BERT with cross-attention + MLP head    ImageRewardReward
#   cfg          the frozen base UNet's implicit CFG reward                         ImplicitCfgReward
#   color, bright, proxy, proxy_b   the toy's rewards (Plumbing, "The toy")
# A reward is a frozen nn.Module (cfg aside) with space = "pixels" (x, (B,3,H,W) in [0,1]) or "latents" (x0_hat)
#   forward(x, prompts, text_emb=None) -> (B,) scores, differentiable in x; text_emb is the generator's condition
#   or gradient(x, prompts, text_emb, generator) -> (logged (B,), ascent direction like x): cfg's, known by its gradient
#   and optionally log_as (the name it is logged under) and enable_gradient_checkpointing() (--grad-checkpointing)
# It is called in the step's autocast, loaded in the frozen dtype: clip_score and imagereward_score turn autocast off.
# Their loaders are Plumbing ("Reward models"), where a new reward, PickScore, is written out: class, loader, REWARDS.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalization: ViT-H-14, HPS v2.1, ImageReward
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

def clip_preprocess(pixels, size=224):
    """What hps, clip and imagereward see: open_clip's eval transform (bicubic resize of the shorter side, center
    crop, normalize) in differentiable torch ops. (B,3,H,W) in [0,1] -> (B,3,size,size) CLIP-normalized."""
    assert pixels.dim() == 4 and pixels.shape[1] == 3, f"expected (B,3,H,W) pixels, got {tuple(pixels.shape)}"
    assert pixels.min() >= 0 and pixels.max() <= 1, "clip_preprocess expects pixels in [0,1]"  # not [-1,1]
    H, W = pixels.shape[-2:]
    new_long = int(size * max(H, W) / min(H, W))  # torchvision's Resize(int) truncates the longer side
    new_hw = (size, new_long) if H <= W else (new_long, size)
    x = F.interpolate(pixels, size=new_hw, mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 1)  # our choice: clamp the bicubic overshoot, as open_clip's uint8 PIL images do
    top, left = int(round((new_hw[0] - size) / 2.0)), int(round((new_hw[1] - size) / 2.0))
    x = x[:, :, top : top + size, left : left + size]  # (B,3,size,size) in [0,1]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std

def clip_score(clip_model, pixels, text_features):
    """hps and clip: r(x, c) = cos(f_img(x), f_txt(c)), text_features (B,D) unit norm; no logit scale (our reading)"""
    image = clip_preprocess(pixels, clip_model.visual.image_size[0])  # (B,3,224,224)
    with autocast_off(pixels.device):
        img_feat = clip_model.encode_image(image.to(next(clip_model.parameters()).dtype)).float()  # (B,D)
    return (F.normalize(img_feat, dim=-1) * text_features).sum(-1)  # (B,), normalized in fp32

class ClipFamilyReward(torch.nn.Module):
    """hps and clip: clip_score on a frozen open_clip model."""
    space = "pixels"
    def __init__(self, clip_model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = clip_model.requires_grad_(False).eval(), tokenizer

    @torch.no_grad()
    def text_features(self, prompts):  # (B,D), unit norm, no gradient
        tokens = self.tokenizer(prompts).to(next(self.model.parameters()).device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def forward(self, pixels, prompts, text_emb=None):
        return clip_score(self.model, pixels, self.text_features(prompts))

    def enable_gradient_checkpointing(self):
        self.model.set_grad_checkpointing(True)

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's own statistics

def imagereward_score(model, pixels, input_ids, attention_mask):
    """imagereward (Xu et al. 2023): BLIP fine-tuned on human preference rankings.
        image_embeds = ViT-L/16(clip_preprocess(x))                               (B,197,1024)
        h            = BERT(prompt tokens, cross-attending to image_embeds)[:, 0]  (B,768), the [CLS] position
        r(x, c)      = (MLP(h) - mean) / std      MLP 768-1024-128-64-16-1; about N(0,1) on its data
    input_ids, attention_mask: (B,35)."""
    image = clip_preprocess(pixels, 224).to(model.vision.dtype)
    with autocast_off(pixels.device):
        image_embeds = model.vision(pixel_values=image).last_hidden_state  # (B,197,D)
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        h = model.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                       encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state[:, 0]  # (B,768)
        raw = model.mlp(h.float()).squeeze(-1)  # (B,), the head in fp32, as ImageReward
    return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD

class ImageRewardReward(torch.nn.Module):
    """imagereward: imagereward_score on transformers' BLIP towers and the MLP head, frozen."""
    space = "pixels"
    def __init__(self, vision_config, text_config, tokenizer):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)  # BLIP's BERT with cross-attention
        self.mlp, self.tokenizer = preference_head(text_config.hidden_size), tokenizer
        self.requires_grad_(False).eval()

    def forward(self, pixels, prompts, text_emb=None):  # prompts as ImageReward pads them, to 35 tokens, [CLS] first
        t = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        return imagereward_score(self, pixels, t.input_ids.to(pixels.device), t.attention_mask.to(pixels.device))

    def enable_gradient_checkpointing(self):
        checkpoint_transformers_layers(self)

class ImplicitCfgReward:
    """cfg, the frozen base model's implicit classifier-free-guidance reward (Diff-Instruct++'s, third-party summary).
    Noise the generated latent to a random level t, x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) n, and ascend log p(c | x_t).
    By Bayes grad_{x_t} log p(c | x_t) = -(eps_c - eps_u) / sqrt(1 - a_t), and dx_t/dx0_hat = sqrt(a_t), so
        d log p(c | x_t) / d x0_hat = sqrt(a_t / (1 - a_t)) (eps_u - eps_c).
    Per-sample normalization cancels the factor; without it (batch, none) t=20 weighs ~100x over t=980. our choice:
    t ~ U{20..980}, and the empty prompt as unconditional (as SD1.5's). Logged as cfg_gap, mean (eps_c - eps_u)^2."""
    space, log_as, t_min, t_max = "latents", "cfg_gap", 20, 980

    def __init__(self, base_eps, uncond_emb, alphas_cumprod):
        self.base_eps, self.uncond_emb, self.alphas_cumprod = base_eps, uncond_emb, alphas_cumprod

    @torch.no_grad()
    def gradient(self, latents, prompts, text_emb, generator=None):
        B = latents.shape[0]
        t = torch.randint(self.t_min, self.t_max + 1, (B,), generator=generator, device=latents.device)
        a_t = self.alphas_cumprod[t].view(B, 1, 1, 1)
        n = torch.randn(latents.shape, generator=generator, device=latents.device)
        x_t = a_t.sqrt() * latents + (1 - a_t).sqrt() * n  # (B,4,h,w)
        emb = torch.cat([text_emb, self.uncond_emb.expand(B, -1, -1).to(text_emb.dtype)])  # (2B,77,D): one call
        eps_c, eps_u = self.base_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), emb).float().chunk(2)
        gap = ((eps_c - eps_u) ** 2).flatten(1).mean(1)  # (B,), logged only
        return gap, (a_t / (1 - a_t)).sqrt() * (eps_u - eps_c)  # (B,), (B,4,h,w) d log p(c|x_t) / d x0_hat

# -----------------------------------------------------------------------------------------------------------
# Reward composition. paper (Fig. 8 caption): normalized reward gradients beat raw ones.
#   g_i = d r_i(x, c) / d x                              a backward through reward model i only
#   g   = sum_i w_i g_i / (||g_i|| + eps)                each reward pulls each sample with strength w_i
#   surrogate = - <stopgrad(g), x> / B                   d surrogate / d theta = - g . dx/dtheta / B
# Its gradient pulls each image x toward x + g, as ||x - stopgrad(x + g)||^2 / 2B would; its value means nothing
# (watch the rewards). Not one backward of -sum_i w_i r_i: each g_i is normalized on its own, so each reward is
# differentiated w.r.t. x alone, and one backward of the surrogate then carries their sum through decoder and UNet.
# our reading: one norm per sample and reward, so that one image's huge gradient cannot drown the others.
# our choice: the CFG reward's g_i is in latents (at x0_hat), the others' in pixels.

def normalize_gradient(g, per="sample", eps=1e-8):
    """g / (||g|| + eps), (B,...) -> (B,...), per sample. per="batch", an ablation, divides the micro-batch by one
    norm, so each sample gets about 1/sqrt(B) of the pull: the anchor weighs more, and clipping binds less."""
    norm = g.flatten(1).norm(dim=1) if per == "sample" else g.norm().expand(len(g))  # (B,)
    return g / (norm.view(-1, *([1] * (g.dim() - 1))) + eps)  # our choice: eps only guards g = 0

def reward_gradient(reward, x, prompts, text_emb, generator=None):
    """(scores (B,), d score / d x): a backward through the reward model only (x is detached from the generator)."""
    if hasattr(reward, "gradient"):  # a reward defined by its gradient (cfg)
        return reward.gradient(x.detach(), prompts, text_emb, generator)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = reward(x, prompts, text_emb)  # (B,)
        (grad,) = torch.autograd.grad(scores.sum(), x)  # no graph kept: g enters the step as stopgrad(g)
    return scores.detach(), grad

def composed_reward_gradients(rewards, weights, pixels, latents, prompts, text_emb, generator=None,
                              normalize="sample"):
    """sum_i w_i g_i / ||g_i|| in pixel space (image rewards) and in latent space (cfg), and each reward's values.
    normalize="none" is Fig. 8's ablation (the raw w_i g_i summed), and "batch" ours (one norm for the batch)."""
    grads = {"pixels": torch.zeros_like(pixels), "latents": torch.zeros_like(latents)}
    scores = {}
    for name, reward in rewards.items():
        score, grad = reward_gradient(reward, pixels if reward.space == "pixels" else latents, prompts, text_emb,
                                      generator)
        grad = grad.float() if normalize == "none" else normalize_gradient(grad.float(), normalize)
        grads[reward.space] += weights[name] * grad
        scores[getattr(reward, "log_as", name)] = score  # (B,), for the log
    return grads["pixels"], grads["latents"], scores

# -----------------------------------------------------------------------------------------------------------
# Regularizers. The Fig. 11 caption names the first (without it, reward hacking); 2-4 are by others' reading or ours.
#   1. weight regularization  lambda ||theta - theta_0||^2, the anchor to theta_0 (our reading: squared L2, in the loss)
#   2. LoRA, a low-rank update, is a constraint (third-party summary); our choice, as it also saves memory
#   3. random eta (Figs. 5, 9), a regularizer per a third-party summary: generate(random_eta=True)
#   4. our reading: per-reward gradient normalization and several complementary rewards (the composition)
# Then the set-up the step reads: Models, and set_up_r0 that makes them (theta trainable, the rest frozen).

def make_trainable(unet, cfg, device, frozen_dtype):
    """theta and theta_0. Returns the frozen copy theta_0 (full fine-tuning) or None (LoRA)."""
    if cfg.lora_rank > 0:  # theta = theta_0 + scaling B @ A, so theta_0 is the frozen base itself (no copy)
        # our choice (as diffusers' LoRA script): attention projections, alpha = rank, B = 0 at init, fp32 adapters
        from peft import LoraConfig
        torch.manual_seed(cfg.seed)  # the adapters' init depends on the seed alone
        cast(unet.requires_grad_(False), device, frozen_dtype)
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for p in trainable_parameters(unet):
            p.data = p.data.float()
        return None
    # full fine-tuning: theta in fp32, and theta_0 a frozen fp32 copy (the anchor is exactly 0 at step 0)
    cast(unet, device, torch.float32)
    return copy.deepcopy(unet).requires_grad_(False).eval()

def trainable_parameters(unet):  # LoRA's adapters, or every UNet weight
    return [p for p in unet.parameters() if p.requires_grad]

def lora_layers(unet):  # [(lora_A (r,in), lora_B (out,r), scaling)] of every LoRA layer of the UNet
    from peft.tuners.lora import LoraLayer
    return [(m.lora_A[a].weight, m.lora_B[a].weight, m.scaling[a]) for m in unet.modules() if isinstance(m, LoraLayer)
            for a in m.active_adapters if a in m.lora_A]

def weight_regularization(unet, frozen_unet):
    """||theta - theta_0||^2; lambda is --weight-reg (raise it if grids degrade as rewards rise, lower if they stall)"""
    if frozen_unet is None:  # LoRA: theta - theta_0 is the adapters' scaling B @ A, layer by layer
        total = 0.0
        for A, B, scaling in lora_layers(unet):
            # ||B A||_F^2 = trace(A^T B^T B A) = sum((B^T B) * (A A^T)): two (r,r) matrices, not an (out,in) one
            A, B = A.float(), B.float()
            total = total + scaling ** 2 * ((B.T @ B) * (A @ A.T)).sum()
        return torch.as_tensor(total, dtype=torch.float32)
    # mse_loss keeps no copy of p - p0 for the backward
    return sum(F.mse_loss(p, p0, reduction="sum") for p, p0 in zip(unet.parameters(), frozen_unet.parameters()))

@contextlib.contextmanager
def theta_0(unet, frozen_unet):
    """theta_0 as a UNet: the frozen copy (full fine-tuning), or the LoRA UNet with its adapters off (cfg calls it under
    no_grad, and the adapters are on again for the backward, which recomputes the forward under --grad-checkpointing)"""
    if frozen_unet is None:
        unet.disable_adapters()  # theta = theta_0 + delta W: with delta W off, it *is* theta_0
    try:
        yield unet if frozen_unet is None else frozen_unet
    finally:
        if frozen_unet is None:
            unet.enable_adapters()

def make_base_eps(unet, frozen_unet):  # theta_0's noise estimate for cfg, (N,4,h,w), (N,), (N,77,D) -> (N,4,h,w)
    def base_eps(x, t, emb):
        with theta_0(unet, frozen_unet) as base:
            return base(x, t, encoder_hidden_states=emb).sample
    return base_eps

@dataclasses.dataclass
class Models:  # all that training reads: only the generator's weights move (our reading), the rest is frozen
    tokenizer: object
    text_encoder: object        # frozen
    vae: object                 # frozen
    unet: object                # the generator g_theta, trained in full or through LoRA adapters
    frozen_unet: object         # theta_0, a frozen copy under full fine-tuning (None with LoRA)
    scheduler_config: dict      # the base model's, for the saved pipeline
    alphas_cumprod: torch.Tensor  # (1000,) on the CPU
    rewards: dict               # name -> frozen reward
    reward_weights: dict        # name -> w_i
    device: str

def set_up_r0(tokenizer, text_encoder, vae, unet, scheduler_config, cfg):
    """The pretrained parts -> Models: theta, theta_0, the rewards, the VAE and text encoder frozen (bf16 or fp32)."""
    frozen_dtype = torch.float32 if cfg.precision == "fp32" else torch.bfloat16
    alphas_cumprod = sd15_alphas_cumprod(scheduler_config["beta_start"], scheduler_config["beta_end"])
    for module in (text_encoder, vae):  # the backward passes through the decoder but leaves its weights alone
        cast(module.requires_grad_(False).eval(), cfg.device, frozen_dtype)
    frozen_unet = make_trainable(unet, cfg, cfg.device, frozen_dtype)
    rewards = {}
    for name in cfg.rewards:
        if name == "cfg":  # theta_0 itself, with the empty prompt as unconditional
            uncond = encode_prompts(tokenizer, text_encoder, [""])  # (1,77,D)
            rewards[name] = ImplicitCfgReward(make_base_eps(unet, frozen_unet), uncond, alphas_cumprod.to(cfg.device))
        else:
            rewards[name] = REWARDS[name].load(cfg.tiny, cfg.device, frozen_dtype)
    return Models(tokenizer, text_encoder, vae, unet, frozen_unet, scheduler_config, alphas_cumprod, rewards,
                  dict(cfg.rewards), cfg.device)

# -----------------------------------------------------------------------------------------------------------
# One training step, R0 and R0+. paper (Fig. 12 caption): R0+, with intermediate supervision, is faster.
#    z ~ N(0,I), c --> [UNet step 1] --> ... --> [UNet step K] --> x0_hat --> decode --> x (pixels in [0,1])
#                      \_ R0+ (our reading): steps before k without gradient; x0_hat taken at step k _/
#    g_pix = sum_i w_i g_i / ||g_i|| over the image rewards at x,  g_lat: the CFG reward's at x0_hat
#    surrogate = -(<stopgrad(g_pix), x> + <stopgrad(g_lat), x0_hat>) / B,  loss = surrogate + lambda ||theta-theta_0||^2
#    one backward of the loss through the decoder and every UNet step with gradient, none truncated (our reading)

def r0_step(m, prompts, cfg, generator):
    """One micro-batch of B prompts -> (loss, logged stats). `generator`, a torch.Generator, draws noise, eta, k, t."""
    B, K, h = len(prompts), cfg.steps, cfg.resolution // 8
    text_emb = encode_prompts(m.tokenizer, m.text_encoder, prompts)  # (B,77,D)
    noise = torch.randn((B, 4, h, h), generator=generator, device=m.device)  # z
    # R0+ (our choice): k ~ U{0..K-1} per micro-batch; the rewards read step k's x0_hat and only step k's UNet call is
    # trained (the final image only when k = K-1), so the backward holds one UNet call, not K
    k = int(torch.randint(0, K, (1,), generator=generator, device=m.device)) if cfg.r0_plus else None
    with autocast(m.device, cfg.precision):  # bf16 unless --precision fp32
        x0_hat = generate(m.unet, noise, text_emb, K, m.alphas_cumprod, random_eta=cfg.random_eta, generator=generator,
                          stop_at=k)  # (B,4,h,w): g_theta's output, or under R0+ step k's x0_hat
        pixels = decode(m.vae, x0_hat)  # (B,3,H,W) in [0,1]
        g_pix, g_lat, scores = composed_reward_gradients(m.rewards, m.reward_weights, pixels, x0_hat, prompts,
                                                         text_emb, generator, cfg.normalize)  # like pixels, x0_hat
    # ascent on x in data space, pulled back to theta: d/dtheta = -(1/B) sum_b g_b . dx_b/dtheta (1/B: our choice)
    surrogate = -((g_pix * pixels).sum() + (g_lat * x0_hat).sum()) / B  # its value means nothing, its gradient all
    reg = weight_regularization(m.unet, m.frozen_unet)
    loss = surrogate + cfg.weight_reg * reg
    stats = {name: s.float().mean().item() for name, s in scores.items()}
    stats.update(reg=reg.item(), surrogate=surrogate.item(), **({"k": k} if cfg.r0_plus else {}))  # and R0+'s k
    return loss, stats

def optimizer_step(m, optimizer, params, order, cfg, generator):
    """As nanoGPT's step: micro-batches (p.grad: their mean loss's), clipping, AdamW -> (stats, grad norm, applied)"""
    stats_sum, finite = {}, True
    for _ in range(cfg.grad_accum):
        loss, stats = r0_step(m, order.batch(cfg.batch_size), cfg, generator)  # the next prompts of a shuffled epoch
        stats["loss"] = loss.item()
        finite = finite and all(math.isfinite(v) for v in stats.values())
        if finite:  # from the first non-finite micro-batch on, nothing is backpropagated
            (loss / cfg.grad_accum).backward()
        del loss  # a skipped micro-batch's graph goes now, not beside the next one's
        for key, v in stats.items():  # the micro-batches' mean, and R0+'s last k
            stats_sum[key] = v if key == "k" else stats_sum.get(key, 0.0) + v / cfg.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item() if finite else float("nan")
    applied = finite and math.isfinite(grad_norm)  # a step with a NaN or Inf anywhere is skipped
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients as soon as they are used
    return stats_sum, grad_norm, applied

def make_optimizer(params, cfg):  # our choice: AdamW at decay 0, i.e. Adam (lambda's anchor is the one pull); lr fixed
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=cfg.device.startswith("cuda"))

def train(cfg):  # nanoGPT's order: the models, the optimizer, the run around them, the loop
    from tqdm import tqdm
    prompts = begin_run(cfg)  # Plumbing: the prompt file read, the output folder checked, before minutes of loading
    m = load_models(cfg)  # Plumbing: SD1.5 (or --tiny's twins) and the rewards, through set_up_r0
    params = trainable_parameters(m.unet)  # theta: LoRA's adapters, or every UNet weight
    optimizer = make_optimizer(params, cfg)
    allocate_optimizer_state(optimizer, params)  # Plumbing: AdamW's state now, so that the first step is the heaviest
    run = start_run(cfg, m, optimizer, params, prompts)  # Plumbing: log, grids, a resume's state; the first files
    order, generator = run.order, run.generator  # the prompts in shuffled epochs; the draws of noise, eta, k and t
    with stop_on_signal() as stop:
        bar = tqdm(range(run.start+1, cfg.max_steps+1), initial=run.start, total=cfg.max_steps, dynamic_ncols=True)
        for step in bar:  # step: the optimizer steps done once this one is
            t0 = time.time()
            if cfg.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            # a session's first step is optimizer_step, retried at half the micro-batch if it runs out of GPU memory
            one_step = first_step_fitting_memory if step == run.start + 1 else optimizer_step
            stats, grad_norm, applied = one_step(m, optimizer, params, order, cfg, generator)
            seconds, done = time.time() - t0, step == cfg.max_steps
            measures = progress(run, cfg, step) if step % cfg.sample_every == 0 or done else None  # the PNG grid
            log_step(run, cfg, bar, step, stats, grad_norm, applied, seconds, measures)  # log.jsonl, the bar
            signum = stop.signum  # read once: a signal after this line stops the run after the next step
            if applied and (step % cfg.checkpoint_every == 0 or done or signum is not None):  # never of a skipped step
                run.last_checkpoint = save_checkpoint(run, cfg, step, run.last_checkpoint)
            stop_if_asked(run, cfg, bar, step, signum)  # --max-bad-steps non-finite steps in a row, or a signal
        finish_run(run, cfg)  # a signal now lets the pipeline be written whole
    return m

# ===========================================================================================================
# Plumbing: what the method calls, by topic in train's order: the run, checkpoints, rewards, loading, images, toy, CLI.

def native_bf16(device):  # a GPU with native bf16 (Ampere and newer); CPUs and older GPUs emulate it, slowly
    return str(device).startswith("cuda") and torch.cuda.is_bf16_supported(False)

class UserError(Exception):  # one sentence for a mistake the user can fix (exit 2), or a run stopped on purpose
    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code

# -----------------------------------------------------------------------------------------------------------
# The run, in train's order: set-up, the first step's retry, progress grids, the log, the stop, the end

def begin_run(cfg):  # the prompts; a fresh run refuses a run already in --output-dir, unless --overwrite
    prompts = load_prompts(cfg.prompts)
    if cfg.resume_checkpoint is None:
        existing = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.output_dir, f))]
        if existing and not cfg.overwrite:
            raise UserError(f"{cfg.output_dir} already holds a run ({', '.join(existing)}); continue it with --resume "
                            f"{cfg.output_dir}, replace it with --overwrite, or choose another --output-dir.")
        check_writable(cfg.output_dir, "--output-dir")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return prompts

def allocate_optimizer_state(optimizer, params):
    """AdamW's state (2 fp32 copies) from a no-op zero-gradient step, so step 1's OOM retry covers the heaviest step"""
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

class PromptOrder:  # the prompts c in shuffled epochs, checkpointed so that a resume draws what the run would
    def __init__(self, prompts, seed):
        self.prompts, self.rng, self.queue = prompts, random.Random(seed), []
    def batch(self, n):
        while len(self.queue) < n:  # the next shuffled epoch, behind what is left of this one
            self.queue = self.rng.sample(self.prompts, len(self.prompts)) + self.queue
        return [self.queue.pop() for _ in range(n)]
    def state_dict(self):
        return {"rng": self.rng.getstate(), "queue": list(self.queue)}
    def load_state_dict(self, state):
        self.rng.setstate(state["rng"])
        self.queue = list(state["queue"])

@dataclasses.dataclass
class Run:  # the loop's state around the step, made by start_run
    m: Models
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # every draw of a step: noise, eta, R0+'s k, the CFG reward's t
    order: PromptOrder          # the training prompts in shuffled epochs
    grid: tuple                 # (prompts, seeds) of the progress grid
    base: torch.Tensor          # theta_0's images of the grid (the toy's: of held_out), for content_kept
    held_out: tuple             # the toy's (seen, unseen) colour prompts, or None
    prompts_hash: str           # the prompt file and the frozen models, which a resume must find again
    fingerprint: list
    log_path: str               # <out>/log.jsonl, a JSON line a step
    summary_path: str           # <out>/summary.json, the measures before and after
    start: int = 0              # the step this session starts after (a resume's checkpoint)
    last_checkpoint: str = None
    summary: dict = dataclasses.field(default_factory=dict)
    measures: dict = dataclasses.field(default_factory=dict)  # the last progress grid's
    bad_steps: int = 0          # non-finite steps in a row
    write_failed: bool = False  # a full disk, said once

def start_run(cfg, m, optimizer, params, prompts):
    """The Run around the step, a resume's checkpoint loaded; set-up has failed or worked before --overwrite deletes"""
    if long := sum(len(ids) > 77 for ids in m.tokenizer(prompts, truncation=False, verbose=False).input_ids):
        print(f"warning: {long} of {len(prompts)} prompts are longer than CLIP's 77-token limit (SD1.5 truncates).")
    train_prompts, held_out = toy_split(cfg, prompts)
    n = min(cfg.num_sample_prompts, len(prompts))  # the progress grid: n prompts spread over the file x fixed seeds
    fixed = [prompts[round(i * (len(prompts) - 1) / max(n - 1, 1))] for i in range(n)]
    grid = [p for p in fixed for _ in range(cfg.num_sample_seeds)], [*range(cfg.num_sample_seeds)] * n
    with theta_0(m.unet, m.frozen_unet) as base_unet:  # the base model's images of the same prompts and seeds
        base_m = dataclasses.replace(m, unet=base_unet)
        base_images = (held_out_images(base_m, cfg, held_out[0] + held_out[1]) if held_out else
                       sample_images(base_m, *grid, cfg.steps, cfg.resolution, cfg.precision))
    os.makedirs(cfg.output_dir, exist_ok=True)
    for f in RUN_FILES if cfg.resume_checkpoint is None else ():  # only --overwrite gets here with them present
        if os.path.exists(path := os.path.join(cfg.output_dir, f)):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    run = Run(m, optimizer, torch.Generator(cfg.device).manual_seed(cfg.seed), PromptOrder(train_prompts, cfg.seed),
              grid, base_images, held_out, hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
              frozen_fingerprint(m), os.path.join(cfg.output_dir, "log.jsonl"),
              os.path.join(cfg.output_dir, "summary.json"), last_checkpoint=cfg.resume_checkpoint)
    if cfg.resume_checkpoint:
        run.start = load_checkpoint(run, cfg)
        kept = [json.dumps(r) + "\n" for r in read_log(run.log_path) if r["step"] <= run.start]  # the rest is redone
        write_atomic(run.log_path, "".join(kept))
        run.summary = json.load(open(run.summary_path)) if os.path.exists(run.summary_path) else {}
        print(f"resumed from {cfg.resume_checkpoint} (step {run.start})" + (" (at --max-steps already: the pipeline "
              "and summary are written again; raise --max-steps to train on)" if run.start >= cfg.max_steps else ""))
    print(f"R0{'+' * cfg.r0_plus} | {f'LoRA rank {cfg.lora_rank}' if cfg.lora_rank else 'full fine-tuning'} | "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable | rewards {m.reward_weights} | {cfg.steps} steps | "
          f"{cfg.device} | batch {cfg.batch_size} x accumulation {cfg.grad_accum} = {cfg.batch_size * cfg.grad_accum}")
    write_config(cfg)
    if run.start == 0:
        run.summary["before"] = progress(run, cfg, 0)  # the 'before' grid, and its measures
        write_or_warn(run, run.summary_path, write_atomic, run.summary_path, json.dumps(run.summary, indent=2))
    return run

def first_step_fitting_memory(m, optimizer, params, order, cfg, generator):
    """optimizer_step for a session's first step, as heavy as any (AdamW's state exists). Out of GPU memory it retries
    at half the micro-batch (odd: 1), more accumulation: same prompts, other draws (--normalize batch: other norms)."""
    draws = (generator.get_state(), order.state_dict())
    while True:
        with contextlib.suppress(torch.OutOfMemoryError):
            return optimizer_step(m, optimizer, params, order, cfg, generator)
        m.unet.zero_grad(set_to_none=True)  # out here the traceback, which holds the activations, is gone
        torch.cuda.empty_cache()
        if cfg.batch_size == 1:
            raise UserError("out of GPU memory at --batch-size 1, the smallest micro-batch; use --r0-plus (one UNet "
                            "call in the graph), fewer rewards, a lower --lora-rank or --resolution, or a larger GPU.")
        half = cfg.batch_size // 2 if cfg.batch_size % 2 == 0 else 1  # an odd batch: micro-batches of 1
        cfg.batch_size, cfg.grad_accum = half, cfg.grad_accum * (cfg.batch_size // half)
        print(f"out of GPU memory: retrying with --batch-size {half} --grad-accum {cfg.grad_accum} (same prompts)")
        generator.set_state(draws[0])  # the step starts again from its first draw
        order.load_state_dict(draws[1])
        write_config(cfg)  # a --resume continues with the batch that fits

def write_config(cfg):  # <out>/config.json, the resolved config that a resume starts from
    try:
        write_atomic(os.path.join(cfg.output_dir, "config.json"),
                     json.dumps({k: v for k, v in vars(cfg).items() if k in OPTIONS}, indent=2))
    except OSError as err:
        raise UserError(f"could not write {cfg.output_dir}/config.json ({err.strerror}); free some disk space.")

def progress(run, cfg, step):  # <out>/samples/step_NNNNNN.png and its measures (content_kept, or toy_measures)
    images = sample_images(run.m, *run.grid, cfg.steps, cfg.resolution, cfg.precision)
    path = os.path.join(cfg.output_dir, "samples", f"step_{step:06d}.png")
    write_or_warn(run, path, save_grid, images, path, cfg.num_sample_seeds, captions=run.grid[0])
    run.measures = (toy_measures(run.m, cfg, *run.held_out, run.base) if run.held_out else
                    {"content_kept": content_kept(images, run.base)})
    return run.measures

def log_step(run, cfg, bar, step, stats, grad_norm, applied, seconds, measures):  # log.jsonl's line, the bar
    record = dict(step=step, **stats, grad_norm=grad_norm, lr=cfg.lr, seconds=seconds,
                  peak_mem_gb=peak_memory_gb(cfg.device), **({"measures": measures} if measures else {}))
    run.bad_steps = 0 if applied else run.bad_steps + 1  # non-finite steps in a row
    if not applied:
        record["skipped"] = "non-finite loss, reward or gradient"
        print(f"step {step}: {record['skipped']}; skipped ({run.bad_steps}/{cfg.max_bad_steps} in a row)")
    write_or_warn(run, run.log_path, append_line, run.log_path, json.dumps(record))  # one JSON line a step
    if measures:
        write_or_warn(run, f"{cfg.output_dir}/curves.png", write_curves, cfg.output_dir, run.summary)
    shown = stats | {k: v for k, v in run.measures.items() if k in ("colour_accuracy", "content_kept")}
    bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if k not in ("loss", "surrogate")} | {"s/it": seconds})

def peak_memory_gb(device):  # CUDA's peak allocated memory (reset every step), or a CPU process's peak RSS
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

def stop_if_asked(run, cfg, bar, step, signum):  # after too many non-finite steps, or on a signal (once checkpointed)
    if run.bad_steps >= cfg.max_bad_steps:
        raise UserError(f"stopped at step {step} after {run.bad_steps} steps in a row with non-finite values "
                        f"(NaN/Inf); the last good checkpoint is {run.last_checkpoint or 'none yet'}. "
                        "Lower --lr or check the rewards, then --resume.", exit_code=3)
    if signum is not None and step < cfg.max_steps:
        bar.close()
        raise UserError(f"interrupted at step {step}; checkpoint {run.last_checkpoint or 'none yet'}. Continue with: "
                        f"python r0.py --resume {cfg.output_dir}", exit_code=128 + signum)

def finish_run(run, cfg):  # the measures before -> after, a diffusers pipeline of the generator, the summary
    out, summary = cfg.output_dir, run.summary
    summary["after"] = after = run.measures or progress(run, cfg, cfg.max_steps)  # (the last grid's, if any)
    before = summary.get("before", {})
    if run.held_out:
        print(toy_report(before, after, len(run.held_out[1])))
    print(f"content kept (correlation with the base model's images; no reward scores it): {after['content_kept']:.1%}")
    try:
        save_pipeline(run.m, cfg)
        write_atomic(run.summary_path, json.dumps(summary, indent=2))
    except (OSError, RuntimeError) as err:  # a full disk; the last checkpoint holds the trained weights
        raise UserError(f"could not write {out}/pipeline or its summary ({getattr(err, 'strerror', None) or err}); the "
                        f"trained weights are in {run.last_checkpoint or 'no checkpoint'}: free some disk space, then "
                        f"python r0.py --resume {out} writes them.", exit_code=1)
    lora = f", LoRA weights in {out}/lora" if cfg.lora_rank else ""
    print(f"done: grids in {out}/samples, curves in {out}/curves.png, diffusers pipeline in {out}/pipeline{lora}; "
          f"checkpoints, log.jsonl and summary.json in {out}")

# -----------------------------------------------------------------------------------------------------------
# Checkpoints, resume, interrupts, full disks

RESUMABLE_CHANGES = {"max_steps", "sample_every", "num_sample_prompts", "num_sample_seeds", "checkpoint_every",
                     "keep_checkpoints", "max_bad_steps", "device", "grad_checkpointing", "prompts", "resume",
                     "overwrite", "output_dir"}  # none touches the optimization (--device: only another GPU)
RUN_FILES = ("config.json", "log.jsonl", "summary.json", "curves.png", "checkpoints", "samples", "pipeline", "lora")

def frozen_fingerprint(m):  # the sum of |w| per frozen module (theta_0, VAE, ...), which a resume must find again
    modules = [m.unet if m.frozen_unet is None else m.frozen_unet, m.text_encoder, m.vae, *m.rewards.values()]
    return [sum(p.detach().double().abs().sum().item() for p in module.parameters() if not p.requires_grad)
            for module in modules if isinstance(module, torch.nn.Module)]

def checkpoint_files(out_dir):  # a run's finished checkpoints, oldest first
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_" + "[0-9]" * 6 + ".pt")))

def save_checkpoint(run, cfg, step, last):
    """<out>/checkpoints/step_NNNNNN.pt: all an exact resume needs, written then renamed; --keep-checkpoints prunes"""
    state = {"step": step, "config": vars(cfg), "prompts_sha256": run.prompts_hash, "fingerprint": run.fingerprint,
             "trainable": {n: p.detach().cpu() for n, p in run.m.unet.named_parameters() if p.requires_grad},
             "optimizer": run.optimizer.state_dict(), "threads": torch.get_num_threads(),
             "rng": {"generator": run.generator.get_state(), "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state(cfg.device) if cfg.device.startswith("cuda") else None,
                     "python_rng": random.getstate(), "order": run.order.state_dict()}}
    path = os.path.join(cfg.output_dir, "checkpoints", f"step_{step:06d}.pt")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, path + ".tmp")  # a full disk: OSError, or RuntimeError from torch's zip writer
        os.replace(path + ".tmp", path)
        for old in checkpoint_files(cfg.output_dir)[: -cfg.keep_checkpoints]:
            os.remove(old)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        why = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise UserError(f"could not write checkpoint {path} ({why}); stopped, so that no more training is lost: the "
                        f"last checkpoint is {last or 'none'}. Free some disk space, then python r0.py --resume "
                        f"{cfg.output_dir}", exit_code=1)
    return path

def load_checkpoint(run, cfg):  # cfg.resume_checkpoint into a freshly set-up run, returning its step
    state = load_tensors(cfg.resume_checkpoint, "r0.py checkpoint")
    if state["prompts_sha256"] != run.prompts_hash:  # the saved order would index into other prompts
        raise UserError(f"the prompts in {cfg.prompts} differ from those the run was trained on; resume "
                        "with the same prompt file, or start a new run.")
    saved = state.get("fingerprint")  # (none before it existed)
    if saved and not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(saved, run.fingerprint, strict=True)):
        raise UserError(f"the frozen models (theta_0, VAE, text encoder, rewards) differ from {cfg.output_dir}'s: "
                        "another snapshot of --model, or --tiny's models rebuilt on another machine or thread count "
                        f"(the run had OMP_NUM_THREADS={state['threads']}); resume where it trained, or start anew.")
    if set(state["trainable"]) != {n for n, p in run.m.unet.named_parameters() if p.requires_grad}:
        raise UserError(f"{cfg.resume_checkpoint}'s trained weights are not this UNet's trainable ones (another peft "
                        "or diffusers names them otherwise); resume with the versions that saved it, or start anew.")
    run.m.unet.load_state_dict(state["trainable"], strict=False)  # the trainable tensors only (LoRA: the adapters)
    run.optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"] if "rng" in state else state["ranks"][0]  # (older r0.py: one state per process, "ranks")
    run.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_rng"])
    if isinstance(rng["cuda_rng"], torch.Tensor) and cfg.device.startswith("cuda"):  # (older runs: a list)
        torch.cuda.set_rng_state(rng["cuda_rng"], cfg.device)
    random.setstate(rng["python_rng"])
    run.order.load_state_dict(rng["order"])
    return state["step"]

@contextlib.contextmanager
def stop_on_signal():  # on SIGINT / SIGTERM: finish the step, checkpoint it if applied, exit (again: at once)
    stop = argparse.Namespace(signum=None)
    def handler(signum, frame):
        if stop.signum is not None:
            os._exit(128 + signum)
        stop.signum = signum
        print("\ninterrupt: finishing this step (or the last writes), then stopping (again: at once).", file=sys.stderr)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

def check_writable(path, flag):  # before minutes of loading, path's nearest existing parent must be writable
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {flag} {path} ({parent} is not a writable folder); choose another.")

def write_atomic(path, text):  # write-then-rename, so a crash or a full disk leaves no half-written file
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")

def append_line(path, line):  # onto log.jsonl, undoing a write cut short (a full disk), so it holds whole lines
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise

def read_log(path):  # log.jsonl's records (a line a crash cut short is skipped)
    records = []
    for line in open(path) if os.path.exists(path) else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records

def write_or_warn(run, what, write, *args, **kwargs):  # a grid, log line or curves.png; a full disk is said once
    try:
        write(*args, **kwargs)
    except OSError as err:
        if not run.write_failed:
            print(f"warning: could not write {what} ({err.strerror or err}); training goes on and writes what it can "
                  "(it stops if a checkpoint cannot be written).")
        run.write_failed = True

# -----------------------------------------------------------------------------------------------------------
# Reward models: loaders and the registry. A new one, PickScore (a transformers CLIPModel), in three parts:
#   class PickScore(torch.nn.Module):                         # the reward interface ("Rewards", above)
#       space = "pixels"
#       def __init__(self, model, tokenizer):                 # a transformers CLIPModel (frozen), CLIP's tokenizer
#           super().__init__()
#           self.model, self.tokenizer = model.requires_grad_(False).eval(), tokenizer
#       def forward(self, pixels, prompts, text_emb=None):
#           ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
#           with torch.no_grad():                             # transformers 5 returns outputs, hence .pooler_output
#               text = self.model.get_text_features(input_ids=ids.input_ids.to(pixels.device)).pooler_output
#           with autocast_off(pixels.device):                 # in the frozen model's own dtype, as clip_score
#               img = self.model.get_image_features(pixel_values=clip_preprocess(pixels).to(self.model.dtype))
#           return F.cosine_similarity(img.pooler_output.float(), text.float(), dim=-1)   # (B,), no logit scale
#       def enable_gradient_checkpointing(self):              # what --grad-checkpointing calls
#           checkpoint_transformers_layers(self.model)
#   def load_pickscore(tiny, device, dtype):                  # beside load_clip_family
#       from transformers import CLIPConfig, CLIPModel
#       if tiny:                                              # a random twin of CLIP's shapes, for --tiny
#           tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
#           model = CLIPModel(CLIPConfig(text_config=tower, vision_config=dict(tower, patch_size=32)))
#       else:                                                 # its hub files, cached or fetched, in one folder
#           paths = [hub_file("pickscore", download) for download in REWARDS["pickscore"].downloads]
#           model = CLIPModel.from_pretrained(os.path.dirname(paths[0]))
#       return cast(PickScore(model, sd15_tokenizer_offline()), device, dtype)  # CLIP's BPE, as PickScore's
#   REWARDS["pickscore"] = Reward(load_pickscore, [("PickScore config", "yuvalkirstain/PickScore_v1", ("config.json",)),
#                                 ("PickScore weights", "yuvalkirstain/PickScore_v1", ("model.safetensors",))], 100)

@dataclasses.dataclass
class Reward:
    load: object            # (tiny, device, dtype) -> the reward; None for cfg, which set_up_r0 builds from theta_0
    downloads: list = ()    # [(what, hub repo, files)] per file needed; any of `files` will do, and [0] is fetched
    scale: float = 1.0      # sample.py's tables report scale x score (100 x a cosine, our reading of Table 1)

def preference_head(dim):  # ImageReward's MLP and sample.py's aesthetic one: no activations; dropouts keep indices
    L, D = torch.nn.Linear, torch.nn.Dropout
    return torch.nn.Sequential(L(dim, 1024), D(0.2), L(1024, 128), D(0.2), L(128, 64), D(0.1), L(64, 16), L(16, 1))

def checkpoint_transformers_layers(model):
    """Checkpointing a frozen transformers model layer by layer: a layer checkpoints only while .training is set."""
    import torch.utils.checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer
    for layer in (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
        layer.gradient_checkpointing, layer.training = True, True  # the layer alone: its dropouts stay in eval
        layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

def load_clip_family(name, tiny, device, dtype):  # open_clip ViT-H-14 with HPS v2.1's or CLIP score's weights
    import open_clip
    tokenizer = open_clip.get_tokenizer("ViT-H-14")  # open_clip's bundled BPE: no download
    if tiny:
        return ClipFamilyReward(cast(build_tiny_clip_tower(1 if name == "hps" else 2)[0], device, dtype), tokenizer)
    path = hub_file(name, REWARDS[name].downloads[0])  # open_clip is handed the file: it never goes to the network
    print(f"{name}: open_clip ViT-H-14 with the weights of {path}")
    if name == "clip":
        model = open_clip.create_model("ViT-H-14", pretrained=path)
    else:  # HPS v2.1 is a full fine-tune of ViT-H-14, saved as a training checkpoint under 'state_dict'
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        missing, _ = model.load_state_dict(load_tensors(path, "HPS v2.1 checkpoint")["state_dict"], strict=False)
        if missing:
            raise UserError(f"{path} does not fit open_clip's ViT-H-14 (missing {missing[:3]}...); re-download it.")
    return ClipFamilyReward(cast(model, device, dtype), tokenizer)

def load_imagereward(tiny, device, dtype):
    """ImageReward.pt on BLIP's towers. The tiny twin is random and reads CLIP's tokens (BERT's are a download)."""
    if tiny:
        with torch.random.fork_rng():
            torch.manual_seed(3)
            reward = ImageRewardReward(*imagereward_configs("tiny"), sd15_tokenizer_offline())
    else:
        from transformers import BertTokenizer
        weights, vocab = (hub_file("imagereward", download) for download in REWARDS["imagereward"].downloads)
        tokenizer = BertTokenizer(vocab)  # bert-base-uncased plus BLIP's two tokens, as ImageReward
        tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        reward = ImageRewardReward(*imagereward_configs("full"), tokenizer)
        reward.load_state_dict(imagereward_key_map(load_tensors(weights, "ImageReward checkpoint")))
        print(f"imagereward: BLIP ViT-L + BERT with the weights of {weights}")
    cast(reward, device, dtype).mlp.float()  # the head in fp32, as ImageReward computes it
    return reward

# ImageReward.pt's keys -> ImageRewardReward's, one rule each (full matches, in order)
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
# never read by the score: BLIP's contrastive projections, and the text positions (a buffer)
IMAGEREWARD_UNUSED_KEYS = {"blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                           "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"}

def imagereward_key_map(state):  # ImageReward.pt's state dict -> ImageRewardReward's; an unknown key is refused
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
    """(BlipVisionConfig, BlipTextConfig) of ImageReward ('full') or a tiny twin; every number given (BLIP's differ)."""
    from transformers import BlipTextConfig, BlipVisionConfig
    full = size == "full"
    vision = BlipVisionConfig(  # BLIP's ViT-L/16 at 224
        hidden_size=1024 if full else 64, intermediate_size=4096 if full else 256, num_hidden_layers=24 if full else 2,
        num_attention_heads=16 if full else 2, image_size=224, patch_size=16 if full else 32, hidden_act="gelu",
        layer_norm_eps=1e-6, initializer_range=0.02)
    text = BlipTextConfig(  # med_config.json: BERT-base, 30522 + [DEC] + [ENC] tokens (the tiny twin: CLIP's 49408)
        vocab_size=30524 if full else 49408, hidden_size=768 if full else 32, intermediate_size=3072 if full else 64,
        num_hidden_layers=12 if full else 2, num_attention_heads=12 if full else 2,
        max_position_embeddings=512 if full else 64, encoder_hidden_size=vision.hidden_size, hidden_act="gelu",
        layer_norm_eps=1e-12, pad_token_id=0, is_decoder=True)  # is_decoder: builds the cross-attention
    return vision, text

REWARDS = {  # name -> Reward, in the order of --help and of sample.py's tables
    "hps": Reward(functools.partial(load_clip_family, "hps"), [("HPS v2.1 weights", "xswu/HPSv2",
                                                                ("HPS_v2.1_compressed.pt",))], 100),
    "clip": Reward(functools.partial(load_clip_family, "clip"), [(
        "CLIP-score weights (ViT-H-14 laion2b_s32b_b79k)", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))], 100),
    "imagereward": Reward(load_imagereward, [("ImageReward weights", "THUDM/ImageReward", ("ImageReward.pt",)), (
        "tokenizer of ImageReward (bert-base-uncased)", "google-bert/bert-base-uncased", ("vocab.txt",))]),
    "cfg": Reward(None),
    "color": Reward(lambda tiny, device, dtype: ColourReward()),
    "bright": Reward(lambda tiny, device, dtype: BrightnessReward()),
    "proxy": Reward(lambda tiny, device, dtype: cast(copy.deepcopy(fit_proxy(0)), device, dtype)),
    "proxy_b": Reward(lambda tiny, device, dtype: cast(copy.deepcopy(fit_proxy(1)), device, dtype)),  # other textures
}

def parse_rewards(spec):  # 'hps=1.0,clip=0.5' -> {'hps': 1.0, 'clip': 0.5}, and 'hps' alone means 1.0
    weights = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if name not in REWARDS:
            raise UserError(f"unknown reward '{name}' in --rewards; choose from {', '.join(REWARDS)} (e.g. --rewards "
                            "hps=1.0,clip=1.0).")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0 or name in weights:
            problem = "appears twice" if name in weights else f"has weight '{value}', not a number >= 0"
            raise UserError(f"reward '{name}' {problem} in --rewards; give each reward once, e.g. {name}=1.0.")
        weights[name] = weight
    if not weights or sum(weights.values()) == 0:
        raise UserError("--rewards names no reward with a positive weight; e.g. --rewards hps=1.0,clip=1.0.")
    return weights

# -----------------------------------------------------------------------------------------------------------
# Loading: files from the hub, SD1.5, and the tiny twins built in code for --tiny and the tests

def load_tensors(path, what):
    """torch.load that cannot run code (weights_only): a tampered file is refused before any code runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch names what it refused: "... GLOBAL posix.system ..."
        refused = next(iter(re.findall(r"GLOBAL ([\w.]+)", str(err))), "an object")
        raise UserError(f"{path} is not a plain {what}: it holds {refused}, and a Python object could run code when "
                        "loaded, so it was refused unread; use a file from a source you trust.")
    except (RuntimeError, EOFError) as err:  # truncated, or not a torch file
        raise UserError(f"{path} is not a readable {what} ({str(err).splitlines()[0][:100]}); use an intact copy.")

def in_cache(repo, filename):  # the cached hub file's local path, or None; never touches the network
    from huggingface_hub import try_to_load_from_cache
    path = try_to_load_from_cache(repo, filename)
    return path if isinstance(path, str) else None

def hub_unreachable():  # HF_HUB_OFFLINE=1, set where there is no network: the cache alone, no minutes of retries
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")

def from_hub(load, what, how):  # load(local_files_only), any failure (not cached, offline, gated) in one sentence
    try:  # (with network, the libraries use the cache and check it for updates)
        return load(hub_unreachable())
    except Exception as err:
        raise UserError(f"could not load {what} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); {how}")

def hub_file(name, download):  # the local path of one of REWARDS[name].downloads, from the cache or the hub
    from huggingface_hub import hf_hub_download
    what, repo, files = download
    for f in files:
        if cached := in_cache(repo, f):
            return cached
    return from_hub(lambda local: hf_hub_download(repo, files[0], local_files_only=local), f"the {what} ({repo})",
                    f"pre-download it (hf download {repo} {files[0]}), leave {name} out (of --rewards, or "
                    "sample.py's --score-with), or run offline with --tiny.")

# what r0.py loads of an SD1.5 repo: 4.3 GB of its 47 GB (no .ckpt, .bin or fp16 copies); one pattern per flag
SD15_PARTS = ('--include "model_index.json" --include "scheduler/*" --include "tokenizer/*" --include "text_encoder/*" '
              '--include "vae/*" --include "unet/*" --exclude "*.bin" --exclude "*.fp16.*" --exclude "*non_ema*"')

def check_downloads(model, downloads, also_missing=()):
    """Before anything loads, offline: one sentence names every missing download and its command."""
    missing = list(also_missing)
    if model and not os.path.isdir(model) and not in_cache(model, "model_index.json"):
        missing.insert(0, f"the SD1.5 model '{model}' (hf download {model} {SD15_PARTS})")
    missing += [f"the {what} (hf download {repo} {files[0]})" for what, repo, files in downloads
                if not any(in_cache(repo, f) for f in files)]
    if missing and hub_unreachable():
        raise UserError(f"the Hugging Face hub is unreachable and the local cache lacks {'; '.join(missing)}; download "
                        f"{'them' if len(missing) > 1 else 'it'} on a machine with network into the same cache "
                        "(HF_HOME), or run offline with --tiny.")

def load_sd15(model):  # (tokenizer, text_encoder, vae, unet, scheduler config) of a hub id or diffusers folder
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    how = f"pre-download it (hf download {model} {SD15_PARTS}), pass a diffusers folder as --model, or run with --tiny."
    parts = [from_hub(lambda local: cls.from_pretrained(model, subfolder=sub, local_files_only=local),
                      f"the {sub} of '{model}'", how) for cls, sub in
             ((CLIPTokenizer, "tokenizer"), (CLIPTextModel, "text_encoder"), (AutoencoderKL, "vae"),
              (UNet2DConditionModel, "unet"), (DDIMScheduler, "scheduler"))]
    return (*parts[:4], dict(parts[4].config))  # the hub's scheduler config (PNDM's), as DDIMScheduler reads it

def check_sd15_shaped(text_encoder, vae, unet, scheduler_config):
    """Refuse models this file cannot train, in one sentence (SDXL, SD2's v-prediction, another noise schedule)."""
    c = scheduler_config  # sd15_alphas_cumprod rebuilds the schedule from beta_start and beta_end only
    if c.get("prediction_type", "epsilon") != "epsilon" or c.get("beta_schedule") != "scaled_linear" or \
            c.get("num_train_timesteps") != 1000 or c.get("trained_betas") or c.get("rescale_betas_zero_snr") or \
            unet.config.in_channels != 4 or vae.config.latent_channels != 4 or unet.config.addition_embed_type or \
            unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise UserError("the base model is not SD1.5-shaped: R0's generator needs an epsilon-prediction UNet of 4 "
                        "latent channels on one CLIP text encoder, and SD1.5's noise schedule (scaled_linear, 1000 "
                        "steps, no trained_betas or rescale_betas_zero_snr); pass an SD1.5 model.")

def load_models(cfg):  # --model's weights, or the tiny twins, set up by set_up_r0
    if cfg.tiny:
        tokenizer, text_encoder, vae, unet = build_tiny_sd15(seed=cfg.seed)
        scheduler_config = dict(SD15_SCHEDULER_CONFIG)
    else:  # offline, every missing download is named in one sentence before anything loads
        check_downloads(cfg.model, [d for name in cfg.rewards for d in REWARDS[name].downloads])
        tokenizer, text_encoder, vae, unet, scheduler_config = load_sd15(cfg.model)
    check_sd15_shaped(text_encoder, vae, unet, scheduler_config)
    m = set_up_r0(tokenizer, text_encoder, vae, unet, scheduler_config, cfg)
    if towers := [name for name in m.rewards if cfg.tiny and REWARDS[name].downloads]:
        print(f"note: --tiny builds {', '.join(towers)} as tiny towers with random weights, not the real reward "
              "models: training against them checks the code path, not image quality.")
    for module in (m.unet, m.vae, *m.rewards.values()) if cfg.grad_checkpointing else ():  # compute for memory
        if hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
    return m

# the tiny UNet / VAE / text encoder: SD1.5's block types and interfaces, widths that run in seconds on a CPU
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,  # 4 blocks: 8x
                block_out_channels=(8, 8, 16, 16), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215, mid_block_add_attention=False)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=49406,
                 eos_token_id=49407, pad_token_id=49407)
SD15_SCHEDULER_CONFIG = dict(  # SD1.5's (the hub's, PNDM's), which any diffusers scheduler reads
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1, clip_sample=False, skip_prk_steps=True)

def sd15_tokenizer_offline():
    """SD1.5's CLIP tokenizer rebuilt offline from open_clip's BPE (49408 tokens, pad = eos = 49407)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = [s + end for end in ("", "</w>") for s in bytes_to_unicode().values()]
    vocab += ["".join(m.split()) for m in merges]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({token: i for i, token in enumerate(vocab + ["<|startoftext|>", "<|endoftext|>"])}, f)
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        # positional paths: a wrong keyword silently gives a 2-token tokenizer
        tokenizer = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                                  pad_token="<|endoftext|>", model_max_length=77)
    assert len(tokenizer) == 49408 and tokenizer.pad_token_id == 49407
    return tokenizer

def build_tiny_sd15(seed=0):  # fresh copies of the tiny SD1.5 (tokenizer, text_encoder, vae, unet), built once
    return copy.deepcopy(_build_tiny_sd15(seed))

@functools.lru_cache(maxsize=2)
def _build_tiny_sd15(seed):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.random.fork_rng():  # the global RNG is left as it was
        torch.manual_seed(seed)
        unet, vae = UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
        tokenizer = sd15_tokenizer_offline()
        prompts = ["a photo", "a red fox", "a blue car", "a green tree"]  # conditions it learns to ignore
        pretrain_tiny(vae, unet, encode_prompts(tokenizer, text_encoder, prompts), seed)
    return tokenizer, text_encoder, vae, unet

def pretrain_tiny(vae, unet, text_emb, seed):
    """our choice: miniature pretrainings so the toy starts where R0 does: the decoder learns SD1.5's latent-to-colour
    map (a random one paints gray), the UNet to denoise, ignoring the text (the reward's to teach); thread-dependent."""
    alphas_cumprod, h, g = sd15_alphas_cumprod(), unet.config.sample_size, torch.Generator()

    def decoder_loss(batch=8):  # textures plus a per-image colour, uniform over the RGB cube
        rgb = torch.rand((batch, 3), generator=g) * 2 - 1  # (B,3) in [-1,1]
        z = torch.randn((batch, 4, h, h), generator=g) + (rgb @ torch.linalg.pinv(LATENT_RGB)).view(batch, 4, 1, 1)
        target = F.interpolate(torch.einsum("bchw,cd->bdhw", z, LATENT_RGB).clamp(-1, 1), scale_factor=8,
                               mode="bilinear")  # (B,3,8h,8w), SD1.5's latent-to-RGB map
        return F.mse_loss(vae.decode(z / vae.config.scaling_factor).sample, target)

    def denoiser_loss(batch=16):  # the DDPM loss on toy data z0 ~ N(0, I)
        z0, eps = torch.randn((2, batch, 4, h, h), generator=g)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        c = text_emb[torch.randint(0, len(text_emb), (batch,), generator=g)]
        return F.mse_loss(unet(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=c).sample, eps)
    g.manual_seed(seed)
    fit([*vae.decoder.parameters(), *vae.post_quant_conv.parameters()], decoder_loss, steps=400, lr=1e-2)
    g.manual_seed(seed)
    fit(list(unet.parameters()), denoiser_loss, steps=60, lr=3e-3)

def fit(params, loss, steps, lr):  # a few Adam steps on loss(), leaving no gradients behind
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)

def build_tiny_clip_tower(seed=0):  # a tiny random open_clip CLIP of ViT-H-14's classes, and its tokenizer
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(
            embed_dim=32, vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=32, image_size=224),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
    return model, open_clip.get_tokenizer("ViT-H-14")

# -----------------------------------------------------------------------------------------------------------
# Prompts, images, the saved pipeline

def load_prompts(path):  # a UTF-8 text file, one prompt a line; '#' comments and blank lines skipped
    if path is None or not os.path.isfile(path):
        what = path and f"prompt file '{path}' " + ("is a directory" if os.path.isdir(path) else "does not exist")
        raise UserError(f"{what or 'no prompt file given'}; pass --prompts with a text file, one prompt a line.")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not text
            prompts = [line.strip() for line in f.read().splitlines() if line.strip() and not line.strip()[0] == "#"]
    except UnicodeDecodeError:
        raise UserError(f"prompt file '{path}' is not UTF-8 text; save it as UTF-8.")
    if not prompts:
        raise UserError(f"prompt file '{path}' holds no prompts (only blank lines or '#' comments); add one a line.")
    return prompts

@torch.no_grad()
def sample_images(m, prompts, seeds, steps, resolution, precision, eta=0.0, batch_size=8):
    """(N,3,H,W) in [0,1], the generator's image of each (prompt, seed). With eta > 0 each draws its own step noise."""
    noise = torch.stack([initial_noise(s, resolution, "cpu") for s in seeds]).to(m.device)  # (N,4,h,w)
    fp32_unet = precision == "bf16" and any(p.dtype == torch.float32 for p in m.unet.parameters())
    batch_size, images = batch_size if eta == 0 else 1, []
    for i in range(0, len(prompts), batch_size):
        gen = torch.Generator(m.device).manual_seed(seeds[i])
        text_emb = encode_prompts(m.tokenizer, m.text_encoder, prompts[i : i + batch_size])
        with autocast(m.device, precision) if fp32_unet else contextlib.nullcontext():
            latents = generate(m.unet, noise[i : i + batch_size], text_emb, steps, m.alphas_cumprod, eta=eta,
                               generator=gen)
        images.append(decode(m.vae, latents))
    return torch.cat(images).cpu()  # one host sync

def initial_noise(seed, resolution, device):  # x_T (4,h,w), drawn on the CPU so a seed's x_T is the same anywhere
    return torch.randn((4, resolution // 8, resolution // 8), generator=torch.Generator().manual_seed(seed)).to(device)

def save_grid(images, path, ncols, captions=None, row_labels=None):  # (N,3,H,W) -> a PNG, captioned
    from PIL import Image, ImageDraw
    if (captions or row_labels) and images.shape[-1] < 128:  # tiny images, upscaled to make room for text
        images = F.interpolate(images, scale_factor=math.ceil(128 / images.shape[-1]), mode="nearest")
    N, _, H, W = images.shape
    captions = [textwrap.wrap(c, max(W // 6 - 1, 1), max_lines=3, placeholder="~") or [""] for c in captions or []]
    cap_h = 2 + 11 * max(map(len, captions)) if captions else 0  # PIL's default font: ~6 px a character, 11 a line
    label_w = 6 * max(map(len, row_labels)) + 8 if row_labels else 0
    grid = Image.new("RGB", (label_w + ncols * W, math.ceil(N / ncols) * (H + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = label_w + i % ncols * W, i // ncols * (H + cap_h)
        grid.paste(Image.fromarray((img.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()), (x, y))
        for line, text in enumerate(captions[i] if captions else []):
            draw.text((x + 2, y + H + 1 + 11 * line), text, fill="black")
    for r, label in enumerate(row_labels or []):
        draw.text((4, r * (H + cap_h) + H // 2 - 6), label, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)

def write_curves(out_dir, summary):
    """<out>/curves.png, 4 panels a row: each number logged per step, then each measure of the progress grids."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    log, before = read_log(os.path.join(out_dir, "log.jsonl")), summary.get("before", {})
    skip = ("step", "loss", "surrogate", "grad_norm", "lr", "seconds", "peak_mem_gb", "skipped", "k", "measures")
    curves = {k: [(r["step"], r[k]) for r in log if k in r] for k in dict.fromkeys(k for r in log for k in r)
              if k not in skip}
    for k in dict.fromkeys(k for r in log for k, v in r.get("measures", {}).items() if isinstance(v, float)):
        curves[k] = ([(0, before[k])] if k in before else []) + [(r["step"], r["measures"][k]) for r in log
                                                                 if k in r.get("measures", {})]
    ncols, nrows = min(len(curves), 4), math.ceil(len(curves) / 4)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax, (key, points) in zip(axes.flat, curves.items()):
        ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, lw=1)
        ax.set(title=key, xlabel="step")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=80)
    plt.close(fig)

def sd_pipeline(tokenizer, text_encoder, vae, unet, scheduler):  # no safety checker, as SD1.5's is another download
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)

def few_step_scheduler(scheduler_config):  # diffusers' twin of generate(eta=0), DDIM trailing with final alpha 1
    from diffusers import DDIMScheduler
    return DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False, thresholding=False, rescale_betas_zero_snr=False)

def merged_unet(unet, base):  # the generator as a plain fp32 diffusers UNet, `base` (full precision) + the change
    base = cast(base.requires_grad_(False), "cpu", torch.float32)
    if not getattr(unet, "peft_config", None):
        base.load_state_dict(unet.state_dict())
        return base
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    base.add_adapter(copy.deepcopy(unet.peft_config["default"]))  # the same targets, rank and scaling
    set_peft_model_state_dict(base, get_peft_model_state_dict(unet))
    base.fuse_lora(lora_scale=1.0)
    base.unload_lora()  # plain diffusers layers, for any pipeline
    return base

def save_pipeline(m, cfg):
    """<out>/pipeline, diffusers' folder with our sampler (few-step DDIM, guidance 1); LoRA runs also write lora/"""
    from diffusers import StableDiffusionPipeline
    tokenizer, text_encoder, vae, base_unet = build_tiny_sd15(cfg.seed) if cfg.tiny else load_sd15(cfg.model)[:4]
    pipe = sd_pipeline(tokenizer, cast(text_encoder, "cpu", torch.float32), cast(vae, "cpu", torch.float32),
                       merged_unet(m.unet, base_unet), few_step_scheduler(m.scheduler_config))
    pipe.save_pretrained(os.path.join(cfg.output_dir, "pipeline"))
    if getattr(m.unet, "peft_config", None):
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(m.unet))
        StableDiffusionPipeline.save_lora_weights(os.path.join(cfg.output_dir, "lora"), unet_lora_layers=lora)

# -----------------------------------------------------------------------------------------------------------
# The toy: rewards a tiny generator learns from on a CPU, and measures of what it learned. color, a smooth form of the
# true rule (colour_accuracy), is unhackable but may wash out content; bright is louder; proxy, learned, is hackable.
# The measures are the colour rule at held-out seeds and prompts, and content_kept, the base model's structure kept.

COLOURS = {  # our choice: typical sRGB renderings of each word
    "red": (0.85, 0.10, 0.10), "orange": (0.95, 0.55, 0.05), "yellow": (0.95, 0.90, 0.15),
    "green": (0.15, 0.65, 0.20), "blue": (0.10, 0.25, 0.85), "purple": (0.50, 0.15, 0.65),
    "pink": (0.95, 0.55, 0.75), "brown": (0.45, 0.28, 0.12), "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95), "gray": (0.50, 0.50, 0.50),
}
_COLOUR_WORD = re.compile(r"\b(" + "|".join([*COLOURS, "grey"]) + r")\b", re.IGNORECASE)
HELD_OUT_SEEDS = range(1000, 1004)  # not the progress grids' seeds; training draws from its --seed stream

def colour_of(prompt):  # the first colour word: 'a red fox in green grass' -> 'red' ('grey' -> 'gray'), or None
    m = _COLOUR_WORD.search(prompt)
    return m.group(1).lower().replace("grey", "gray") if m else None

def dominant_colour(pixels):  # (B,3,H,W) in [0,1] -> the palette word nearest to each image's mean colour
    palette = torch.tensor(list(COLOURS.values()), device=pixels.device)  # (11,3)
    return [list(COLOURS)[i] for i in torch.cdist(pixels.float().mean(dim=(2, 3)), palette).argmin(dim=1).tolist()]

class ColourReward(torch.nn.Module):
    """color: r(x, c) = -||mean_rgb(x) - rgb(colour word of c)||^2, 0 for prompts without one."""
    space = "pixels"
    def forward(self, pixels, prompts, text_emb=None):
        target = torch.tensor([COLOURS.get(colour_of(p), (0, 0, 0)) for p in prompts], device=pixels.device)  # (B,3)
        has_colour = torch.tensor([colour_of(p) is not None for p in prompts], device=pixels.device)
        return -((pixels.mean(dim=(2, 3)) - target) ** 2).sum(-1) * has_colour  # (B,), 0 is perfect

class BrightnessReward(torch.nn.Module):
    """bright: mean luma on 0-255, a reward on a far larger scale than color's, as real rewards differ in scale."""
    space = "pixels"
    def forward(self, pixels, prompts, text_emb=None):
        luma = torch.tensor([0.299, 0.587, 0.114], device=pixels.device).view(1, 3, 1, 1)
        return 255 * (pixels * luma).sum(1).mean(dim=(1, 2))  # (B,)

class ProxyReward(torch.nn.Module):
    """proxy, proxy_b: a learned colour classifier, the toy's stand-in for HPS and ImageReward (learned models with
    blind spots a generator can find): r(x, c) = log p(colour word of c | x), 0 for prompts without one."""
    space = "pixels"
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, len(COLOURS)))

    def forward(self, pixels, prompts, text_emb=None):
        logp = self.net(pixels.to(self.net[0].weight.dtype)).float().log_softmax(-1)  # (B,11)
        wanted = torch.tensor([list(COLOURS).index(colour_of(p) or "red") for p in prompts], device=pixels.device)
        has_colour = torch.tensor([colour_of(p) is not None for p in prompts], device=pixels.device)
        return logp.gather(1, wanted[:, None])[:, 0] * has_colour  # (B,)

    def predict(self, pixels):  # the palette word the proxy sees in each image
        return [list(COLOURS)[i] for i in self.net(pixels.to(self.net[0].weight.dtype)).argmax(-1).tolist()]

@functools.lru_cache(maxsize=2)
def fit_proxy(seed, per_colour=3, steps=600):
    """our choice: 3 textures a colour, 600 Adam steps: few images, unlike the generator's, as HPS's human ratings."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        proxy = ProxyReward()
        labels = torch.arange(len(COLOURS)).repeat_interleave(per_colour)  # (33,)
        colours = torch.tensor(list(COLOURS.values()))[labels].view(-1, 3, 1, 1)
        images = (colours + toy_textures(len(labels), torch.Generator().manual_seed(seed))).clamp(0, 1)  # (33,3,64,64)
        fit(list(proxy.parameters()), lambda: F.cross_entropy(proxy.net(images), labels), steps=steps, lr=1e-2)
    return proxy.requires_grad_(False).eval()

# SD1.5's near-linear map from (scaled) latent channels (rows) to RGB in [-1,1] (columns), as in latent previews
LATENT_RGB = torch.tensor([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
                           [-0.2120, -0.2616, -0.7177]])  # (4,3)

def toy_textures(n, generator, size=64):  # (n,3,size,size) zero-mean, as the tiny decoder paints latent noise
    z = torch.randn((n, 4, size // 8, size // 8), generator=generator)
    rgb = F.interpolate(torch.einsum("bchw,cd->bdhw", z, LATENT_RGB) / 2, size=size, mode="bilinear")
    return rgb - rgb.mean(dim=(2, 3), keepdim=True)

def toy_split(cfg, prompts):  # toy rewards: (prompts less a fifth, (seen, unseen) colour prompts), else (prompts, None)
    if not ({"color", "bright", "proxy", "proxy_b"} & set(cfg.rewards) and any(map(colour_of, prompts))):
        return prompts, None
    unseen = list(held_out_prompts(prompts))
    train_prompts = [p for p in prompts if p not in unseen]
    return train_prompts, ([p for p in train_prompts if colour_of(p)], unseen)

def held_out_prompts(prompts):  # our choice: a fifth of the colour prompts (per colour the 3rd, 8th...), not trained on
    count = {}
    for p in filter(colour_of, prompts):
        count[colour_of(p)] = count.get(colour_of(p), 0) + 1
        if count[colour_of(p)] % 5 == 3:
            yield p

def content_kept(images, base):
    """Mean correlation per image and channel with the base model's image (same prompt and seed); blind to colour."""
    x, y = (t.flatten(2) - t.flatten(2).mean(-1, keepdim=True) for t in (images, base))  # (N,3,HW), centred
    return ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1) + 1e-8)).mean().item()

def held_out_images(m, cfg, prompts, eta=0.0):  # each prompt at each of HELD_OUT_SEEDS: (4 len(prompts),3,H,W)
    return sample_images(m, [p for p in prompts for _ in HELD_OUT_SEEDS], [s for _ in prompts for s in HELD_OUT_SEEDS],
                         cfg.steps, cfg.resolution, cfg.precision, eta)

@torch.no_grad()
def toy_measures(m, cfg, seen, unseen, base, eta=0.0):
    """The toy's measures at held-out seeds: colour_accuracy (the true score, chance 1 in 11) on the training prompts,
    per colour and on held-out ones (_unseen), content_kept against `base`, each reward's mean, proxy accuracy."""
    prompts, images = [p for p in seen + unseen for _ in HELD_OUT_SEEDS], held_out_images(m, cfg, seen + unseen, eta)
    n = len(seen) * len(HELD_OUT_SEEDS)  # the first n: training prompts
    hit = [colour_of(p) == got for p, got in zip(prompts, dominant_colour(images))]
    wanted = [colour_of(p) for p in prompts[:n]]
    out = {"colour_accuracy": sum(hit[:n]) / max(n, 1), "colour_accuracy_unseen": sum(hit[n:]) / max(len(hit) - n, 1),
           "colour_accuracy_per_colour": {c: sum(h for w, h in zip(wanted, hit) if w == c) / wanted.count(c)
                                          for c in sorted(set(wanted))},
           "content_kept": content_kept(images, base),
           "color_held_out": ColourReward()(images[:n], prompts[:n]).mean().item()}
    for name, reward in m.rewards.items():
        if reward.space == "pixels":
            out[f"{name}_held_out"] = reward(images[:n].to(m.device), prompts[:n]).float().mean().item()
        if hasattr(reward, "predict"):
            out[f"{name}_accuracy"] = sum(map(str.__eq__, reward.predict(images[:n].to(m.device)), wanted)) / max(n, 1)
    return out

def toy_report(before, after, n_unseen):  # finish_run's line: toy_measures before -> after training
    before = dict(colour_accuracy=math.nan, colour_accuracy_unseen=math.nan, colour_accuracy_per_colour={}) | before
    colours = [f"{c} {before['colour_accuracy_per_colour'].get(c, math.nan):.0%} -> {v:.0%}"
               for c, v in after["colour_accuracy_per_colour"].items()]
    return (f"colour accuracy on held-out seeds, before -> after (chance: 1 in {len(COLOURS)}): "
            f"{before['colour_accuracy']:.1%} -> {after['colour_accuracy']:.1%} on the training prompts, "
            f"{before['colour_accuracy_unseen']:.1%} -> {after['colour_accuracy_unseen']:.1%} on {n_unseen} prompts "
            f"never trained on; per colour: {', '.join(colours)}")

# -----------------------------------------------------------------------------------------------------------
# Command line

class Parser(argparse.ArgumentParser):  # a mistyped flag in one sentence; no abbreviations (--prompt is not --prompts)
    def error(self, message):
        raise UserError(f"{message}; `python {self.prog} --help` lists every flag.")

def build_parser():  # a flag per OPTIONS entry; only typed flags land in the result (SUPPRESS), and they override all
    p = Parser(prog="r0.py", description="R0: regularized reward maximization for few-step SD1.5 (arXiv 2503.13070)",
               argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for name, (default, what) in OPTIONS.items():
        if default is not None and default is not False:
            what += f" (default {default}" + (f"; --tiny: {TINY_PRESET[name]})" if name in TINY_PRESET else ")")
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):  # on/off; one on by default also gets its --no-... form
            p.add_argument(flag, action=argparse.BooleanOptionalAction if default else "store_true", help=what)
        else:
            choices = {"precision": ["auto", "bf16", "fp32"], "normalize": ["sample", "batch", "none"]}.get(name)
            kind = parse_rewards if name == "rewards" else type(default) if default is not None else str
            p.add_argument(flag, type=kind, choices=choices, help=what.format(rewards=", ".join(REWARDS)))
    return p

def resolve_config(args):  # defaults <- --tiny <- typed flags, or a resume's saved config <- harmless typed flags
    typed = vars(args)
    cfg = {**DEFAULTS, **(TINY_PRESET if typed.get("tiny") else {}), **typed, "resume_checkpoint": None}
    run_dir = cfg["output_dir"] if cfg["resume"] == "auto" else cfg["resume"]
    found = checkpoint_files(run_dir) if run_dir else []
    if found:
        if "output_dir" in typed and os.path.abspath(typed["output_dir"]) != os.path.abspath(run_dir):
            raise UserError(f"--resume continues {run_dir} in place; leave out --output-dir {typed['output_dir']}.")
        try:
            saved = json.load(open(os.path.join(run_dir, "config.json")))
        except (OSError, json.JSONDecodeError):
            raise UserError(f"--resume {run_dir}: its config.json is missing or unreadable; restore it, or start anew.")
        if isinstance(saved.get("rewards"), str):  # older runs saved the --rewards text
            saved["rewards"] = parse_rewards(saved["rewards"])
        if isinstance(saved.get("normalize"), bool):  # older runs, before the per-batch ablation, saved on or off
            saved["normalize"] = "sample" if saved["normalize"] else "none"
        changed = sorted(k for k, v in typed.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
        if changed:
            raise UserError(f"--resume cannot change {', '.join('--' + k.replace('_', '-') for k in changed)} (the run "
                            f"was trained with {', '.join(f'{k}={saved.get(k)}' for k in changed)}); start a new run.")
        saved = {k: v for k, v in saved.items() if k in OPTIONS}
        kept = {k: v for k, v in typed.items() if k in RESUMABLE_CHANGES}  # others: as saved, up to --rewards' order
        cfg = {**DEFAULTS, **saved, **kept, "output_dir": run_dir, "resume_checkpoint": found[-1]}
    elif cfg["resume"] not in (None, "auto"):  # 'auto' without a checkpoint starts fresh
        raise UserError(f"--resume {run_dir}: no checkpoint found in {run_dir}/checkpoints; pass the --output-dir of a "
                        "run that has saved one.")
    cfg = argparse.Namespace(**cfg)
    cfg.rewards = parse_rewards(cfg.rewards) if isinstance(cfg.rewards, str) else cfg.rewards  # (the default's)
    cfg.device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device} asked for a GPU but PyTorch sees none; use --device cpu.")
    if cfg.precision == "auto":  # bf16 where the GPU computes it natively (Ampere and newer), else fp32
        cfg.precision = "bf16" if native_bf16(cfg.device) else "fp32"
        if cfg.device.startswith("cuda") and cfg.precision == "fp32":
            print("note: this GPU has no native bf16 (it is older than Ampere): training in fp32, with more memory.")
    if found and (trained_on := torch.device(saved["device"]).type) != torch.device(cfg.device).type:
        raise UserError(f"--resume cannot move a run from {trained_on} to {cfg.device}: its random streams (noise, "
                        f"eta) do not continue on another kind of device; resume it on {trained_on}, or start anew.")
    rules = [(n, getattr(cfg, n) > 0, "a positive whole number") for n in (
        "batch_size", "grad_accum", "max_steps", "resolution", "sample_every", "num_sample_prompts", "num_sample_seeds",
        "checkpoint_every", "keep_checkpoints", "max_bad_steps")]
    rules += [("steps", 1 <= cfg.steps <= 8, "between 1 and 8 (the paper uses 4)"),
              ("resolution", cfg.resolution % 8 == 0, "a multiple of 8 (the VAE downsamples by 8)"),
              ("lr", cfg.lr > 0 and math.isfinite(cfg.lr), "a positive number"),
              ("grad_clip", cfg.grad_clip > 0, "a positive number"), ("weight_reg", cfg.weight_reg >= 0, ">= 0"),
              ("lora_rank", cfg.lora_rank >= 0, "0 (full fine-tuning) or positive")]
    for name, ok, rule in rules:
        if not ok:
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(cfg, name)}.")
    return cfg

def quiet_libraries():  # only our bar and messages on the console, and the libraries' errors
    import logging
    import transformers
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    handler = logging.StreamHandler()  # open_clip logs to the root logger; with a handler of ours its first message
    handler.setLevel(logging.ERROR)    # does not install one that repeats every library's warnings
    logging.basicConfig(handlers=[handler], level=logging.ERROR)

def main(argv=None):
    quiet_libraries()
    try:
        train(resolve_config(build_parser().parse_args(argv)))
    except UserError as err:
        print(f"error: {err}" if err.exit_code == 2 else str(err), file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted before this session's first step; no checkpoint was written.", file=sys.stderr)
        sys.exit(130)

if __name__ == "__main__":
    main()
