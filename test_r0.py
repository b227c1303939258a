"""Tests for r0.py / sample.py: offline, CPU, tiny random-weight models built in code.

The model for these tests is minGPT's: agreement with an independent implementation (diffusers' DDIMScheduler and
StableDiffusionPipeline, open_clip's own transform and tokenizer), not "it ran".
Run:  HF_HUB_OFFLINE=1 python -m pytest -q test_r0.py
"""

import copy
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import weakref
import zlib

os.environ["HF_HUB_OFFLINE"] = "1"  # no network here: hub calls must fail at once, not retry for minutes

import numpy as np
import pytest
import torch

import r0

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = os.path.join(HERE, "prompts.txt")
# Every test names its device: "cpu" everywhere, and these few run only where a CUDA GPU is (they skip elsewhere).
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_cfg(tmp_path, *extra):
    """The tiny preset with the precision and checkpointing settings a GPU run uses (bf16 autocast, checkpointing)."""
    argv = ["--tiny", "--prompts", PROMPTS, "--output-dir", str(tmp_path / "run"), "--device", "cpu",
            "--precision", "bf16", "--grad-checkpointing", *extra]
    return r0.resolve_config(r0.build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def tiny():
    """(tokenizer, text_encoder, vae, unet) of the tiny SD1.5 twin, fp32, eval mode."""
    tok, te, vae, unet = r0.build_tiny_sd15(seed=0)
    return tok, te.eval(), vae.eval(), unet.eval()


def assert_fp32_close(got, want, rel=1e-4):
    """got and want: one fp32 quantity computed along two paths (another order of summation, other kernels, another
    thread count). The rounding error of a sum is relative to its largest terms, not to each element of the result,
    so a small element may be off by far more than its own `rel`: the tolerance is `rel` of each element plus `rel`
    of the largest one. (fp32 rounds each operation by up to 6e-8; 1e-4 leaves room for the ~1000 roundings that a
    forward and backward through a UNet chain together.)"""
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * want.abs().max().item())


def ddim_reference(unet, latents, text_emb, num_steps, eta=0.0, step_noises=None, until_step=None):
    """diffusers' own DDIM loop (trailing spacing, final alpha 1, guidance 1): the independent implementation.
    eta: a number, or one per step; until_step=k returns diffusers' pred_original_sample (x0_hat) of step k."""
    scheduler = r0.few_step_scheduler(r0.SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(num_steps)
    etas = list(eta) + [0.0] if isinstance(eta, (list, tuple)) else [eta] * num_steps  # the last step adds no noise
    x = latents
    for i, t in enumerate(scheduler.timesteps):
        eps = unet(x, t, encoder_hidden_states=text_emb).sample
        noise = step_noises[i] if step_noises is not None and i < num_steps - 1 else None
        out = scheduler.step(eps, t, x, eta=etas[i], variance_noise=noise)
        if i == until_step:
            return out.pred_original_sample
        x = out.prev_sample
    return x


# ----------------------------------------------------------------------------------------------------------------
# Generator parameterization

def test_schedule_and_timesteps_match_diffusers():
    from diffusers import DDPMScheduler
    ref = DDPMScheduler.from_config(r0.SD15_SCHEDULER_CONFIG).alphas_cumprod
    torch.testing.assert_close(r0.sd15_alphas_cumprod(), ref, rtol=1e-5, atol=1e-7)
    assert r0.few_step_timesteps(4) == [999, 749, 499, 249]
    for k in range(1, 9):
        scheduler = r0.few_step_scheduler(r0.SD15_SCHEDULER_CONFIG)
        scheduler.set_timesteps(k)
        assert r0.few_step_timesteps(k) == scheduler.timesteps.tolist(), k


def test_x0_from_eps_inverts_forward_diffusion_and_matches_ddim():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn((2, 2, 4, 8, 8), generator=g)
    a = r0.sd15_alphas_cumprod()[499].item()
    x_t = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    torch.testing.assert_close(r0.x0_from_eps(x_t, eps, a), x0, rtol=1e-4, atol=1e-4)
    scheduler = r0.few_step_scheduler(r0.SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(2)  # timesteps [999, 499]
    out = scheduler.step(eps, 499, x_t, eta=0.0)
    torch.testing.assert_close(r0.x0_from_eps(x_t, eps, a), out.pred_original_sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_steps", range(1, 9))
@torch.no_grad()
def test_sampler_eta0_equals_diffusers_ddim(tiny, num_steps):
    tok, te, vae, unet = tiny
    emb = r0.encode_prompts(tok, te, ["a red fox in the snow", "a blue car"])
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(num_steps))
    ours = r0.generate(unet, latents, emb, num_steps, r0.sd15_alphas_cumprod(), eta=0.0)
    ref = ddim_reference(unet, latents, emb, num_steps)
    assert_fp32_close(ours, ref)


@torch.no_grad()
def test_sampler_eta_positive_matches_ddim_with_the_same_noise_and_is_seeded(tiny):
    tok, te, vae, unet = tiny
    emb = r0.encode_prompts(tok, te, ["a red fox", "a blue car"])
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    ac = r0.sd15_alphas_cumprod()
    ours = r0.generate(unet, latents, emb, 4, ac, eta=0.7, generator=torch.Generator().manual_seed(5))
    # generate() draws one (B,4,h,w) noise per non-final step from its generator: hand diffusers the same draws
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(latents.shape, generator=g) for _ in range(3)]
    assert_fp32_close(ours, ddim_reference(unet, latents, emb, 4, eta=0.7, step_noises=noises))
    # stochastic: other seeds give other images; seeded: the same seed gives the same image (random eta too)
    again = r0.generate(unet, latents, emb, 4, ac, eta=0.7, generator=torch.Generator().manual_seed(5))
    other = r0.generate(unet, latents, emb, 4, ac, eta=0.7, generator=torch.Generator().manual_seed(6))
    assert torch.equal(ours, again) and not torch.allclose(ours, other, atol=1e-3)
    r1 = r0.generate(unet, latents, emb, 4, ac, random_eta=True, generator=torch.Generator().manual_seed(7))
    r2 = r0.generate(unet, latents, emb, 4, ac, random_eta=True, generator=torch.Generator().manual_seed(7))
    r3 = r0.generate(unet, latents, emb, 4, ac, random_eta=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(r1, r2) and not torch.allclose(r1, r3, atol=1e-3)


@torch.no_grad()
def test_random_eta_is_drawn_per_sample_and_per_step(tiny):
    """Training's random eta: each sample and each step has its own eta ~ U[0,1]. Reference: diffusers' DDIM run on
    each sample alone, with the eta and noise that generate() draws for that sample at that step."""
    tok, te, vae, unet = tiny
    B, K = 3, 4
    emb = r0.encode_prompts(tok, te, ["a red fox", "a blue car", "a green tree"])
    latents = torch.randn((B, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    ours = r0.generate(unet, latents, emb, K, r0.sd15_alphas_cumprod(), random_eta=True,
                       generator=torch.Generator().manual_seed(11))
    replay = torch.Generator().manual_seed(11)  # generate()'s draws, step by step: eta (B,), then noise (B,4,h,w)
    etas, noises = [], []
    for _ in range(K - 1):
        etas.append(torch.rand(B, generator=replay))
        noises.append(torch.randn(latents.shape, generator=replay))
    assert torch.stack(etas).unique().numel() == B * (K - 1)  # the reference itself uses a different eta everywhere
    for i in range(B):
        ref = ddim_reference(unet, latents[i : i + 1], emb[i : i + 1], K, eta=[float(e[i]) for e in etas],
                             step_noises=[n[i : i + 1] for n in noises])
        assert_fp32_close(ours[i : i + 1], ref)


@CUDA
@torch.no_grad()
def test_sampler_on_cuda_equals_diffusers_ddim_and_bf16_sampling_stays_close_to_fp32(tiny):
    import sample
    tok, te, vae, unet = (copy.deepcopy(x) for x in tiny)
    gpu = sample.as_models((tok, te, vae, unet, dict(r0.SD15_SCHEDULER_CONFIG)), "cuda", torch.float32)
    prompts = ["a red fox in the snow", "a blue car"]
    emb = r0.encode_prompts(tok, gpu.text_encoder, prompts)
    latents = torch.stack([r0.initial_noise(s, 64, "cuda") for s in (0, 1)])
    ours = r0.generate(gpu.unet, latents, emb, 4, gpu.alphas_cumprod, eta=0.0)
    torch.testing.assert_close(ours, ddim_reference(gpu.unet, latents, emb, 4), rtol=1e-4, atol=1e-4)
    fp32 = r0.sample_images(gpu, prompts, [0, 1], 4, 64, "fp32")
    bf16 = sample.as_models((tok, te, vae, unet, dict(r0.SD15_SCHEDULER_CONFIG)), "cuda", torch.bfloat16)
    assert (r0.sample_images(bf16, prompts, [0, 1], 4, 64, "bf16") - fp32).abs().mean() < 0.05


@torch.no_grad()
def test_bf16_sampler_runs_like_diffusers_pipeline_on_the_same_bf16_modules(tiny):
    """sample.py's path in bf16 (every module bf16, no autocast: each computes in its own dtype, as diffusers does)
    gives diffusers' StableDiffusionPipeline images (few-step DDIM, guidance 1) to bf16 precision; and the fp32 images
    to within what bf16 allows."""
    from diffusers import StableDiffusionPipeline
    import sample
    tok, te, vae, unet = (copy.deepcopy(x) for x in tiny)
    parts = (tok, te, vae, unet, dict(r0.SD15_SCHEDULER_CONFIG))
    bf16 = sample.as_models(parts, "cpu", torch.bfloat16)
    prompts, seeds = ["a red fox in the snow", "a blue car", "a green tree"], [3, 4, 5]
    ours = r0.sample_images(bf16, prompts, seeds, 4, 64, "bf16", batch_size=2)
    pipe = StableDiffusionPipeline(vae=bf16.vae, text_encoder=bf16.text_encoder, tokenizer=tok, unet=bf16.unet,
                                   scheduler=r0.few_step_scheduler(bf16.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    latents = torch.stack([r0.initial_noise(s, 64, "cpu") for s in seeds]).to(torch.bfloat16)
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=1.0, latents=latents, output_type="pt").images.float()
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max() < 0.03 and (ours - ref).abs().mean() < 0.005  # measured: 0.011, 0.002
    fp32 = r0.sample_images(sample.as_models(parts, "cpu", torch.float32), prompts, seeds, 4, 64, "fp32")
    assert (ours - fp32).abs().mean() < 0.005  # measured: 0.002 (diffusers: 0.003)


def test_frozen_bf16_models_without_autocast_give_the_autocast_pixels_and_image_gradients(tiny):
    """decode() and the reward towers switch autocast off inside the training step (r0.autocast_off): their outputs and
    the gradients they pass back agree, to bf16 precision, with running them under autocast (norms promoted to
    fp32), which is what the step did before."""
    import contextlib
    tok, te, vae, _ = tiny
    vae = r0.cast(copy.deepcopy(vae).requires_grad_(False).eval(), "cpu", torch.bfloat16)
    model, _ = r0.build_tiny_clip_tower(seed=1)
    tower = r0.ClipFamilyReward(r0.cast(model, "cpu", torch.bfloat16), __import__("open_clip").get_tokenizer("ViT-H-14"))
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    prompts = ["a red fox", "a blue car"]

    def run():
        x = z.clone().requires_grad_(True)
        with r0.autocast("cpu", "bf16"):
            pixels = r0.decode(vae, x)
            score = tower(pixels, prompts)
        (gx,) = torch.autograd.grad((pixels.square().mean() + score.sum()), x)
        return pixels.detach(), score.detach(), gx

    own = run()
    with pytest.MonkeyPatch.context() as mp:  # the old way: frozen models computed under the step's autocast
        mp.setattr(r0, "autocast_off", lambda device: contextlib.nullcontext())
        promoted = run()
    for a, b in zip(own, promoted):
        assert a.dtype == b.dtype == torch.float32 and torch.isfinite(a).all()
        assert (a - b).abs().max() <= 0.02 * b.abs().max() + 1e-3, (a - b).abs().max()
    assert own[2].abs().sum() > 0  # gradients reach the latents through both frozen models


def test_r0_plus_cuts_the_graph_before_the_sampled_step(tiny):
    tok, te, vae, unet = tiny
    unet = copy.deepcopy(unet).train()
    emb = r0.encode_prompts(tok, te, ["a red fox"])
    calls = []  # (grad enabled?, input requires grad?) per UNet call
    hook = unet.register_forward_pre_hook(lambda mod, args: calls.append((torch.is_grad_enabled(), args[0].requires_grad)))
    latents = torch.randn((1, 4, 8, 8))
    for k in range(4):
        calls.clear()
        x0 = r0.generate(unet, latents, emb, 4, r0.sd15_alphas_cumprod(), random_eta=True,
                         generator=torch.Generator().manual_seed(0), stop_at=k)
        assert len(calls) == k + 1  # steps after k are not run at all
        assert all(not grad for grad, _ in calls[:k])  # steps before k: no graph
        assert calls[k] == (True, False)  # step k: in the graph, from an input that carries no history
        x0.sum().backward()  # the graph exists and reaches the weights
        assert unet.conv_out.weight.grad is not None
        unet.zero_grad()
    calls.clear()  # plain R0: every step in the graph, inputs after the first carry history
    r0.generate(unet, latents, emb, 4, r0.sd15_alphas_cumprod(), random_eta=True, generator=torch.Generator())
    assert [c[0] for c in calls] == [True] * 4 and [c[1] for c in calls] == [False, True, True, True]
    hook.remove()


# ----------------------------------------------------------------------------------------------------------------
# Rewards

def smooth_test_image(w, h, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    base = rng.random((h // 8 + 1, w // 8 + 1, 3))
    arr = np.kron(base, np.ones((8, 8, 1)))[:h, :w] * 255 + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(512, 512), (300, 200), (200, 333), (64, 64)])
def test_clip_preprocess_agrees_with_open_clip_transform(size):
    import open_clip
    import torchvision.transforms.functional as TF
    # ViT-H-14 (HPS v2.1 and CLIP score) uses the OpenAI mean/std with bicubic 'shortest' resizing at 224
    pretrained = open_clip.get_pretrained_cfg("ViT-H-14", "laion2b_s32b_b79k")
    assert tuple(pretrained.get("mean", open_clip.OPENAI_DATASET_MEAN)) == r0.CLIP_MEAN
    assert tuple(pretrained.get("std", open_clip.OPENAI_DATASET_STD)) == r0.CLIP_STD
    transform = open_clip.image_transform(224, is_train=False, mean=r0.CLIP_MEAN, std=r0.CLIP_STD,
                                          interpolation="bicubic", resize_mode="shortest")
    img = smooth_test_image(*size)
    ref = transform(img)  # (3,224,224), PIL path
    pixels = TF.to_tensor(img)[None]  # (1,3,H,W) in [0,1]
    ours = r0.clip_preprocess(pixels)[0]
    assert ours.shape == ref.shape == (3, 224, 224)
    err = (ours - ref).abs()
    # PIL's and torch's bicubic kernels differ slightly (a=-0.5 vs -0.75): ~0.3/255 on average
    assert err.mean() < 0.01 and err.max() < 0.35, (err.mean(), err.max())
    # these tolerances reject real mistakes: open_clip's own output for a crop 3 pixels off, or without the
    # mean/std normalization, is further from the reference than the bounds above allow
    shifted = transform(img.crop((3, 3, img.width + 3, img.height + 3)))
    assert (shifted - ref).abs().mean() > 0.01
    unnormalized = ref * torch.tensor(r0.CLIP_STD).view(3, 1, 1) + torch.tensor(r0.CLIP_MEAN).view(3, 1, 1)
    assert (unnormalized - ref).abs().mean() > 0.01 and (unnormalized - ref).abs().max() > 0.35


def test_clip_preprocess_refuses_pixels_outside_0_1():
    with pytest.raises(AssertionError, match=r"\[0,1\]"):
        r0.clip_preprocess(torch.rand(1, 3, 64, 64) * 2 - 1)  # a [-1,1] image: the classic reward bug


def make_rewards(tiny_models, names=None):
    """Every registered reward (r0.REWARDS): its tiny twin, or for cfg the implicit reward of the tiny UNet."""
    tok, te, vae, unet = tiny_models
    rewards = {}
    for name in names or r0.REWARDS:
        if name == "cfg":
            uncond = r0.encode_prompts(tok, te, [""])
            rewards[name] = r0.ImplicitCfgReward(r0.make_base_eps(unet, copy.deepcopy(unet)), uncond,
                                                 r0.sd15_alphas_cumprod())
        else:
            rewards[name] = r0.REWARDS[name].load(True, "cpu", torch.float32)
    return rewards


def test_every_reward_passes_gradient_to_its_input_and_none_to_its_model(tiny):
    tok, te, vae, unet = tiny
    prompts = ["a red fox in the snow", "a blue car"]
    emb = r0.encode_prompts(tok, te, prompts)
    pixels = torch.rand(2, 3, 64, 64)
    latents = torch.randn(2, 4, 8, 8)
    for name, reward in make_rewards(tiny).items():
        x = pixels if reward.space == "pixels" else latents
        scores, grad = r0.reward_gradient(reward, x, prompts, emb, torch.Generator().manual_seed(0))
        assert scores.shape == (2,) and torch.isfinite(scores).all(), name
        assert grad.shape == x.shape and torch.isfinite(grad).all(), name
        assert (grad.flatten(1).norm(dim=1) > 0).all(), f"{name} passes no gradient to some sample"
        if isinstance(reward, torch.nn.Module):  # frozen: no gradient into the reward model itself
            assert all(p.grad is None and not p.requires_grad for p in reward.parameters()), name
    # the colour reward's gradient points the right way: more red for 'red', more blue for 'blue'
    _, grad = r0.reward_gradient(r0.ColourReward(), torch.full((2, 3, 8, 8), 0.5), prompts, emb)
    assert grad[0, 0].mean() > 0 > grad[0, 2].mean() and grad[1, 2].mean() > 0 > grad[1, 0].mean()


def pickscore_as_written_in_r0():
    """Adding a reward, steps 1 and 2: the PickScore class and its loader as r0.py's comments under 'Reward models' write
    them, run as written (on transformers' CLIPModel, PickScore's class: r = cos(image features, text features) of
    CLIP's projections; the loader: the real weights, PickScore_v1, a CLIPModel folder on the hub, or a tiny twin)."""
    lines = open(os.path.join(HERE, "r0.py")).read().splitlines()
    start = lines.index("#   class PickScore(torch.nn.Module):                         # the reward interface (\"Rewards\", above)")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("#   REWARDS["))
    stop = next(i for i in range(end + 1, len(lines)) if not lines[i].startswith("#      "))
    namespace = dict(vars(r0))
    exec("\n".join(line[4:] for line in lines[start:end]), namespace)
    entry = eval("\n".join(line[4:] for line in lines[end:stop]).split("=", 1)[1], namespace)  # step 3's Reward
    return namespace["load_pickscore"], entry


load_pickscore_like, PICKSCORE_ENTRY = pickscore_as_written_in_r0()


def test_a_reward_is_added_in_the_three_steps_r0_promises(tmp_path, monkeypatch, capsys):
    """The recipe under 'Reward models' in r0.py, followed for a transformers reward: the class and the loader above,
    and one line in r0.REWARDS (step 3). Nothing else: then --rewards trains with it (gradient checkpointing
    reaching its layers), the offline check names its downloads, make_rewards (the registry's gradient test) builds
    it and its gradient reaches the pixels and not its model, and sample.py --score scores it in its units."""
    import huggingface_hub
    import sample
    monkeypatch.setitem(r0.REWARDS, "pickscore", PICKSCORE_ENTRY)
    flags = ["--prompts", few_prompts(), "--device", "cpu", "--rewards", "pickscore=1,color=1"]
    cfg = run_cfg(tmp_path / "run", "--rewards", "pickscore=1,color=1", "--max-steps", "2", "--grad-checkpointing")
    m = r0.train(cfg)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["pickscore"]) for r in log)
    layers = [l for l in m.rewards["pickscore"].model.modules() if hasattr(l, "_gradient_checkpointing_func")]
    assert layers and all(l.gradient_checkpointing for l in layers)
    assert "pickscore as tiny towers with random weights" in capsys.readouterr().out
    tok, te, vae, unet = r0.build_tiny_sd15(seed=0)
    reward = make_rewards((tok, te, vae, unet), ["pickscore"])["pickscore"]
    _, grad = r0.reward_gradient(reward, torch.rand(2, 3, 64, 64), ["a red fox", "a blue car"], None)
    assert (grad.flatten(1).norm(dim=1) > 0).all() and not any(p.requires_grad for p in reward.parameters())
    bf16 = load_pickscore_like(True, "cpu", torch.bfloat16)  # as sample.py scores on a GPU: bf16, outside autocast
    assert bf16(torch.rand(2, 3, 64, 64), ["a red fox", "a blue car"]).isfinite().all()
    # offline, with an empty cache: its download is named with the others
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SystemExit):
        r0.main([*flags, "--output-dir", str(tmp_path / "real")])
    err = capsys.readouterr().err
    assert all(f"hf download yuvalkirstain/PickScore_v1 {f}" in err for f in ("config.json", "model.safetensors"))
    sample.main(["--run", str(tmp_path / "run"), "--prompt", "a red fox", "--score", "--score-with", "pickscore,color",
                 "--out", str(tmp_path / "scored"), "--device", "cpu"])
    scores = json.load(open(tmp_path / "scored" / "scores.json"))
    assert {"pickscore x100", "colour acc %"} <= set(scores["rows"][0])


# ImageReward.pt's state dict (THUDM/ImageReward), as ImageReward's own model code builds it, one line per key pattern
# with its shape ({a..b}: every index from a to b; {x,y}: each name). Generated once from the original code at full size
# (625 keys) in a separate environment (ImageReward's code pins packages this project cannot install together).
IMAGEREWARD_CHECKPOINT_KEYS = """
blip.visual_encoder.cls_token 1x1x1024
blip.visual_encoder.pos_embed 1x197x1024
blip.visual_encoder.patch_embed.proj.weight 1024x3x16x16
blip.visual_encoder.patch_embed.proj.bias 1024
blip.visual_encoder.blocks.{0..23}.norm{1,2}.{weight,bias} 1024
blip.visual_encoder.blocks.{0..23}.attn.qkv.weight 3072x1024
blip.visual_encoder.blocks.{0..23}.attn.qkv.bias 3072
blip.visual_encoder.blocks.{0..23}.attn.proj.weight 1024x1024
blip.visual_encoder.blocks.{0..23}.{attn.proj,mlp.fc2}.bias 1024
blip.visual_encoder.blocks.{0..23}.mlp.fc1.weight 4096x1024
blip.visual_encoder.blocks.{0..23}.mlp.fc1.bias 4096
blip.visual_encoder.blocks.{0..23}.mlp.fc2.weight 1024x4096
blip.visual_encoder.norm.{weight,bias} 1024
blip.text_encoder.embeddings.position_ids 1x512
blip.text_encoder.embeddings.word_embeddings.weight 30524x768
blip.text_encoder.embeddings.position_embeddings.weight 512x768
blip.text_encoder.embeddings.LayerNorm.{weight,bias} 768
blip.text_encoder.encoder.layer.{0..11}.attention.self.{query,key,value}.weight 768x768
blip.text_encoder.encoder.layer.{0..11}.{attention,crossattention}.self.{query,key,value}.bias 768
blip.text_encoder.encoder.layer.{0..11}.{attention,crossattention}.output.dense.weight 768x768
blip.text_encoder.encoder.layer.{0..11}.{attention,crossattention}.output.dense.bias 768
blip.text_encoder.encoder.layer.{0..11}.{attention,crossattention}.output.LayerNorm.{weight,bias} 768
blip.text_encoder.encoder.layer.{0..11}.crossattention.self.query.weight 768x768
blip.text_encoder.encoder.layer.{0..11}.crossattention.self.{key,value}.weight 768x1024
blip.text_encoder.encoder.layer.{0..11}.intermediate.dense.weight 3072x768
blip.text_encoder.encoder.layer.{0..11}.intermediate.dense.bias 3072
blip.text_encoder.encoder.layer.{0..11}.output.dense.weight 768x3072
blip.text_encoder.encoder.layer.{0..11}.output.dense.bias 768
blip.text_encoder.encoder.layer.{0..11}.output.LayerNorm.{weight,bias} 768
blip.{vision,text}_proj.bias 256
blip.vision_proj.weight 256x1024
blip.text_proj.weight 256x768
mlp.layers.0.weight 1024x768
mlp.layers.0.bias 1024
mlp.layers.2.weight 128x1024
mlp.layers.2.bias 128
mlp.layers.4.weight 64x128
mlp.layers.4.bias 64
mlp.layers.6.weight 16x64
mlp.layers.6.bias 16
mlp.layers.7.weight 1x16
mlp.layers.7.bias 1
"""


def expand_key_patterns(text):
    """IMAGEREWARD_CHECKPOINT_KEYS -> {key: shape}, each {a..b} or {x,y,...} expanded."""
    def expand(pattern):
        m = re.search(r"\{([^}]*)\}", pattern)
        if not m:
            return [pattern]
        lo, sep, hi = m.group(1).partition("..")
        options = [str(i) for i in range(int(lo), int(hi) + 1)] if sep else m.group(1).split(",")
        return [k for o in options for k in expand(pattern[: m.start()] + o + pattern[m.end():])]
    keys = {}
    for line in text.strip().splitlines():
        pattern, shape = line.split()
        for key in expand(pattern):
            assert key not in keys, key
            keys[key] = tuple(int(n) for n in shape.split("x"))
    return keys


def test_imagereward_checkpoint_keys_map_onto_our_model_key_for_key_and_shape():
    """Every key of ImageReward's original checkpoint maps onto ImageRewardReward with its shape (the unused ones
    dropped by name), the result loads strictly, and a key no rule names is refused with one sentence."""
    original = expand_key_patterns(IMAGEREWARD_CHECKPOINT_KEYS)
    assert len(original) == 625
    state = {k: torch.empty(shape, device="meta") for k, shape in original.items()}  # shapes only
    mapped = r0.imagereward_key_map(state)
    with torch.device("meta"):  # the full-size architecture without its 1.8 GB of weights
        model = r0.ImageRewardReward(*r0.imagereward_configs("full"), tokenizer=None)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(mapped, strict=True, assign=True)
    assert len(mapped) == len(original) - len(r0.IMAGEREWARD_UNUSED_KEYS)
    for extra in ("blip.itm_head.weight", "module.mlp.layers.0.weight", "blip.text_encoder.pooler.dense.weight"):
        with pytest.raises(r0.UserError, match=re.escape(extra)):
            r0.imagereward_key_map({**state, extra: torch.empty(1, device="meta")})


# ImageReward's original code (THUDM/ImageReward c1392c6: BLIP's ViT and med.py BERT, its MLP head, its mean and std)
# at the tiny twin's size, on the weights and inputs below: its scores, and per sample the norm of d(score)/d(pixels)
# and that gradient's dot product with a fixed direction. Printed by (the scratch environment of original.py):
#   HF_HUB_OFFLINE=1 /tmp/irvenv/bin/python .ci/imagereward/tiny_reference.py /tmp/ImageReward
IMAGEREWARD_REFERENCE = {"scores": [0.6231778860092163, 0.28328588604927063],
                         "grad_norms": [2.3786659240722656, 2.1021833419799805],
                         "grad_dots": [2.409027576446533, 1.9051002264022827]}


def imagereward_reference_weight(key, shape):
    """A deterministic value for each weight of the original checkpoint, from its name alone (both sides draw it)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
    if key.endswith("bias"):
        return 0.05 * w
    if re.search(r"norm|LayerNorm", key):  # LayerNorm weights, away from their init (1)
        return 1 + 0.2 * w
    return w / math.prod(shape[1:]) ** 0.5 if len(shape) > 1 else 0.02 * w


def imagereward_reference_inputs():
    """(pixels (2,3,64,64) in [0,1], input_ids (2,35), attention_mask (2,35)): smooth random images, and token ids
    shaped as ImageReward makes them (first token, words, end token, padding with 0; the second prompt fills all 35)."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(2, 3, 8, 8, generator=g)
    pixels = torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
    pixels = (pixels + 0.05 * torch.randn(2, 3, 64, 64, generator=g)).clamp(0, 1)
    ids = torch.cat([torch.full((2, 1), 101), torch.randint(1000, 30000, (2, 33), generator=g),
                     torch.full((2, 1), 102)], dim=1)
    ids[0, 12], ids[0, 13:] = 102, 0
    return pixels, ids, (ids != 0).long()


def imagereward_reference_direction():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_imagereward_gives_the_scores_and_gradients_of_its_original_code():
    """ImageRewardReward, its weights loaded from the original checkpoint's key names through r0.imagereward_key_map,
    against numbers ImageReward's own code computed on the same weights and inputs (IMAGEREWARD_REFERENCE): the
    scores in ImageReward's units ((head - mean) / std) and the image gradients. Any change of what ImageReward
    computes fails here, also one that training cannot see (the per-sample normalization cancels a scale)."""
    reward = r0.ImageRewardReward(*r0.imagereward_configs("tiny"), tokenizer=None)
    ours = reward.state_dict()
    state = {}  # the original checkpoint's keys (the full-size list, cut to the tiny twin's layers), tiny shapes
    for key in expand_key_patterns(IMAGEREWARD_CHECKPOINT_KEYS):
        mapped = r0.imagereward_key_map({key: None})
        for our_key in mapped:
            if our_key in ours:
                state[key] = imagereward_reference_weight(key, ours[our_key].shape)
    reward.load_state_dict(r0.imagereward_key_map(state), strict=True)
    pixels, ids, mask = imagereward_reference_inputs()
    x = pixels.clone().requires_grad_(True)
    scores = r0.imagereward_score(reward, x, ids, mask)  # the same token ids as the original was given
    (grad,) = torch.autograd.grad(scores.sum(), x)
    ref = IMAGEREWARD_REFERENCE
    # fp32 on both sides, the same operations in a different order: agreement to a few parts in a million, with room
    torch.testing.assert_close(scores, torch.tensor(ref["scores"]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.flatten(1).norm(dim=1), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=0)
    dots = (grad * imagereward_reference_direction()).flatten(1).sum(1)
    torch.testing.assert_close(dots, torch.tensor(ref["grad_dots"]), rtol=1e-4, atol=1e-4 * grad.norm().item())


def test_score_heads_run_in_fp32_on_bf16_towers():
    """As the originals: ImageReward's MLP head on the .float() [CLS] feature, the aesthetic predictor's MLP on an fp32
    embedding. On a GPU the towers are bf16; the heads and their inputs stay fp32 (bf16 would round an aesthetic
    score near 6 by up to 0.016)."""
    import sample
    pixels, prompts = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), ["a red fox", "a blue car"]
    reward = r0.REWARDS["imagereward"].load(True, "cpu", torch.bfloat16)
    assert reward.vision.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in reward.mlp.parameters())
    seen = []
    reward.text.register_forward_hook(lambda mod, args, out: seen.append(out.last_hidden_state[:, 0]))
    scores = reward(pixels, prompts)
    expected = (reward.mlp(seen[0].float()).squeeze(-1) - r0.IMAGEREWARD_MEAN) / r0.IMAGEREWARD_STD  # fp32 head
    assert scores.dtype == torch.float32 and torch.equal(scores, expected)
    with r0.autocast("cpu", "bf16"):  # inside the training step's autocast too (a bf16 head would pass this line)
        assert torch.equal(reward(pixels, prompts), scores)
    aesthetic = sample.AESTHETIC.load(True, "cpu", torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in aesthetic.layers.parameters())
    assert next(aesthetic.clip.parameters()).dtype == torch.bfloat16
    embedding = torch.nn.functional.normalize(aesthetic.clip.encode_image(r0.clip_preprocess(pixels).bfloat16()).float())
    assert torch.equal(aesthetic(pixels), aesthetic.layers(embedding).squeeze(-1))


def test_imagereward_gradient_checkpointing_recomputes_both_towers_and_changes_nothing():
    """--grad-checkpointing reaches ImageReward's two transformers towers (each layer 0 runs again in the backward),
    with the same scores and image gradients; the reward stays in eval mode (its head's dropout off)."""
    reward = r0.REWARDS["imagereward"].load(True, "cpu", torch.float32)
    prompts = ["a red fox in the snow", "a blue car"]

    def run():
        pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        scores = reward(pixels, prompts)
        scores.sum().backward()
        return scores.detach(), pixels.grad
    calls = []
    reward.vision.encoder.layers[0].self_attn.register_forward_hook(lambda *_: calls.append("vision"))
    reward.text.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.append("text"))
    s0, g0 = run()
    assert sorted(calls) == ["text", "vision"]
    reward.enable_gradient_checkpointing()
    calls.clear()
    s1, g1 = run()
    assert sorted(calls) == ["text", "text", "vision", "vision"]  # forward, then the recompute in backward
    assert torch.equal(s0, s1) and torch.allclose(g0, g1, rtol=1e-5, atol=1e-9) and g0.abs().sum() > 0
    assert not reward.mlp[1].training and not any(p.requires_grad for p in reward.parameters())



def test_clip_family_reward_is_the_cosine_of_open_clip_features():
    reward = r0.REWARDS["hps"].load(True, "cpu", torch.float32)
    pixels = torch.rand(2, 3, 64, 64)
    prompts = ["a red fox", "a blue car"]
    with torch.no_grad():
        img = reward.model.encode_image(r0.clip_preprocess(pixels))
        txt = reward.model.encode_text(reward.tokenizer(prompts))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert_fp32_close(reward(pixels, prompts), cos)


def test_clip_family_features_are_normalized_in_fp32_on_a_bf16_tower():
    """On a GPU the towers are bf16; the features are normalized after the cast to fp32 (as HPSv2 does under
    autocast), so a score does not move with the tower's precision beyond the tower itself."""
    reward = r0.REWARDS["hps"].load(True, "cpu", torch.bfloat16)
    pixels, prompts = torch.rand(2, 3, 64, 64), ["a red fox", "a blue car"]
    with torch.no_grad():
        img = reward.model.encode_image(r0.clip_preprocess(pixels).bfloat16()).float()
        txt = reward.model.encode_text(reward.tokenizer(prompts)).float()
        want = torch.nn.functional.cosine_similarity(img, txt, dim=-1)  # fp32 arithmetic on the bf16 features
        assert torch.allclose(reward.text_features(prompts).norm(dim=-1), torch.ones(2), atol=1e-6)
        torch.testing.assert_close(reward(pixels, prompts), want, rtol=1e-5, atol=1e-6)


def test_normalization_gives_each_reward_unit_per_sample_norm_before_weighting(tiny):
    tok, te, vae, unet = tiny
    prompts = ["a red fox", "a blue car", "a photo of a cat"]  # the third names no colour: 0 gradient stays 0

    class Scaled(torch.nn.Module):  # the colour reward, 1000x louder: normalization must cancel the scale
        space = "pixels"
        def forward(self, pixels, prompts, text_emb=None):
            return 1000 * r0.ColourReward()(pixels, prompts)

    pixels, latents = torch.rand(3, 3, 16, 16), torch.randn(3, 4, 2, 2)
    emb = r0.encode_prompts(tok, te, prompts)
    for w in (1.0, 0.25):
        g_pix, g_lat, _ = r0.composed_reward_gradients({"color": r0.ColourReward()}, {"color": w}, pixels, latents,
                                                       prompts, emb)
        assert_fp32_close(g_pix.flatten(1).norm(dim=1), torch.tensor([w, w, 0.0]))
        assert g_lat.abs().sum() == 0
        # the ablations: per batch, one norm for all three (the batch's gradient has norm w); none, the raw gradient
        g_batch, _, _ = r0.composed_reward_gradients({"color": r0.ColourReward()}, {"color": w}, pixels, latents,
                                                     prompts, emb, normalize="batch")
        _, raw = r0.reward_gradient(r0.ColourReward(), pixels, prompts, emb)
        assert_fp32_close(g_batch, w * raw / raw.norm())
        g_none, _, _ = r0.composed_reward_gradients({"color": r0.ColourReward()}, {"color": w}, pixels, latents,
                                                    prompts, emb, normalize="none")
        assert_fp32_close(g_none, w * raw)
    # two rewards with gradients 1000x apart pull equally hard: the sum is 2x the quiet one's normalized gradient
    g_both, _, _ = r0.composed_reward_gradients({"a": r0.ColourReward(), "b": Scaled()}, {"a": 1.0, "b": 1.0},
                                                pixels, latents, prompts, emb)
    g_one, _, _ = r0.composed_reward_gradients({"a": r0.ColourReward()}, {"a": 1.0}, pixels, latents, prompts, emb)
    assert_fp32_close(g_both, 2 * g_one)


def test_proxy_is_a_learned_colour_classifier_whose_gradient_reaches_the_pixels():
    """proxy and proxy_b, the toy's stand-ins for HPS and ImageReward: fitted by one fixed recipe (deterministic),
    right on fresh images of the distribution they were fitted on, r = log p(prompt's colour) <= 0 (0 without a colour
    word), a gradient at every sample's pixels that raises r, none into the classifier; two different models."""
    proxy, proxy_b = (r0.REWARDS[name].load(True, "cpu", torch.float32) for name in ("proxy", "proxy_b"))
    again = r0.fit_proxy.__wrapped__(0)  # the recipe, run once more
    assert all(torch.equal(a, b) for a, b in zip(proxy.parameters(), again.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(proxy.parameters(), proxy_b.parameters()))
    labels = torch.arange(len(r0.COLOURS)).repeat_interleave(4)
    colours = torch.tensor(list(r0.COLOURS.values()))[labels].view(-1, 3, 1, 1)
    images = (colours + r0.toy_textures(len(labels), torch.Generator().manual_seed(99))).clamp(0, 1)
    assert proxy.predict(images) == [list(r0.COLOURS)[i] for i in labels]
    by_prompt = torch.stack([proxy(images, [f"a {c} thing"] * len(images)) for c in r0.COLOURS])  # (11 prompts, 44)
    assert by_prompt.argmax(0).tolist() == labels.tolist()  # an image scores highest for its own colour's prompt
    prompts = ["a red fox", "a blue car", "a photo of a cat"]
    pixels = torch.full((3, 3, 64, 64), 0.5) + 0.1 * torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scores, grad = r0.reward_gradient(proxy, pixels, prompts, None)
    assert (scores[:2] < 0).all() and scores[2] == 0 and (grad[:2].flatten(1).norm(dim=1) > 0).all()
    assert grad[2].abs().sum() == 0 and all(p.grad is None for p in proxy.parameters())
    assert (proxy(pixels + 1e-3 * grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1), prompts)[:2]
            > scores[:2]).all()  # a small step along the gradient raises the log-probability


def test_content_kept_is_1_for_the_base_model_and_under_a_pure_change_of_colour(tiny):
    """content_kept: 1.0 for the base model's own images and for any per-channel affine change of colour of them (what
    a correct recolouring does); 0 for flat fields of their mean colour; it falls as texture is added."""
    tok, te, vae, unet = tiny
    m = r0.Models(tok, te, vae, unet, None, {}, r0.sd15_alphas_cumprod(), {}, {}, "cpu")
    base = r0.sample_images(m, ["a red fox", "a blue car", "a gray wolf"], [0, 1, 2], 4, 64, "fp32")
    assert r0.content_kept(base, base) == pytest.approx(1.0, abs=1e-6)
    gain, shift = torch.tensor([0.4, 1.7, 0.9]).view(1, 3, 1, 1), torch.tensor([0.5, -0.2, 0.1]).view(1, 3, 1, 1)
    assert r0.content_kept(base * gain + shift, base) == pytest.approx(1.0, abs=1e-5)
    assert r0.content_kept(base.mean(dim=(2, 3), keepdim=True).expand_as(base), base) == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    kept = [r0.content_kept(base + a * noise, base) for a in (0.05, 0.2, 1.0)]
    assert 1 > kept[0] > kept[1] > kept[2] > 0


def test_a_toy_run_never_trains_on_its_held_out_prompts_and_measures_them(tmp_path, monkeypatch):
    """About a fifth of the colour prompts (19 of 99 in prompts.txt: per colour the 3rd, 8th, ...) are held out of a
    toy run's training: no micro-batch draws one, every other prompt is drawn, and the measures report colour accuracy
    on them apart (colour_accuracy_unseen). The measures are of the generator's final output, under R0+ too."""
    prompts = r0.load_prompts(PROMPTS)
    held = list(r0.held_out_prompts(prompts))
    colours = {r0.colour_of(p) for p in prompts if r0.colour_of(p)}
    assert len(held) == 19 and {r0.colour_of(p) for p in held} == colours  # every colour has held-out prompts
    assert all(sum(r0.colour_of(p) == c for p in prompts if p not in held) >= 3 for c in colours)  # and seen ones
    real_step, drawn = r0.r0_step, []

    def spy(m, batch, cfg, generator):
        drawn.extend(batch)
        return real_step(m, batch, cfg, generator)

    real_sample, sampled_steps = r0.sample_images, set()

    def sample_spy(m, prompts, seeds, steps, *args, **kwargs):
        sampled_steps.add(steps)
        return real_sample(m, prompts, seeds, steps, *args, **kwargs)

    monkeypatch.setattr(r0, "r0_step", spy)
    monkeypatch.setattr(r0, "sample_images", sample_spy)
    r0.train(run_cfg(tmp_path, "--max-steps", "6", "--batch-size", "16", "--r0-plus", prompts=PROMPTS))  # 96 draws
    assert not set(drawn) & set(held) and set(drawn) == set(prompts) - set(held)  # and a whole epoch drawn
    assert sampled_steps == {4}  # R0+ too: every measure is of the generator's output, all K steps
    after = json.load(open(tmp_path / "summary.json"))["after"]
    assert 0 <= after["colour_accuracy_unseen"] <= 1 and after["colour_accuracy"] != after["colour_accuracy_unseen"]


def test_the_two_toy_rewards_differ_in_raw_gradient_scale_by_two_orders_of_magnitude(tiny):
    """The premise of the normalization's ablation (README: the paper's claims in miniature): bright's raw image
    gradient is >= 100x color's, as real rewards differ in scale; normalized, both pull with norm w."""
    prompts = ["a red fox", "a blue car", "a green tree", "a white horse"]
    pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    _, g_colour = r0.reward_gradient(r0.ColourReward(), pixels, prompts, None)
    _, g_bright = r0.reward_gradient(r0.BrightnessReward(), pixels, prompts, None)
    ratio = g_bright.flatten(1).norm(dim=1) / g_colour.flatten(1).norm(dim=1)
    assert (ratio > 100).all(), ratio
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # and it is brightness: d r / d pixel = 255 luma / HW
    assert_fp32_close(g_bright, (255 * luma / 64**2).expand_as(g_bright))


def test_tiny_decoder_reaches_every_palette_colour():
    """What the toy needs of its pretrained tiny decoder: for every colour of the palette, some latent decodes to an
    image of that dominant colour. Found by optimizing free latents (B,4,8,8) for the colour reward itself (Adam, 300
    steps): each palette colour is reached, and its mean lands within 0.25 of the target. (A decoder taught only on
    latents whose colours stay near gray fails this for yellow, green and purple: README, the toy.)"""
    _, _, vae, _ = r0.build_tiny_sd15(seed=0)
    vae.requires_grad_(False)
    names = list(r0.COLOURS)
    prompts = [f"a {c} thing" for c in names]
    z = torch.zeros(len(names), 4, 8, 8, requires_grad=True)
    optimizer = torch.optim.Adam([z], lr=0.05)
    for _ in range(300):
        loss = -r0.ColourReward()(r0.decode(vae, z), prompts).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pixels = r0.decode(vae, z)
    assert r0.dominant_colour(pixels) == names
    distance = (pixels.mean(dim=(2, 3)) - torch.tensor([r0.COLOURS[c] for c in names])).norm(dim=1)
    assert (distance < 0.25).all(), dict(zip(names, distance.tolist()))


def test_rebuilt_tokenizer_is_sd15s_and_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer
    tok = r0.sd15_tokenizer_offline()
    assert len(tok) == 49408 and tok.pad_token_id == 49407 and tok.eos_token_id == 49407 and tok.bos_token_id == 49406
    reference = SimpleTokenizer()
    for text in ["a red fox in the snow", "An astronaut riding a horse, 4k!!", "Crème brûlée at dawn"]:
        assert tok(text).input_ids == [49406, *reference.encode(text), 49407]
    ids = tok(["a red fox"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[-1] == 49407


# ----------------------------------------------------------------------------------------------------------------
# Regularizers, the training step, the training loop

@pytest.mark.parametrize("lora_rank", [4, 0])
def test_weight_regularizer_zero_at_init_grows_after_a_step_and_grads_reach_only_the_unet(tmp_path, lora_rank):
    cfg = tiny_cfg(tmp_path, "--lora-rank", str(lora_rank), "--rewards", "color=1.0,hps=0.5,imagereward=0.5,clip=0.5,cfg=0.5",
                   "--batch-size", "2")
    m = r0.load_models(cfg)
    params = r0.trainable_parameters(m.unet)
    assert r0.weight_regularization(m.unet, m.frozen_unet).item() == 0.0
    if lora_rank:  # LoRA mode: only adapter weights train, in fp32; the base UNet is frozen in bf16
        assert params and all("lora" in n for n, p in m.unet.named_parameters() if p.requires_grad)
        assert all(p.dtype == torch.float32 for p in params)
    else:  # full fine-tuning: every UNet weight trains, theta_0 is a frozen copy
        assert len(params) == len(list(m.unet.parameters())) and m.frozen_unet is not None
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    loss, stats = r0.r0_step(m, ["a red fox", "a blue car"], cfg, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and set(stats) >= {"color", "hps", "imagereward", "clip", "cfg_gap", "reg"}
    loss.backward()
    # gradients reach the generator's trainable weights ...
    assert all(p.grad is not None for p in params) and sum(p.grad.abs().sum() for p in params) > 0
    # ... and nothing frozen: VAE, text encoder, reward towers, theta_0
    frozen = [m.vae, m.text_encoder] + [r.model for r in m.rewards.values() if hasattr(r, "model")]
    frozen += [m.frozen_unet] if m.frozen_unet is not None else []
    assert all(p.grad is None for module in frozen for p in module.parameters())
    optimizer.step()
    assert r0.weight_regularization(m.unet, m.frozen_unet).item() > 0


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_weight_regularizer_keeps_no_weight_sized_tensor_for_the_backward(tmp_path, lora_rank):
    """Its value and gradient are the definition's, and autograd saves nothing but the weights themselves and tiny
    (r,r) products: a saved difference theta - theta_0 (or LoRA's delta W) would cost GBs on SD1.5."""
    m = r0.load_models(tiny_cfg(tmp_path, "--lora-rank", str(lora_rank), "--precision", "fp32"))
    params = r0.trainable_parameters(m.unet)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    weights = {p.data_ptr() for p in m.unet.parameters()}
    weights |= {p.data_ptr() for p in m.frozen_unet.parameters()} if m.frozen_unet is not None else set()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        reg = r0.weight_regularization(m.unet, m.frozen_unet)
    new_numbers = sum(t.numel() for t in saved if t.data_ptr() not in weights)
    assert new_numbers <= 2 * lora_rank ** 2 * len(r0.lora_layers(m.unet)) if lora_rank else new_numbers == 0
    reg.backward()
    if lora_rank:  # d/dA ||s B A||^2 = 2 s^2 B^T B A, d/dB = 2 s^2 B A A^T
        for A, B, s in r0.lora_layers(m.unet):
            assert_fp32_close(A.grad, 2 * s ** 2 * B.T @ B @ A)
            assert_fp32_close(B.grad, 2 * s ** 2 * B @ A @ A.T)
    else:
        direct = sum((p - p0).pow(2).sum() for p, p0 in zip(m.unet.parameters(), m.frozen_unet.parameters()))
        torch.testing.assert_close(reg, direct)
        for p, p0 in zip(m.unet.parameters(), m.frozen_unet.parameters()):
            torch.testing.assert_close(p.grad, 2 * (p - p0).detach())


def test_lora_adapts_every_attention_projection_of_the_unet_and_nothing_else(tmp_path):
    """The documented targets, as diffusers' SD LoRA training: to_q, to_k, to_v and to_out.0 of every attention
    layer of the UNet (self- and cross-attention), each with rank --lora-rank, B zero at the start."""
    from diffusers.models.attention_processor import Attention
    from peft.tuners.lora import LoraLayer
    m = r0.load_models(run_cfg(tmp_path, "--lora-rank", "4"))
    attention = [name for name, module in m.unet.named_modules() if isinstance(module, Attention)]
    adapted = {name: module for name, module in m.unet.named_modules() if isinstance(module, LoraLayer)}
    assert len(attention) > 0
    assert set(adapted) == {f"{a}.{p}" for a in attention for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert all(layer.r["default"] == 4 and not layer.lora_B["default"].weight.any() for layer in adapted.values())


def test_lora_regularizer_equals_the_merged_weight_change(tmp_path):
    cfg = tiny_cfg(tmp_path, "--lora-rank", "4", "--precision", "fp32")
    m = r0.load_models(cfg)
    source = lambda: r0.build_tiny_sd15(seed=cfg.seed)[3]  # the base UNet at full precision
    base = r0.merged_unet(m.unet, source()).state_dict()
    with torch.no_grad():
        for p in r0.trainable_parameters(m.unet):
            p.add_(0.01 * torch.randn_like(p))
    merged = r0.merged_unet(m.unet, source()).state_dict()
    direct = sum((merged[k] - base[k]).pow(2).sum() for k in base)  # ||theta - theta_0||^2 on merged weights
    torch.testing.assert_close(r0.weight_regularization(m.unet, None), direct, rtol=1e-3, atol=1e-6)
    # a LoRA scaling other than 1 (lora_alpha 8 for rank 4; r0.py's own adapters have alpha = rank): it enters squared
    from peft import LoraConfig
    unet = source()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora" in name:
                p.add_(0.01 * torch.randn_like(p))
    merged = copy.deepcopy(unet)
    merged.fuse_lora(lora_scale=1.0)
    merged.unload_lora()
    merged = merged.state_dict()
    direct = sum((merged[k] - base[k]).pow(2).sum() for k in base)
    torch.testing.assert_close(r0.weight_regularization(unet, None), direct, rtol=1e-3, atol=1e-6)


class LatentProbe:
    """A latent-space reward (as cfg is) with a known gradient direction d; it records the latents it is shown."""
    space = "latents"

    def __init__(self, direction):
        self.direction, self.seen = direction, []

    def gradient(self, latents, prompts, text_emb, generator=None):
        self.seen.append(latents.detach().clone())
        return latents.new_zeros(len(latents)), self.direction.to(latents).expand_as(latents)


def perturbed(m, scale=0.01, seed=0):
    """Moves the trainable weights away from theta_0 (LoRA's B away from 0), so that every term has a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in r0.trainable_parameters(m.unet):
            p.add_(scale * torch.randn(p.shape, generator=g))
    return r0.trainable_parameters(m.unet)


@pytest.mark.parametrize("lora_rank, switch", [(4, None), (0, None), (4, "--normalize none"), (4, "--no-random-eta")])
def test_surrogate_gradient_equals_the_direct_per_sample_per_reward_computation(tmp_path, lora_rank, switch):
    """r0_step's one backward of the surrogate gives, for the generator's trainable weights theta,
        -(1/B) sum_i sum_r w_r grad_theta r(x_i) / ||grad_x r(x_i)||  +  lambda grad_theta ||theta - theta_0||^2.
    Computed here directly: plain autograd through generate -> decode -> reward, one sample and one reward at a
    time, with the same noise and random eta (replayed from the same generator). The latent-space term (cfg's) is
    checked the same way, with a latent reward of known direction d:  -(1/B) sum_i w d_i/||d_i|| . dx0_hat_i/dtheta.
    The ablation switches change exactly one thing: --normalize none drops the 1/||.|| (raw gradients), and
    --no-random-eta samples with eta = 0 (the same noise draws, multiplied by sigma = 0)."""
    cfg = tiny_cfg(tmp_path, "--lora-rank", str(lora_rank), "--precision", "fp32", "--rewards", "color=1.0,hps=0.5",
                   "--weight-reg", "0.3", *(switch.split() if switch else []))
    m = r0.load_models(cfg)
    params = perturbed(m)
    prompts, B, w_latent, seed = ["a red fox", "a blue car"], 2, 0.7, 3
    d = torch.randn((B, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    m.rewards["latent"], m.reward_weights["latent"] = LatentProbe(d), w_latent
    loss, stats = r0.r0_step(m, prompts, cfg, torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(loss, params)
    reg = r0.weight_regularization(m.unet, m.frozen_unet)
    assert reg.item() > 0 and stats["reg"] == pytest.approx(reg.item(), rel=1e-6)
    assert loss.item() - stats["surrogate"] == pytest.approx(cfg.weight_reg * reg.item(), rel=1e-4)

    replay = torch.Generator().manual_seed(seed)  # r0_step's draws: the initial noise, then generate()'s eta and noise
    emb = r0.encode_prompts(m.tokenizer, m.text_encoder, prompts)
    noise = torch.randn((B, 4, 8, 8), generator=replay)
    x0 = r0.generate(m.unet, noise, emb, cfg.steps, m.alphas_cumprod, random_eta=switch != "--no-random-eta",
                     generator=replay)
    pixels = r0.decode(m.vae, x0)
    expected = [cfg.weight_reg * g for g in torch.autograd.grad(reg, params)]
    norm = (lambda g: 1.0) if switch == "--normalize none" else (lambda g: g.norm())

    def add(scale, grads):
        for e, g in zip(expected, grads):
            e.add_(scale * g)

    for name in ("color", "hps"):
        scores = m.rewards[name](pixels, prompts, emb)  # (B,)
        for i in range(B):
            (dx,) = torch.autograd.grad(scores[i], pixels, retain_graph=True)  # d r(x_i) / d x: zero but for sample i
            add(-m.reward_weights[name] / (B * norm(dx[i])), torch.autograd.grad(scores[i], params, retain_graph=True))
    for i in range(B):
        add(-w_latent / B, torch.autograd.grad(x0[i], params, grad_outputs=d[i] / norm(d[i]), retain_graph=True))
    for g, e in zip(got, expected):
        assert_fp32_close(g, e)


def test_a_cfg_only_run_moves_the_generator(tmp_path):
    """The implicit-CFG reward alone (a latent-space gradient) trains: one optimizer step changes the images."""
    cfg = run_cfg(tmp_path, "--rewards", "cfg=1.0", "--max-steps", "1")
    m = r0.load_models(cfg)
    params = r0.trainable_parameters(m.unet)
    prompts = ["a red fox", "a blue car"]
    with torch.no_grad():
        emb = r0.encode_prompts(m.tokenizer, m.text_encoder, prompts)
        noise = torch.stack([r0.initial_noise(s, 64, "cpu") for s in (0, 1)])
        before = r0.generate(m.unet, noise, emb, 4, m.alphas_cumprod)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    stats, grad_norm, applied = r0.optimizer_step(m, optimizer, params, r0.PromptOrder(prompts, 0), cfg,
                                                  torch.Generator().manual_seed(0))
    assert applied and grad_norm > 0 and stats["cfg_gap"] > 0
    with torch.no_grad():
        after = r0.generate(m.unet, noise, emb, 4, m.alphas_cumprod)
    assert (after - before).abs().max() > 1e-3


def test_r0_plus_rewards_x0_hat_of_step_k_with_one_unet_call_in_the_graph_and_k_covers_every_step(tmp_path):
    """R0+ in r0_step, observed: k = (UNet calls - 1); only the last call builds a graph; the latents the rewards see
    are diffusers' pred_original_sample at step k (same noise, random eta replayed); over many draws, k takes every
    value 0..K-1."""
    cfg = tiny_cfg(tmp_path, "--r0-plus", "--precision", "fp32", "--rewards", "color=1.0")
    m = r0.load_models(cfg)
    probe = LatentProbe(torch.ones(1, 4, 8, 8))
    m.rewards["latent"], m.reward_weights["latent"] = probe, 1.0
    prompts, K = ["a red fox"], cfg.steps
    emb = r0.encode_prompts(m.tokenizer, m.text_encoder, prompts)
    calls, ks = [], set()
    hook = m.unet.register_forward_pre_hook(lambda mod, args: calls.append(torch.is_grad_enabled()))
    for seed in range(24):
        calls.clear(), probe.seen.clear()
        loss, stats = r0.r0_step(m, prompts, cfg, torch.Generator().manual_seed(seed))
        k = len(calls) - 1
        assert calls == [False] * k + [True], calls  # exactly one UNet call in the graph: the one of step k
        assert stats["k"] == k  # logged with the step
        assert loss.requires_grad
        ks.add(k)
        replay = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, 4, 8, 8), generator=replay)
        torch.randint(0, K, (1,), generator=replay)  # r0_step's draw of k (its value is read from the calls above)
        etas, noises = [], []
        for _ in range(K - 1):  # generate()'s draws at every step before the last: eta (B,), then noise
            etas.append(float(torch.rand(1, generator=replay)))
            noises.append(torch.randn(noise.shape, generator=replay))
        hook.remove()
        with torch.no_grad():
            ref = ddim_reference(m.unet, noise, emb, K, eta=etas, step_noises=noises, until_step=k)
        hook = m.unet.register_forward_pre_hook(lambda mod, args: calls.append(torch.is_grad_enabled()))
        assert_fp32_close(probe.seen[0], ref)
    hook.remove()
    assert ks == set(range(K)), ks


class SpyOptimizer:
    """Stands in for AdamW inside optimizer_step: records the gradients that step() would apply."""

    def __init__(self, params):
        self.params, self.applied = params, []

    def step(self):
        self.applied.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize("grad_clip", [1e6, 1e-3])  # clipping inactive, then active
def test_optimizer_step_applies_the_clipped_gradient_of_the_micro_batch_mean(tmp_path, grad_clip):
    """--grad-accum 3: the update uses the gradient of the mean of the micro-batch losses, clipped to --grad-clip
    (global norm) before the step; grad_norm is the norm before clipping."""
    cfg = run_cfg(tmp_path, "--grad-accum", "3", "--grad-clip", str(grad_clip), "--rewards", "color=1.0,cfg=0.5")
    m = r0.load_models(cfg)
    params = perturbed(m)
    order, gen = r0.PromptOrder(r0.load_prompts(few_prompts()), 0), torch.Generator().manual_seed(0)
    ref_order, ref_gen = copy.deepcopy(order), torch.Generator().manual_seed(0)
    per_batch = [torch.autograd.grad(r0.r0_step(m, ref_order.batch(cfg.batch_size), cfg, ref_gen)[0], params)
                 for _ in range(cfg.grad_accum)]
    mean = [sum(gs) / cfg.grad_accum for gs in zip(*per_batch)]
    norm = torch.sqrt(sum(g.pow(2).sum() for g in mean)).item()
    spy = SpyOptimizer(params)
    stats, grad_norm, applied = r0.optimizer_step(m, spy, params, order, cfg, gen)
    assert applied and len(spy.applied) == 1 and grad_norm == pytest.approx(norm, rel=1e-4)
    scale = min(1.0, grad_clip / (norm + 1e-6))  # clip_grad_norm_'s rule
    assert (scale < 1) == (grad_clip < 1)  # the clipped case really clips
    for got, g in zip(spy.applied[0], mean):
        torch.testing.assert_close(got, scale * g, rtol=1e-4, atol=1e-4 * scale * g.abs().max().item())
    assert all(p.grad is None for p in params)  # gradients freed after the step


@pytest.mark.parametrize("device, precision", [("cpu", "fp32"), pytest.param("cuda", "bf16", marks=CUDA)])
def test_tiny_training_raises_the_colour_reward(tmp_path, device, precision):
    """A short run with gradient checkpointing must learn colour: the colour reward on fixed held-out seeds (eta=0,
    deterministic) rises, and every logged line is complete. On a GPU: bf16 autocast, the real run's settings (on
    a CPU bf16 is emulated and slow; the bf16 step on CPU is covered by the regularizer tests)."""
    cfg = tiny_cfg(tmp_path, "--max-steps", "24", "--batch-size", "8", "--sample-every", "12", "--device", device,
                   "--precision", precision)
    prompts = r0.load_prompts(PROMPTS)
    held_out = [p for p in prompts if r0.colour_of(p)][::4]

    def colour_reward(m):
        images = r0.sample_images(m, held_out, [10_000 + i for i in range(len(held_out))], cfg.steps,
                                  cfg.resolution, cfg.precision)
        return r0.ColourReward()(images, held_out).mean().item()

    before = colour_reward(r0.load_models(cfg))
    m = r0.train(cfg)
    after = colour_reward(m)
    assert after > before + 0.02, (before, after)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 25))
    assert {"loss", "color", "reg", "grad_norm", "lr", "seconds", "peak_mem_gb"} <= set(log[0])
    assert all(np.isfinite(r["color"]) and np.isfinite(r["grad_norm"]) for r in log)
    samples = sorted(os.listdir(tmp_path / "run" / "samples"))
    assert samples == ["step_000000.png", "step_000012.png", "step_000024.png"]
    assert json.load(open(tmp_path / "run" / "config.json"))["max_steps"] == 24
    # the toy's held-out measures: with every progress grid in its step's line, before and after in summary.json
    assert [r["step"] for r in log if "measures" in r] == [12, 24]
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["after"] == log[-1]["measures"] and summary["before"]["content_kept"] == pytest.approx(1.0)
    assert {"colour_accuracy", "colour_accuracy_unseen", "content_kept", "color_held_out"} <= set(summary["after"])
    assert set(summary["after"]["colour_accuracy_per_colour"]) == set(summary["before"]["colour_accuracy_per_colour"]) \
        == {r0.colour_of(p) for p in prompts if r0.colour_of(p)}
    from PIL import Image  # every run's curves, refreshed with each grid: one panel per curve, 4 a row
    assert Image.open(tmp_path / "run" / "curves.png").size == (4 * int(3.2 * 80), 2 * int(2.6 * 80))  # 2 + 5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 3-step tiny LoRA run (fp32): (run folder, the trained Models)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_cfg(tmp, "--max-steps", "3", "--batch-size", "2", "--precision", "fp32")
    return tmp / "run", r0.train(cfg)


def test_exported_pipeline_holds_the_source_weights_at_full_precision_after_a_bf16_run(tmp_path):
    """Training casts the frozen parts to bf16; pipeline/ must not inherit that rounding: every weight training did
    not change equals the source model's fp32 weight exactly, and the adapted ones are W_0 + scaling * B @ A."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer
    cfg = tiny_cfg(tmp_path, "--max-steps", "1", "--batch-size", "2", "--prompts", few_prompts(),
                   "--sample-every", "1000")
    assert cfg.precision == "bf16" and cfg.lora_rank > 0
    m = r0.train(cfg)
    tok, te, vae, unet = r0.build_tiny_sd15(seed=cfg.seed)  # the source, fp32
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline", local_files_only=True)
    for exported, source in ((pipe.vae, vae), (pipe.text_encoder, te)):
        src = source.state_dict()
        assert all(v.dtype == torch.float32 and torch.equal(v, src[k]) for k, v in exported.state_dict().items())
    src, out = unet.state_dict(), pipe.unet.state_dict()
    assert src.keys() == out.keys()
    adapted = {}
    for name, module in m.unet.named_modules():
        if isinstance(module, LoraLayer):
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            adapted[f"{name}.weight"] = src[f"{name}.weight"] + module.scaling["default"] * (B @ A).detach()
    assert adapted and any(not torch.equal(adapted[k], src[k]) for k in adapted)  # training changed something
    for k, v in out.items():
        if k in adapted:
            assert_fp32_close(v, adapted[k])
        else:
            assert torch.equal(v, src[k]), k


def test_saved_pipeline_reproduces_generate_and_lora_weights_load_onto_the_base(tiny_run):
    from diffusers import StableDiffusionPipeline
    run, m = tiny_run
    pipe = StableDiffusionPipeline.from_pretrained(run / "pipeline", local_files_only=True)
    assert pipe.scheduler.config.timestep_spacing == "trailing" and pipe.scheduler.config.set_alpha_to_one
    prompts = ["a red fox in the snow", "a blue car"]
    latents = torch.stack([r0.initial_noise(s, 64, "cpu") for s in (3, 4)])
    with torch.no_grad():
        ours = r0.generate(m.unet, latents, r0.encode_prompts(m.tokenizer, m.text_encoder, prompts), 4,
                           m.alphas_cumprod)
        ref = pipe(prompts, num_inference_steps=4, guidance_scale=1.0, latents=latents, output_type="latent").images
    assert_fp32_close(ours, ref)
    # the trained model differs from the base model, and the LoRA file turns the base into the trained model
    base = copy.deepcopy(pipe)
    base.unet = r0.build_tiny_sd15(seed=0)[3]
    with torch.no_grad():
        before = base(prompts, num_inference_steps=4, guidance_scale=1.0, latents=latents, output_type="latent").images
        base.load_lora_weights(run / "lora")
        after = base(prompts, num_inference_steps=4, guidance_scale=1.0, latents=latents, output_type="latent").images
    assert not torch.allclose(before, ref, atol=1e-3)
    torch.testing.assert_close(after, ref, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# sample.py

def test_sample_py_equals_diffusers_pipeline_of_the_run(tiny_run, tmp_path):
    """sample.py's 4-step images == StableDiffusionPipeline(run/pipeline)(4 steps, guidance 1), same latents."""
    from diffusers import StableDiffusionPipeline
    import sample
    run, _ = tiny_run
    args = sample.build_parser().parse_args(["--run", str(run), "--prompt", "a red fox", "--device", "cpu"])
    m, base, run_cfg = sample.load_models(args, "cpu", torch.float32)
    assert base is None and run_cfg.steps == 4 and run_cfg.tiny
    prompts, seeds = ["a red fox in the snow", "a blue car"], [7, 8]
    ours = r0.sample_images(m, prompts, seeds, 4, 64, "fp32")
    pipe = StableDiffusionPipeline.from_pretrained(run / "pipeline", local_files_only=True)
    latents = torch.stack([r0.initial_noise(s, 64, "cpu") for s in seeds])
    with torch.no_grad():
        ref = pipe(prompts, num_inference_steps=4, guidance_scale=1.0, latents=latents, output_type="pt").images
    assert_fp32_close(ours, ref)


# a grid row: a 64 px image upscaled to 128 px, and under it its prompt wrapped onto (here) 3 lines of 11 px
CAPTIONED_ROW = 128 + 2 + 11 * 3


def test_sample_py_compare_base_and_score_writes_images_grid_and_table(tiny_run, tmp_path, capsys):
    import sample
    run, _ = tiny_run
    out = tmp_path / "samples"
    sample.main(["--run", str(run), "--prompts", PROMPTS, "--max-prompts", "3", "--num-images", "2",
                 "--compare-base", "--score", "--score-with", "hps,clip,color", "--out", str(out), "--device", "cpu"])
    rows = json.load(open(out / "scores.json"))["rows"]
    assert [r["row"] for r in rows] == ["base 25-step CFG 7.5", "R0 1-step", "R0 2-step", "R0 4-step"]
    assert [r["unet_evals_per_image"] for r in rows] == [50, 1, 2, 4]
    for r in rows:
        assert r["seconds_per_image"] > 0 and {"hps x100", "clip x100", "colour acc %"} <= set(r)
        assert np.isfinite(r["hps x100"]["mean"]) and r["hps x100"]["se"] >= 0
    files = sorted(os.listdir(out))
    assert "grid.png" in files and len([f for f in files if f.endswith("seed0.png")]) == 4 * 3
    from PIL import Image
    assert Image.open(out / "grid.png").size[1] == 4 * CAPTIONED_ROW  # 4 rows: upscaled 64 px images + captions
    assert "R0 4-step" in capsys.readouterr().out


def test_sample_py_accepts_pipeline_folder_and_base_model_with_lora(tiny_run, tmp_path):
    import sample
    run, m = tiny_run
    prompts, seeds = ["a red fox"], [0]
    # the run's pipeline/ folder directly
    args = sample.build_parser().parse_args(["--run", str(run / "pipeline"), "--prompt", "x"])
    from_pipeline, _, run_cfg = sample.load_models(args, "cpu", torch.float32)
    assert run_cfg is not None  # found the run's config.json beside pipeline/
    # the base model (here: a diffusers folder holding the tiny base) plus the run's LoRA adapters
    base_dir = tmp_path / "base"
    from diffusers import StableDiffusionPipeline
    tok, te, vae, unet = r0.build_tiny_sd15(seed=0)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                            scheduler=r0.few_step_scheduler(r0.SD15_SCHEDULER_CONFIG), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(base_dir)
    args = sample.build_parser().parse_args(["--model", str(base_dir), "--lora", str(run / "lora"), "--prompt", "x"])
    with_lora, _, _ = sample.load_models(args, "cpu", torch.float32)
    expected = r0.sample_images(m, prompts, seeds, 4, 64, "fp32")
    assert_fp32_close(r0.sample_images(from_pipeline, prompts, seeds, 4, 64, "fp32"), expected)
    torch.testing.assert_close(r0.sample_images(with_lora, prompts, seeds, 4, 64, "fp32"), expected,
                               rtol=1e-3, atol=1e-3)


def test_sample_py_tiny_needs_no_run(tmp_path):
    import sample
    sample.main(["--tiny", "--prompt", "a red fox", "--num-images", "2", "--steps", "1,4", "--out", str(tmp_path),
                 "--device", "cpu"])
    assert sorted(os.listdir(tmp_path)) == ["R0_1-step_000_seed0.png", "R0_1-step_000_seed1.png",
                                            "R0_4-step_000_seed0.png", "R0_4-step_000_seed1.png", "grid.png"]


def test_eta_above_0_gives_each_image_its_own_random_stream(tiny):
    """sample.py --eta > 0: an image depends on its prompt and seed only, not on the batch size or its place in it."""
    tok, te, vae, unet = tiny
    m = r0.Models(tokenizer=tok, text_encoder=te, vae=vae, unet=unet, frozen_unet=None,
                  scheduler_config=r0.SD15_SCHEDULER_CONFIG, alphas_cumprod=r0.sd15_alphas_cumprod(), rewards={},
                  reward_weights={}, device="cpu")
    prompts, seeds = ["a red fox", "a blue car", "a green tree"], [5, 6, 7]
    together = r0.sample_images(m, prompts, seeds, 4, 64, "fp32", eta=0.8, batch_size=3)
    alone = torch.cat([r0.sample_images(m, [p], [s], 4, 64, "fp32", eta=0.8) for p, s in zip(prompts, seeds)])
    assert torch.equal(together, alone)
    deterministic = r0.sample_images(m, prompts, seeds, 4, 64, "fp32", eta=0.0, batch_size=3)
    assert (together - deterministic).abs().max() > 1e-3  # eta > 0 did draw noise


def test_sample_py_offline_names_every_missing_download_in_one_sentence(tmp_path, monkeypatch, capsys):
    """sample.py --model <hub id> --score with an empty cache and no hub: one sentence names the SD1.5 model, every
    metric's hub files and the aesthetic predictor's head (a GitHub file), before anything loads."""
    import huggingface_hub
    import sample
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(sample, "AESTHETIC_PATH", str(tmp_path / "torch_hub" / "head.pth"))
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--model", "stable-diffusion-v1-5/stable-diffusion-v1-5", "--prompt", "a red fox", "--score",
                     "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    for needed in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "xswu/HPSv2", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                   "THUDM/ImageReward", "bert-base-uncased", "timm/vit_large_patch14_clip_224.openai",
                   sample.AESTHETIC_URL):
        assert needed in err, (needed, err)
    assert not (tmp_path / "out").exists()


def test_sample_py_grid_wraps_and_caps_so_it_stays_viewable(tmp_path, capsys):
    """18 images per sampler: grid.png is GRID_COLUMNS (8) images wide and shows the first GRID_MAX_IMAGES (16) of
    each sampler on 2 lines, the sampler's block starting on a fresh line; every image still gets its own PNG.
    (Before: one column per image, e.g. 53376 px wide for 104 prompts x 4 images.)"""
    import numpy as np
    from PIL import Image
    import sample
    out = tmp_path / "a" / "b"  # a nested --out that does not exist yet: made once the images are there
    sample.main(["--tiny", "--prompts", PROMPTS, "--max-prompts", "9", "--num-images", "2", "--steps", "1,2",
                 "--out", str(out), "--device", "cpu"])
    stdout = capsys.readouterr().out
    assert "grid.png shows the first 16 of 18 images of each row" in stdout and "own PNG" in stdout
    files = os.listdir(out)
    assert sum(f.startswith("R0_1-step_") for f in files) == sum(f.startswith("R0_2-step_") for f in files) == 18
    # the bound: 8 columns of (upscaled) 128 px images plus the label column; 2 samplers x 2 lines of image + caption
    label_w = 6 * len("R0 1-step") + 8  # r0.save_grid's label column for the longest label
    grid = Image.open(out / "grid.png")
    assert grid.size == (label_w + 8 * 128, 2 * 2 * CAPTIONED_ROW)
    # the R0 2-step block starts on line 2 (after the 1-step block's 2 lines), its first cell image 0 of that row
    first = Image.open(out / "R0_2-step_000_seed0.png").convert("RGB").resize((128, 128), Image.NEAREST)
    cell = grid.crop((label_w, 2 * CAPTIONED_ROW, label_w + 128, 2 * CAPTIONED_ROW + 128))
    assert np.array_equal(np.asarray(cell), np.asarray(first))


def test_sample_py_score_on_a_tiny_model_says_its_towers_have_random_weights(tmp_path, capsys):
    """--tiny scores with random-weight towers: a line under the table and scores.json say so; colour accuracy
    alone needs no tower, and then nothing is flagged."""
    import sample
    sample.main(["--tiny", "--prompt", "a red fox", "--steps", "1", "--score", "--out", str(tmp_path / "towers"),
                 "--device", "cpu"])
    stdout = capsys.readouterr().out
    assert "hps, aesthetic, clip, imagereward are scored by random-weight tiny towers" in stdout
    assert "grid.png shows the first" not in stdout  # one image: the whole grid
    scores = json.load(open(tmp_path / "towers" / "scores.json"))
    # the paper's Table 1 columns that need no dataset, in its units (HPS and CLIP score x100)
    assert scores["random_weights"] is True
    assert {"hps x100", "aesthetic", "clip x100", "imagereward", "colour acc %"} <= set(scores["rows"][0])
    sample.main(["--tiny", "--prompt", "a red fox", "--steps", "1", "--score", "--score-with", "color",
                 "--out", str(tmp_path / "colour"), "--device", "cpu"])
    assert "random-weight" not in capsys.readouterr().out
    assert json.load(open(tmp_path / "colour" / "scores.json"))["random_weights"] is False


def test_sample_py_base_row_uses_the_base_models_own_ddim_schedule(tiny_run, tmp_path, monkeypatch):
    """--compare-base samples the base model as SD1.5 is sampled (DDIM, leading spacing, steps_offset 1, final alpha
    not 1: t = 961, 921, ..., 1), not with the run's few-step (trailing) scheduler config; with --lora, the
    --model's own scheduler config."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    import sample
    run, _ = tiny_run
    reference = DDIMScheduler.from_config(r0.SD15_SCHEDULER_CONFIG)
    reference.set_timesteps(sample.BASE_STEPS)
    assert reference.timesteps[0] == 961 and reference.timesteps[-1] == 1

    def check(scheduler):  # the scheduler after the pipeline set it up for BASE_STEPS steps
        c = scheduler.config
        assert (c.timestep_spacing, c.steps_offset, c.set_alpha_to_one) == ("leading", 1, False)
        assert torch.equal(scheduler.timesteps, reference.timesteps)

    # a run folder: its pipeline/ holds the few-step scheduler, the base row must not take it
    args = sample.build_parser().parse_args(["--run", str(run), "--prompt", "x", "--compare-base"])
    m, base, _ = sample.load_models(args, "cpu", torch.float32)
    assert m.scheduler_config["timestep_spacing"] == "trailing" and m.scheduler_config["set_alpha_to_one"]
    built, base_scheduler = [], sample.base_scheduler  # keep the scheduler sample_base builds, as its pipeline leaves it
    monkeypatch.setattr(sample, "base_scheduler", lambda config: built.append(base_scheduler(config)) or built[-1])
    sample.sample_base(base, ["a red fox"], [0], 64, 1)
    check(built[0])
    # --model with --lora: the base row reads the --model's own config (here a PNDM one, as SD1.5 ships)
    tok, te, vae, unet = r0.build_tiny_sd15(seed=0)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                            scheduler=PNDMScheduler.from_config(r0.SD15_SCHEDULER_CONFIG), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp_path / "base")
    args = sample.build_parser().parse_args(["--model", str(tmp_path / "base"), "--lora", str(run / "lora"),
                                             "--prompt", "x", "--compare-base"])
    _, base, _ = sample.load_models(args, "cpu", torch.float32)
    scheduler = sample.base_scheduler(base.scheduler_config)
    scheduler.set_timesteps(sample.BASE_STEPS)
    check(scheduler)


@pytest.mark.parametrize("argv, message", [
    (["--run", "no/such/run", "--prompt", "a fox"], "does not exist"),
    (["--run", "{empty}", "--prompt", "a fox"], "holds no trained weights"),
    (["--run", "{run}", "--prompt", "a fox", "--steps", "9"], "between 1 and 8"),
    (["--run", "{run}", "--prompt", "a fox", "--steps", "two"], "whole numbers"),
    (["--run", "{run}", "--prompt", "   "], "--prompt is empty"),
    (["--run", "{run}", "--prompt", "a fox", "--out", "{file}/sub"], "cannot write to --out"),
    (["--tiny", "--prompt", "a fox", "--out", "{file}/sub"], "cannot write to --out"),
    (["--run", "{run}", "--prompt", "a fox", "--score", "--score-with", "fid"], "unknown metric 'fid'"),
    (["--run", "{run}", "--prompt", "a fox", "--step", "4"], "unrecognized arguments: --step"),
    (["--run", "{run}"], "one of the arguments --prompt --prompts is required"),
    (["--model", "{run}/pipeline", "--lora", "{empty}", "--prompt", "a fox"], "holds no pytorch_lora_weights"),
    (["--run", "{bare}", "--prompt", "a fox", "--compare-base"], "no config.json that names its base model"),
])
def test_sample_py_bad_input_is_one_clear_sentence_and_leaves_no_output_folder(tiny_run, tmp_path, capsys, argv,
                                                                              message):
    """One sentence, exit code 2, no traceback; and no --out left behind, not even an empty one (some of these fail
    only after loading: --lora)."""
    import shutil
    import sample
    run, _ = tiny_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    shutil.copytree(run / "pipeline", tmp_path / "bare")  # a diffusers folder with no run config beside it
    fill = {"{run}": str(run), "{empty}": str(tmp_path / "empty"), "{file}": str(tmp_path / "file"),
            "{bare}": str(tmp_path / "bare")}
    argv = [next((a.replace(k, v) for k, v in fill.items() if k in a), a) for a in argv]
    out = argv[argv.index("--out") + 1] if "--out" in argv else str(tmp_path / "out" / "sub")
    with pytest.raises(SystemExit) as exit_info:
        sample.main([*[a for a in argv if a != "--out" and a != out], "--out", out, "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(out) and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# Loading and user errors: one sentence, non-zero exit, no traceback

def test_load_prompts_skips_comments_and_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\n\n  a red fox  \n#another\na blue car\n", encoding="utf-8")
    assert r0.load_prompts(str(f)) == ["a red fox", "a blue car"]
    # files saved by Windows editors: a byte-order mark and CRLF line ends are not part of any prompt
    f.write_bytes("\ufeffa red fox\r\n# a comment\r\na blue car\r\n".encode("utf-8"))
    assert r0.load_prompts(str(f)) == ["a red fox", "a blue car"]


@pytest.mark.parametrize("argv, message", [
    (["--rewards", "hps=1,foo=2"], "unknown reward 'foo'"),
    (["--rewards", "hps=abc"], "not a number"),
    (["--rewards", "hps=-1"], ">= 0"),
    (["--steps", "9"], "between 1 and 8"),
    (["--resolution", "100"], "multiple of 8"),
    (["--batch-size", "0"], "--batch-size must be a positive"),
    (["--lr", "-1"], "--lr must be a positive"),
    (["--prompts", "does-not-exist.txt"], "does not exist"),
    (["--max-steps", "0"], "--max-steps must be a positive"),
    (["--resolution", "-8"], "--resolution must be a positive"),
    (["--rewards", "hps=1,=2"], "unknown reward ''"),
    (["--rewards", ""], "names no reward"),
    (["--lora-rank", "-1"], "--lora-rank must be"),
    (["--max-step", "3"], "unrecognized arguments: --max-step"),  # a typo: one sentence, not the usage first
    (["--prompt", "a.txt"], "unrecognized arguments: --prompt"),  # no abbreviations: --prompt is not --prompts
    (["--precision", "fp16"], "invalid choice: 'fp16'"),
])
def test_bad_input_is_one_clear_sentence(capsys, tmp_path, argv, message):
    base = ["--tiny", "--prompts", PROMPTS, "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        r0.main(base + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_model_offline_fails_fast_with_what_to_do(tmp_path):
    """The real loading path, offline: one sentence naming what is missing and how to get it, no retries."""
    cmd = [sys.executable, os.path.join(HERE, "r0.py"), "--prompts", PROMPTS, "--model", "someone/not-cached-sd15",
           "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "--tiny" in out.stderr and "someone/not-cached-sd15" in out.stderr


HUB_PIECES = {"sd": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "model_index.json"),
              "hps": ("xswu/HPSv2", "HPS_v2.1_compressed.pt"),
              "clip": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_model.safetensors")}


@pytest.mark.parametrize("missing", [("sd",), ("hps",), ("clip",), ("sd", "hps", "clip")])
def test_offline_every_missing_download_is_named_in_one_sentence(tmp_path, monkeypatch, capsys, missing):
    """The real path with the hub unreachable (HF_HUB_OFFLINE=1) and a Hugging Face cache that lacks some pieces:
    one sentence names exactly those, each with its `hf download` line; exit 2; nothing written."""
    import huggingface_hub
    cache = tmp_path / "hub"
    for piece, (repo, filename) in HUB_PIECES.items():  # the cache layout huggingface_hub writes
        if piece not in missing:
            folder = cache / f"models--{repo.replace('/', '--')}"
            (folder / "refs").mkdir(parents=True)
            (folder / "refs" / "main").write_text("0" * 40)
            (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
            (folder / "snapshots" / ("0" * 40) / filename).write_text("stand-in")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(SystemExit) as exit_info:
        r0.main(["--prompts", PROMPTS, "--output-dir", str(tmp_path / "out"), "--device", "cpu",
                 "--rewards", "hps=1.0,clip=1.0"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "unreachable" in err, err
    for piece, (repo, filename) in HUB_PIECES.items():
        assert (f"hf download {repo}" in err) == (piece in missing), (piece, err)
    assert not (tmp_path / "out").exists()


def test_tiny_says_when_a_reward_is_a_random_weight_tower(tmp_path, capsys):
    """--tiny --rewards hps trains against a tiny tower with random weights: the run says so (the colour toy and the
    cfg reward are what they claim to be, and say nothing)."""
    r0.load_models(run_cfg(tmp_path, "--rewards", "hps=1,color=1"))
    out = capsys.readouterr().out
    assert "hps as tiny towers with random weights" in out and "color" not in out.split("note:")[1]
    r0.load_models(run_cfg(tmp_path, "--rewards", "color=1,cfg=1"))
    assert "random weights" not in capsys.readouterr().out


def test_library_noise_is_kept_off_the_console():
    """What r0.py's real path calls, after r0.quiet_libraries() (as main() runs it): open_clip building the ViT
    that the HPS weights go into ('No pretrained weights loaded ... initialized randomly'), casting diffusers models
    to bf16 ('modules that should be kept in float32: []'): none of it reaches the console."""
    code = ("import logging, r0, torch, open_clip, diffusers; r0.quiet_libraries(); "
            "open_clip.create_model('ViT-B-32', pretrained=None); unet_cfg, vae_cfg = r0.TINY_UNET, r0.TINY_VAE; "
            "r0.cast(diffusers.AutoencoderKL(**vae_cfg), 'cpu', torch.bfloat16); "
            "r0.cast(diffusers.UNet2DConditionModel(**unet_cfg), 'cpu', torch.bfloat16); "
            "logging.getLogger('x').error('errors still show')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "ERROR:x:errors still show" and out.stdout == "", out.stderr


def test_non_epsilon_or_non_sd15_models_are_refused(tiny):
    tok, te, vae, unet = tiny
    with pytest.raises(r0.UserError, match="epsilon"):
        r0.check_sd15_shaped(te, vae, unet, {**r0.SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    # schedules that sd15_alphas_cumprod would not rebuild (it reads beta_start and beta_end only)
    for changed in ({"trained_betas": [0.001] * 1000}, {"rescale_betas_zero_snr": True}):
        with pytest.raises(r0.UserError, match=next(iter(changed))):
            r0.check_sd15_shaped(te, vae, unet, {**r0.SD15_SCHEDULER_CONFIG, **changed})
    r0.check_sd15_shaped(te, vae, unet, r0.SD15_SCHEDULER_CONFIG)  # the tiny twin itself is SD1.5-shaped


# ----------------------------------------------------------------------------------------------------------------
# Training that survives: checkpoints, resume, interrupts, non-finite values, bad input

@functools.lru_cache(maxsize=1)
def few_prompts():
    """Six prompts of prompts.txt in a file: keeps the colour-accuracy evaluation of each short run cheap."""
    path = os.path.join(tempfile.mkdtemp(), "prompts.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(r0.load_prompts(PROMPTS)[:6]) + "\n")
    return path


def run_cfg(out, *extra, prompts=None):
    """A small, fast tiny run (fp32, no progress grids in between) writing to `out`."""
    argv = ["--tiny", "--prompts", prompts or few_prompts(), "--output-dir", str(out), "--device", "cpu",
            "--precision", "fp32", "--batch-size", "2", "--sample-every", "1000", *extra]
    return r0.resolve_config(r0.build_parser().parse_args(argv))


def comparable(log_line):
    return {k: v for k, v in log_line.items() if k not in ("seconds", "peak_mem_gb")}


def test_checkpoints_are_atomic_pruned_and_resume_is_bitwise_exact(tmp_path):
    """2N steps in one go == N steps, then --resume to 2N: bitwise-equal weights and optimizer state on CPU, and the
    same log lines after step N (all but the wall-clock fields)."""
    r0.train(run_cfg(tmp_path / "a", "--max-steps", "4", "--checkpoint-every", "1", "--keep-checkpoints", "2"))
    files = sorted(os.listdir(tmp_path / "a" / "checkpoints"))
    assert files == ["step_000003.pt", "step_000004.pt"]  # pruned to 2, no temporary file left behind
    r0.train(run_cfg(tmp_path / "b", "--max-steps", "2", "--checkpoint-every", "2"))
    resumed = r0.resolve_config(r0.build_parser().parse_args(["--resume", str(tmp_path / "b"), "--max-steps", "4"]))
    assert resumed.tiny and resumed.batch_size == 2 and resumed.max_steps == 4  # the saved config, plus the change
    r0.train(resumed)
    a = torch.load(tmp_path / "a" / "checkpoints" / "step_000004.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "step_000004.pt", weights_only=True)
    assert {"step", "trainable", "optimizer", "rng", "config", "prompts_sha256"} <= set(a)
    assert {"generator", "torch_rng", "cuda_rng", "python_rng", "order"} <= set(a["rng"])
    assert a["trainable"].keys() == b["trainable"].keys()
    # train() builds AdamW with --lr and no weight decay (the anchor to theta_0 replaces decay toward 0)
    assert [(g["lr"], g["weight_decay"]) for g in a["optimizer"]["param_groups"]] == [(resumed.lr, 0.0)]
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])  # bitwise
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    log_a = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    log_b = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in log_b] == [1, 2, 3, 4]
    assert [comparable(r) for r in log_a[2:]] == [comparable(r) for r in log_b[2:]]
    # harmless changes are allowed on resume (above: --max-steps); changing the model or the mode is refused
    for flags, name in [(["--lora-rank", "0"], "--lora-rank"), (["--model", "other/model"], "--model"),
                        (["--r0-plus"], "--r0-plus")]:
        with pytest.raises(r0.UserError, match=name):
            r0.resolve_config(r0.build_parser().parse_args(["--resume", str(tmp_path / "b"), *flags]))


def test_resume_keeps_the_runs_reward_order_when_the_same_rewards_are_typed_in_another(tmp_path):
    """--rewards typed again on resume in another order is no change, and the run's order stays: the composed gradient
    sums the rewards in it (a bitwise resume) and the frozen models' fingerprint lists them in it (another order was
    refused as other frozen models)."""
    r0.write_config(run_cfg(tmp_path, "--rewards", "proxy=1,proxy_b=0.5"))
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "step_000001.pt").write_bytes(b"")  # resolve_config only looks for one
    typed = ["--resume", str(tmp_path), "--rewards", "proxy_b=0.5,proxy=1", "--max-steps", "3"]
    cfg = r0.resolve_config(r0.build_parser().parse_args(typed))
    assert list(cfg.rewards) == ["proxy", "proxy_b"] and cfg.max_steps == 3


def test_resume_refuses_an_output_dir_other_than_the_run_it_continues(tmp_path):
    """--resume A --output-dir B continued A in place, silently: it is refused in one sentence (B the run itself, or
    --resume auto, which resumes --output-dir, still work)."""
    os.makedirs(tmp_path / "a" / "checkpoints")
    r0.write_config(run_cfg(tmp_path / "a"))
    (tmp_path / "a" / "checkpoints" / "step_000001.pt").write_bytes(b"")
    with pytest.raises(r0.UserError, match="leave out --output-dir"):
        r0.resolve_config(r0.build_parser().parse_args(["--resume", str(tmp_path / "a"), "--output-dir", "b"]))
    for typed in (["--resume", str(tmp_path / "a"), "--output-dir", str(tmp_path / "a" / "")],
                  ["--resume", "auto", "--output-dir", str(tmp_path / "a")]):
        assert r0.resolve_config(r0.build_parser().parse_args(typed)).output_dir.rstrip("/") == str(tmp_path / "a")

class RunsCode:
    """An object whose unpickling runs a command (what a tampered checkpoint would hold)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_unread(tmp_path, capsys):
    """--resume reads checkpoints with weights_only=True: one that would run code when unpickled (a run folder someone
    hands you) is refused in one sentence, exit 2, and the code never runs; the run's files stay as they were. The
    same loader reads the rewards' weight files (HPS v2.1, ImageReward, the aesthetic head)."""
    r0.train(run_cfg(tmp_path / "run", "--max-steps", "1"))
    path, marker = tmp_path / "run" / "checkpoints" / "step_000001.pt", tmp_path / "code-ran"
    state = torch.load(path, weights_only=True)  # what r0.py writes loads safely
    state["rng"]["order"] = RunsCode(marker)
    torch.save(state, path)
    log_before = (tmp_path / "run" / "log.jsonl").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        r0.main(["--resume", str(tmp_path / "run"), "--max-steps", "2"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "could run code" in err, err
    assert not marker.exists()
    assert (tmp_path / "run" / "log.jsonl").read_text() == log_before and path.exists()
    torch.save({"state_dict": {"w": RunsCode(marker)}}, tmp_path / "weights.pt")
    with pytest.raises(r0.UserError, match="could run code"):
        r0.load_tensors(tmp_path / "weights.pt", "HPS v2.1 checkpoint")
    assert not marker.exists()


def test_resume_refuses_another_kind_of_device_but_allows_another_gpu(tmp_path, monkeypatch, capsys):
    """A CPU run's checkpoint holds no CUDA state; resuming a GPU run on the CPU is refused in one sentence (a CUDA
    generator state cannot continue on the CPU); another GPU of the same machine (cuda -> cuda:1) is allowed. Other
    prompts, or a config.json gone or unreadable, are refused in one sentence too."""
    r0.train(run_cfg(tmp_path, "--max-steps", "1"))
    state = torch.load(tmp_path / "checkpoints" / "step_000001.pt", weights_only=True)
    assert state["rng"]["cuda_rng"] is None
    other = tmp_path.parent / "other_prompts.txt"  # another prompt file: refused, naming it
    other.write_text("a red fox\n")
    with pytest.raises(r0.UserError, match=re.escape(f"the prompts in {other} differ")):
        r0.train(r0.resolve_config(r0.build_parser().parse_args(["--resume", str(tmp_path), "--prompts", str(other)])))
    config = json.load(open(tmp_path / "config.json"))
    json.dump({**config, "device": "cuda"}, open(tmp_path / "config.json", "w"))  # as if trained on a GPU
    with pytest.raises(r0.UserError, match="cannot move a run from cuda to cpu"):
        r0.resolve_config(r0.build_parser().parse_args(["--resume", str(tmp_path), "--device", "cpu"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the resolution alone: nothing runs on it
    assert r0.resolve_config(r0.build_parser().parse_args(["--resume", str(tmp_path), "--device", "cuda:1"])).device \
        == "cuda:1"
    for damage in ("unreadable", "gone"):  # its config.json: one sentence, and the checkpoint kept
        if damage == "unreadable":
            (tmp_path / "config.json").write_text("{not json")
        else:
            os.remove(tmp_path / "config.json")
        with pytest.raises(SystemExit) as exit_info:
            r0.main(["--resume", str(tmp_path), "--device", "cpu"])
        assert exit_info.value.code == 2 and "config.json is missing or unreadable" in capsys.readouterr().err
        assert state["step"] == torch.load(tmp_path / "checkpoints" / "step_000001.pt", weights_only=True)["step"]


@CUDA
def test_a_gpu_checkpoint_holds_its_own_gpus_random_state_and_resumes(tmp_path):
    """On a GPU: the checkpoint holds this GPU's CUDA random state only (one tensor, not a list of every visible
    GPU's, which broke resuming where fewer GPUs are visible), and --resume continues on the GPU."""
    r0.train(run_cfg(tmp_path, "--max-steps", "1", "--device", "cuda"))
    state = torch.load(tmp_path / "checkpoints" / "step_000001.pt", weights_only=True)
    assert isinstance(state["rng"]["cuda_rng"], torch.Tensor)
    r0.train(r0.resolve_config(r0.build_parser().parse_args(["--resume", str(tmp_path), "--max-steps", "2"])))
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2]


def test_precision_auto_is_bf16_only_on_a_gpu_that_computes_it(tmp_path, monkeypatch, capsys):
    """--precision auto: fp32 on a CPU; on a GPU bf16 where it is native (Ampere and newer), else fp32 with a note."""
    assert run_cfg(tmp_path, "--precision", "auto").precision == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
        cfg = r0.resolve_config(r0.build_parser().parse_args(["--tiny", "--prompts", PROMPTS, "--device", "cuda"]))
        assert cfg.precision == expected
    assert "no native bf16" in capsys.readouterr().out


def test_a_colour_run_whose_prompts_name_no_colour_finishes_without_the_toys_measures(tmp_path):
    """--rewards color with prompts that name no colour trains (the reward is 0 for them) and exports, with no colour
    accuracy to measure: summary.json holds none, and nothing crashes at the end."""
    prompts = tmp_path / "plain.txt"
    prompts.write_text("a photo of a cat\na dog on a beach\n")
    r0.train(run_cfg(tmp_path / "run", "--max-steps", "1", prompts=str(prompts)))
    assert (tmp_path / "run" / "pipeline" / "model_index.json").exists()
    summary = json.load(open(tmp_path / "run" / "summary.json"))  # the progress grid's content_kept only
    assert set(summary) == {"before", "after"} and set(summary["after"]) == {"content_kept"}


# config.json exactly as commit 6f50b03's r0.py wrote it (`python r0.py --tiny --max-steps 1 --batch-size 2
# --sample-every 100`), but for the two paths: `rewards` is the --rewards text, not today's dict
CONFIG_OF_6F50B03 = """{
  "model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "tiny": true, "prompts": %(prompts)s,
  "output_dir": %(out)s, "steps": 4, "resolution": 64, "r0_plus": false, "rewards": "color=1.0", "lora_rank": 8,
  "weight_reg": 0.01, "grad_clip": 1.0, "lr": 0.01, "batch_size": 2, "grad_accum": 1, "max_steps": 1, "seed": 0,
  "device": "cpu", "precision": "fp32", "grad_checkpointing": false, "sample_every": 100, "num_sample_prompts": 6,
  "num_sample_seeds": 4, "checkpoint_every": 50, "keep_checkpoints": 3, "max_bad_steps": 10, "resume": null,
  "overwrite": false, "world_size": 1, "effective_batch": 2
}"""


def test_a_run_written_by_an_older_r0_py_resumes_with_or_without_its_flags_typed_again(tmp_path):
    """A run folder in the format of commit 6f50b03: its config.json (above: `rewards` a string), a checkpoint whose
    config holds that string and `rank`, whose CUDA state is a list and which has no fingerprint, a summary and log of
    that time. Today's r0.py resumes it, also with `--rewards color=1.0` typed again (not a change), to the same
    weights either way. (A run whose config held a string crashed on resume with KeyError: 'c'.)"""
    out = tmp_path / "old"
    r0.train(run_cfg(out, "--max-steps", "1", "--sample-every", "100"))  # today's files, rewritten in the old format
    config = CONFIG_OF_6F50B03 % {"prompts": json.dumps(few_prompts()), "out": json.dumps(str(out))}
    (out / "config.json").write_text(config)
    ckpt = torch.load(out / "checkpoints" / "step_000001.pt", weights_only=True)
    ckpt["config"] = {**json.loads(config), "resume_checkpoint": None, "rank": 0}
    ckpt["ranks"] = [{**ckpt.pop("rng"), "cuda_rng": []}]  # that time's layout; torch.cuda.get_rng_state_all() or []
    del ckpt["fingerprint"], ckpt["threads"]
    torch.save(ckpt, out / "checkpoints" / "step_000001.pt")
    (out / "summary.json").write_text(json.dumps({"colour_accuracy_before": 0.05,
                                                  "colour_accuracy_before_per_colour": {"red": 0.0}}))
    (out / "log.jsonl").write_text(json.dumps({"step": 1, "color": -0.43, "reg": 0.0, "surrogate": 39.1, "loss": 39.1,
                                               "grad_norm": 18.6, "lr": 0.01, "seconds": 0.2, "peak_mem_gb": 1.1})
                                   + "\n")
    again = tmp_path / "typed_again"
    shutil.copytree(out, again)
    for folder, typed in ((out, []), (again, ["--rewards", "color=1.0", "--lora-rank", "8"])):
        cfg = r0.resolve_config(r0.build_parser().parse_args(["--resume", str(folder), "--max-steps", "2", *typed]))
        assert cfg.rewards == {"color": 1.0} and cfg.normalize == "sample" and cfg.random_eta
        r0.train(cfg)
        assert [json.loads(line)["step"] for line in open(folder / "log.jsonl")] == [1, 2]
    with pytest.raises(r0.UserError, match="cannot change --rewards"):  # a real change is still refused
        r0.resolve_config(r0.build_parser().parse_args(["--resume", str(again), "--rewards", "color=0.5"]))
    a, b = (torch.load(d / "checkpoints" / "step_000002.pt", weights_only=True)["trainable"] for d in (out, again))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_frozen_models_other_than_those_the_run_started_from(tmp_path, monkeypatch):
    """theta_0 of --tiny is rebuilt by a miniature pretraining whose float sums depend on the machine and the thread
    count (1 and 2 threads here give a UNet whose sum of |w| differs in the 7th digit, a VAE in the 4th); a hub
    model's snapshot can change. The checkpoint's fingerprint of the frozen models catches both, in one sentence."""
    r0.train(run_cfg(tmp_path, "--max-steps", "1"))
    assert torch.load(tmp_path / "checkpoints" / "step_000001.pt", weights_only=True)["threads"] == torch.get_num_threads()
    real_build = r0.build_tiny_sd15

    def rebuilt_elsewhere(seed=0):  # what another thread count makes: every UNet weight a little off
        tokenizer, text_encoder, vae, unet = real_build(seed)
        with torch.no_grad():
            for p in unet.parameters():
                p.mul_(1 + 1e-7)
        return tokenizer, text_encoder, vae, unet

    monkeypatch.setattr(r0, "build_tiny_sd15", rebuilt_elsewhere)
    cfg = r0.resolve_config(r0.build_parser().parse_args(["--resume", str(tmp_path), "--max-steps", "2"]))
    with pytest.raises(r0.UserError, match=f"frozen models .* differ .* OMP_NUM_THREADS={torch.get_num_threads()}"):
        r0.train(cfg)
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1]  # nothing lost


def test_resume_refuses_a_checkpoint_whose_trained_weights_this_unet_does_not_have(tmp_path):
    """A peft or diffusers that names the adapters otherwise: load_state_dict(strict=False) would load none of them
    and the run would go on from LoRA's init under the old AdamW state. It is refused in one sentence instead."""
    r0.train(run_cfg(tmp_path, "--max-steps", "1"))
    path = tmp_path / "checkpoints" / "step_000001.pt"
    state = torch.load(path, weights_only=True)
    state["trainable"] = {k.replace("lora_A", "lora_down"): v for k, v in state["trainable"].items()}
    torch.save(state, path)
    cfg = r0.resolve_config(r0.build_parser().parse_args(["--resume", str(tmp_path), "--max-steps", "2"]))
    with pytest.raises(r0.UserError, match="not this UNet's trainable ones"):
        r0.train(cfg)
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1]  # nothing lost
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000001.pt"]


def test_a_full_disk_warns_once_keeps_training_and_stops_at_a_checkpoint_that_cannot_be_written(tmp_path,
                                                                                                monkeypatch, capsys):
    """From step 2 the disk is full (every write into the run folder goes to /dev/full: ENOSPC, as a real full disk
    gives; torch's zip writer raises RuntimeError there). Step 2's grid and log line fail: one warning, and training
    goes on to step 2's checkpoint, which cannot be written either: the run stops in one sentence naming the last
    checkpoint. Nothing written before is damaged: with space again, --resume finishes the run with the weights of
    a run that never met a full disk."""
    import builtins
    import stat
    if not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)):
        pytest.skip("needs /dev/full, the device whose every write fails with ENOSPC")
    real_open, real_save, real_step, full = builtins.open, torch.save, r0.r0_step, []
    out = tmp_path / "run"

    def in_run(path):
        return str(os.path.abspath(path)).startswith(str(out))

    def disk_open(path, mode="r", *args, **kwargs):
        if full and isinstance(path, (str, os.PathLike)) and in_run(path) and any(c in mode for c in "wax"):
            return real_open("/dev/full", mode.replace("x", "w"), *args, **kwargs)
        return real_open(path, mode, *args, **kwargs)

    def disk_save(obj, f, *args, **kwargs):
        return real_save(obj, "/dev/full" if full and in_run(f) else f, *args, **kwargs)

    def step(m, prompts, cfg, generator):
        full.extend([True] if step.calls else [])  # the disk fills during step 2
        step.calls += 1
        return real_step(m, prompts, cfg, generator)

    step.calls = 0
    monkeypatch.setattr(builtins, "open", disk_open)
    monkeypatch.setattr(torch, "save", disk_save)
    monkeypatch.setattr(r0, "r0_step", step)
    argv = ["--max-steps", "3", "--checkpoint-every", "1", "--sample-every", "1"]
    with pytest.raises(r0.UserError, match=r"could not write checkpoint .*step_000002.pt \(.*\); stopped.* the last "
                                           r"checkpoint is .*step_000001.pt") as err:
        r0.train(run_cfg(out, *argv))
    assert err.value.exit_code == 1
    printed = capsys.readouterr().out
    assert printed.count("warning: could not write") == 1 and "samples/step_000002.png (No space left" in printed
    full.clear()
    monkeypatch.setattr(r0, "r0_step", real_step)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000001.pt"]  # no temporary file left behind
    assert [json.loads(line)["step"] for line in real_open(out / "log.jsonl")] == [1]  # whole lines only
    r0.train(r0.resolve_config(r0.build_parser().parse_args(["--resume", str(out)])))
    r0.train(run_cfg(tmp_path / "never_full", *argv))
    a, b = (torch.load(d / "checkpoints" / "step_000003.pt", weights_only=True) for d in (out, tmp_path / "never_full"))
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])


def test_resume_of_a_run_written_before_the_ablation_switches_and_detail(tmp_path):
    """A run folder from before --no-normalize / --no-random-eta and the detail measure (no such keys in config.json,
    the older summary keys) resumes, with those switches at their defaults."""
    r0.train(run_cfg(tmp_path, "--max-steps", "1"))
    config = json.load(open(tmp_path / "config.json"))
    del config["normalize"], config["random_eta"]
    json.dump(config, open(tmp_path / "config.json", "w"))
    json.dump({"colour_accuracy_before": 0.05, "colour_accuracy_before_per_colour": {"red": 0.0}},
              open(tmp_path / "summary.json", "w"))
    cfg = r0.resolve_config(r0.build_parser().parse_args(["--resume", str(tmp_path), "--max-steps", "2"]))
    assert cfg.normalize == "sample" and cfg.random_eta
    r0.train(cfg)
    config["normalize"] = False  # a run of the raw-gradient ablation of that time: --no-normalize
    json.dump(config, open(tmp_path / "config.json", "w"))
    assert r0.resolve_config(r0.build_parser().parse_args(["--resume", str(tmp_path)])).normalize == "none"
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2]


def test_resume_drops_log_lines_written_after_the_last_checkpoint(tmp_path):
    r0.train(run_cfg(tmp_path, "--max-steps", "2", "--checkpoint-every", "1"))
    os.remove(tmp_path / "checkpoints" / "step_000002.pt")  # as if the run crashed after logging step 2
    cfg = r0.resolve_config(r0.build_parser().parse_args(["--resume", str(tmp_path), "--max-steps", "3"]))
    assert cfg.resume_checkpoint.endswith("step_000001.pt")
    r0.train(cfg)
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2, 3]


def test_interrupt_finishes_the_step_saves_a_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch):
    real_step, calls = r0.r0_step, []

    def step_then_ctrl_c(*args):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of step 2
        return real_step(*args)

    monkeypatch.setattr(r0, "r0_step", step_then_ctrl_c)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(r0.UserError, match=r"--resume") as stopped:
        r0.train(run_cfg(tmp_path, "--max-steps", "5", "--checkpoint-every", "100"))
    assert stopped.value.exit_code == 130 and len(calls) == 2  # step 2 finished, step 3 never started
    assert os.listdir(tmp_path / "checkpoints") == ["step_000002.pt"]
    assert signal.getsignal(signal.SIGINT) == handler_before  # our handler is gone again
    # a second interrupt exits at once
    exits = []
    monkeypatch.setattr(r0.os, "_exit", exits.append)
    with r0.stop_on_signal() as stop:
        signal.raise_signal(signal.SIGINT)
        assert exits == [] and stop.signum == signal.SIGINT
        signal.raise_signal(signal.SIGINT)
        assert exits == [130]


def test_an_interrupt_while_the_final_pipeline_is_written_lets_it_be_written_whole(tmp_path, monkeypatch):
    """Ctrl-C after the last step, while the diffusers pipeline is being written, is handled as one during a step: the
    writing finishes (pipeline and summary whole, no KeyboardInterrupt midway), and our handler is gone afterwards."""
    real_save, calls = r0.save_pipeline, []

    def ctrl_c_then_save(m, cfg):
        calls.append(1)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C as the final writes begin
        real_save(m, cfg)

    monkeypatch.setattr(r0, "save_pipeline", ctrl_c_then_save)
    handler_before = signal.getsignal(signal.SIGINT)
    try:
        r0.train(run_cfg(tmp_path, "--max-steps", "1"))
    except KeyboardInterrupt:
        pytest.fail("the interrupt cut the final writes off midway")
    assert calls == [1] and (tmp_path / "pipeline" / "model_index.json").exists()
    assert json.load(open(tmp_path / "summary.json"))["after"]["colour_accuracy"] >= 0
    assert signal.getsignal(signal.SIGINT) == handler_before


def test_sigterm_on_the_real_command_line_checkpoints_and_exits_cleanly(tmp_path):
    import signal as _signal
    import time as _time
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(HERE, "r0.py"), "--tiny", "--prompts", PROMPTS, "--output-dir", str(out),
           "--max-steps", "1000", "--batch-size", "2", "--sample-every", "1000", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = _time.time() + 600  # a generous bound: a loaded machine starts slowly
    while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text():
        assert proc.poll() is None and _time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        _time.sleep(0.2)
    proc.send_signal(_signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and f"--resume {out}" in err
    assert len(os.listdir(out / "checkpoints")) == 1


def test_non_finite_values_skip_the_update_and_stop_after_max_bad_steps(tmp_path, monkeypatch):
    real_forward, calls, captured = r0.ColourReward.forward, [], {}

    def nan_from_third_call(self, pixels, prompts, text_emb=None):  # training's calls (the measures' run no_grad)
        scores = real_forward(self, pixels, prompts, text_emb)
        calls.extend([1] if torch.is_grad_enabled() else [])
        return scores * float("nan") if len(calls) >= 3 and torch.is_grad_enabled() else scores

    real_load = r0.load_models
    monkeypatch.setattr(r0, "load_models", lambda cfg: captured.setdefault("m", real_load(cfg)))
    monkeypatch.setattr(r0.ColourReward, "forward", nan_from_third_call)
    with pytest.raises(r0.UserError, match="step_000002.pt") as stopped:
        r0.train(run_cfg(tmp_path, "--max-steps", "10", "--checkpoint-every", "1", "--max-bad-steps", "2"))
    assert stopped.value.exit_code == 3
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and ["skipped" in r for r in log] == [False, False, True, True]
    assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "step_000002.pt"  # the last good one, kept
    good = torch.load(tmp_path / "checkpoints" / "step_000002.pt", weights_only=True)["trainable"]
    weights = dict(captured["m"].unet.named_parameters())
    assert all(torch.equal(weights[k].detach(), v) for k, v in good.items())  # two NaN steps changed nothing


def test_a_skipped_micro_batch_frees_its_graph_before_the_next_one_is_built(tmp_path, monkeypatch):
    """--grad-accum 2, the first micro-batch's loss NaN: never backpropagated, its graph (K UNet calls, the decoder,
    their activations) must be gone before the second micro-batch's forward, or a NaN step doubles the memory."""
    cfg = run_cfg(tmp_path, "--max-steps", "1", "--grad-accum", "2")
    m = r0.load_models(cfg)
    params = r0.trainable_parameters(m.unet)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    order, gen = r0.PromptOrder(r0.load_prompts(PROMPTS), 0), torch.Generator().manual_seed(0)
    losses, real_step = [], r0.r0_step

    def first_loss_nan(m, prompts, cfg, generator):
        if losses:
            assert losses[0]() is None, "the skipped micro-batch's graph is still held"
        loss, stats = real_step(m, prompts, cfg, generator)
        loss = loss if losses else loss * float("nan")
        losses.append(weakref.ref(loss))
        return loss, stats

    monkeypatch.setattr(r0, "r0_step", first_loss_nan)
    stats, grad_norm, applied = r0.optimizer_step(m, optimizer, params, order, cfg, gen)
    assert len(losses) == 2 and not applied and all(p.grad is None for p in params)


@pytest.mark.parametrize("fault", ["reward of the last micro-batch", "loss of the first micro-batch",
                                   "gradient behind a finite loss"])
def test_a_non_finite_micro_batch_leaves_weights_and_optimizer_state_untouched(tmp_path, monkeypatch, fault):
    """--grad-accum 2: a NaN/Inf anywhere (a reward, the loss, or only in the backward's gradient while every logged
    value is finite) skips the whole update: weights and AdamW moments stay bitwise as they were."""
    cfg = run_cfg(tmp_path, "--max-steps", "1", "--grad-accum", "2")
    m = r0.load_models(cfg)
    params = perturbed(m)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    order, gen = r0.PromptOrder(r0.load_prompts(PROMPTS), 0), torch.Generator().manual_seed(0)
    assert r0.optimizer_step(m, optimizer, params, order, cfg, gen)[2]  # a good step: optimizer state exists
    weights, state = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())
    calls, real_forward = [], r0.ColourReward.forward

    def faulty(self, pixels, prompts, text_emb=None):
        calls.append(1)
        scores = real_forward(self, pixels, prompts, text_emb)
        if fault == "reward of the last micro-batch" and len(calls) == 2:
            return scores * float("inf")
        if fault == "loss of the first micro-batch" and len(calls) == 1:
            return scores + float("nan") * pixels.sum()
        return scores

    monkeypatch.setattr(r0.ColourReward, "forward", faulty)
    if fault == "gradient behind a finite loss":  # e.g. an overflow in the backward only
        params[0].register_hook(lambda g: g * float("nan"))
    stats, grad_norm, applied = r0.optimizer_step(m, optimizer, params, order, cfg, gen)
    assert not applied and len(calls) == 2
    assert np.isfinite(stats["color"]) == (fault == "gradient behind a finite loss")
    assert all(torch.equal(w, p) for w, p in zip(weights, params)) and all(p.grad is None for p in params)
    after = optimizer.state_dict()
    assert all(torch.equal(after["state"][i][k], state["state"][i][k]) for i in state["state"] for k in state["state"][i])


def test_cfg_reward_gradient_is_d_log_p_c_given_x_t_and_a_step_along_it_raises_it():
    """ImplicitCfgReward on a stub base model whose eps is known in closed form: data of the prompt's class c are
    N(mu_c, I), the unconditional model is the mixture of classes c and o, so at x_t = sqrt(a) x0 + sqrt(1-a) n
        eps_c = sqrt(1-a) (x_t - sqrt(a) mu_c),   eps_u = sqrt(1-a) (x_t - sqrt(a) E[mu | x_t]),
        eps_u - eps_c = sqrt(a (1-a)) p(o | x_t) (mu_c - mu_o),
    and (x_t ~ N(sqrt(a) mu, I), dx_t/dx0 = sqrt(a)) d log p(c | x_t) / d x0 = a p(o | x_t) (mu_c - mu_o)
    = sqrt(a / (1-a)) (eps_u - eps_c).
    The reward's gradient must be exactly that (the factor included: --normalize none follows it raw), a small step of
    x0 along it must raise log p(c | x_t), and it must shrink the logged guidance gap ||eps_c - eps_u||^2."""
    ac = r0.sd15_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    mu_c, mu_o = 0.5 * torch.randn((1, 4, 2, 2), generator=g), 0.5 * torch.randn((1, 4, 2, 2), generator=g)

    def p_class(x_t, a):  # (N,2): p(c | x_t), p(o | x_t) for equal class priors
        logits = [-0.5 * (x_t - a.sqrt() * mu).flatten(1).pow(2).sum(1) for mu in (mu_c, mu_o)]
        return torch.stack(logits, 1).softmax(1)

    def base_eps(x, t, emb):  # emb[:, 0, 0] = 1 for the prompt's embedding, 0 for the empty prompt's
        a = ac[t].view(-1, 1, 1, 1)
        post = p_class(x, a)
        mean_u = post[:, :1, None, None] * mu_c + post[:, 1:, None, None] * mu_o
        cond = emb[:, 0, 0].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * (cond * mu_c + (1 - cond) * mean_u))

    B = 4
    text_emb, uncond = torch.zeros(B, 77, 8), torch.zeros(1, 77, 8)
    text_emb[:, 0, 0] = 1
    reward = r0.ImplicitCfgReward(base_eps, uncond, ac)
    x0 = 0.5 * (mu_c + mu_o) + 0.3 * torch.randn((B, 4, 2, 2), generator=g)
    gap, direction = reward.gradient(x0, ["a prompt"] * B, text_emb, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)  # the reward's draws: t ~ U{20..980}, then the noise n
    t = torch.randint(20, 981, (B,), generator=replay)
    n = torch.randn(x0.shape, generator=replay)
    a = ac[t].view(-1, 1, 1, 1)

    def x_t_of(x0):
        return a.sqrt() * x0 + (1 - a).sqrt() * n

    p_o = p_class(x_t_of(x0), a)[:, 1].view(-1, 1, 1, 1)
    assert_fp32_close(direction, a * p_o * (mu_c - mu_o))
    x0_ = x0.clone().requires_grad_(True)  # the same by autograd on log p(c | x_t)
    (autograd,) = torch.autograd.grad(p_class(x_t_of(x0_), a)[:, 0].log().sum(), x0_)
    assert_fp32_close(direction, autograd)
    stepped = x0 + 0.5 * direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    gap_after, _ = reward.gradient(stepped, ["a prompt"] * B, text_emb, torch.Generator().manual_seed(5))
    log_p_c = lambda x0: p_class(x_t_of(x0), a)[:, 0].log()
    assert (log_p_c(stepped) > log_p_c(x0)).all() and (gap_after < gap).all()


def test_out_of_gpu_memory_on_the_first_step_halves_the_micro_batch_and_keeps_the_run_exact(tmp_path, monkeypatch,
                                                                                           capsys):
    """A micro-batch too large for the GPU: the first step retries at half the batch and twice the accumulation
    (the same effective batch and the same random draws), until it fits; at batch 1, one sentence."""
    real_step = r0.r0_step

    def small_gpu(m, prompts, cfg, generator):  # memory for 2 images at most
        if len(prompts) > 2:
            torch.randn(1, generator=generator)  # some random draws happen before the memory runs out
            raise torch.OutOfMemoryError("CUDA out of memory. (simulated)")
        return real_step(m, prompts, cfg, generator)

    monkeypatch.setattr(r0, "r0_step", small_gpu)
    r0.train(run_cfg(tmp_path / "a", "--batch-size", "8", "--grad-accum", "1", "--max-steps", "2"))
    out = capsys.readouterr().out
    assert "--batch-size 4 --grad-accum 2" in out and "--batch-size 2 --grad-accum 4" in out
    saved = json.load(open(tmp_path / "a" / "config.json"))
    assert (saved["batch_size"], saved["grad_accum"]) == (2, 4)  # what a --resume continues with
    monkeypatch.setattr(r0, "r0_step", real_step)
    r0.train(run_cfg(tmp_path / "b", "--batch-size", "2", "--grad-accum", "4", "--max-steps", "2"))
    a, b = (torch.load(tmp_path / d / "checkpoints" / "step_000002.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in b["trainable"])

    def no_gpu_memory(m, prompts, cfg, generator):
        raise torch.OutOfMemoryError("CUDA out of memory. (simulated)")

    monkeypatch.setattr(r0, "r0_step", no_gpu_memory)  # an odd batch retries at micro-batches of 1, then stops
    with pytest.raises(r0.UserError, match="out of GPU memory at --batch-size 1, the smallest micro-batch; use "
                                           "--r0-plus") as err:
        r0.train(run_cfg(tmp_path / "c", "--batch-size", "3", "--max-steps", "1"))
    assert "--batch-size 1 --grad-accum 3" in capsys.readouterr().out and "--grad-accum" not in str(err.value)

    # AdamW's state does not fit at all: a smaller micro-batch cannot help, so one sentence before the first step
    monkeypatch.setattr(r0, "r0_step", real_step)
    real_optimizer = r0.make_optimizer

    def optimizer_without_memory(params, cfg):
        optimizer = real_optimizer(params, cfg)
        optimizer.step = lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory. (simulated)"))
        return optimizer

    monkeypatch.setattr(r0, "make_optimizer", optimizer_without_memory)
    with pytest.raises(r0.UserError, match="out of GPU memory for AdamW's state"):
        r0.train(run_cfg(tmp_path / "d", "--batch-size", "4", "--max-steps", "1"))
    assert "retrying" not in capsys.readouterr().out


def test_the_first_step_is_the_heaviest_so_its_out_of_memory_retry_covers_the_run(tmp_path, monkeypatch, capsys):
    """AdamW's state (two fp32 copies of the trainable weights) exists before the first forward, so step 1 needs
    all the memory any later step does. Simulated GPU: the state and 2 images fit, the state and 4 do not. Step 1
    retries at half the batch and every later step fits (lazily, step 1 would fit at 4 and step 2 die). Creating
    the state early changes no number: the weights equal those of a run started at the smaller batch."""
    real_step, real_optimizer, optimizers = r0.r0_step, r0.make_optimizer, []

    def record(params, cfg):
        optimizers.append(real_optimizer(params, cfg))
        return optimizers[-1]

    def gpu(m, prompts, cfg, generator):  # the AdamW state and 2 images fit; the state and 4 do not
        if len(prompts) > 2 and optimizers[-1].state:
            raise torch.OutOfMemoryError("CUDA out of memory. (simulated)")
        return real_step(m, prompts, cfg, generator)

    monkeypatch.setattr(r0, "make_optimizer", record)
    monkeypatch.setattr(r0, "r0_step", gpu)
    r0.train(run_cfg(tmp_path / "a", "--batch-size", "4", "--max-steps", "3"))
    assert "retrying with --batch-size 2 --grad-accum 2" in capsys.readouterr().out
    monkeypatch.setattr(r0, "r0_step", real_step)
    r0.train(run_cfg(tmp_path / "b", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "3"))
    a, b = (torch.load(tmp_path / d / "checkpoints" / "step_000003.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in b["trainable"])
    # and against AdamW's own lazy state: two updates from the same gradients, bitwise the same
    w = [torch.randn(5, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    lazy, early = [[p.clone().requires_grad_(True) for p in w] for _ in range(2)]
    opt_lazy, opt_early = torch.optim.AdamW(lazy, lr=0.1, weight_decay=0.0), torch.optim.AdamW(early, lr=0.1,
                                                                                                 weight_decay=0.0)
    r0.allocate_optimizer_state(opt_early, early)
    assert all(torch.equal(p, q) for p, q in zip(early, w)) and len(opt_early.state) == 2
    for k in range(2):
        for params, opt in ((lazy, opt_lazy), (early, opt_early)):
            for i, p in enumerate(params):
                p.grad = torch.full_like(p, 0.5 + i + k)
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(lazy, early))


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), "is a directory"),
    (lambda d: d.write_text(""), "holds no prompts"),
    (lambda d: d.write_text("# only a comment\n\n   \n"), "holds no prompts"),
    (lambda d: d.write_bytes(b"a red \xff\xfe fox\n"), "not UTF-8"),
])
def test_bad_prompt_files_are_one_clear_sentence(tmp_path, capsys, make, message):
    make(tmp_path / "prompts.txt")
    with pytest.raises(SystemExit) as exit_info:
        r0.main(["--tiny", "--prompts", str(tmp_path / "prompts.txt"), "--output-dir", str(tmp_path / "out"),
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_long_prompts_warn_once_and_train(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n" + "a very long prompt about a blue car " * 12 + "\n", encoding="utf-8")
    r0.train(run_cfg(tmp_path / "out", "--max-steps", "1", prompts=str(prompts)))
    out = capsys.readouterr().out
    assert out.count("longer than CLIP's 77-token limit") == 1 and "1 of 2 prompts" in out


def test_output_dir_with_another_run_is_refused_untouched_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    r0.train(run_cfg(out, "--max-steps", "1"))
    before = {f: (out / f).read_bytes() for f in ("log.jsonl", "config.json")}
    with pytest.raises(SystemExit) as exit_info:
        r0.main(["--tiny", "--prompts", PROMPTS, "--output-dir", str(out), "--max-steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "already holds a run" in err and "--overwrite" in err
    assert {f: (out / f).read_bytes() for f in before} == before
    r0.train(run_cfg(out, "--max-steps", "2", "--overwrite"))
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2]


def test_overwrite_keeps_the_previous_run_until_the_set_up_has_worked(tmp_path, monkeypatch, capsys):
    """--overwrite removes the run already in --output-dir only once loading, the base images and AdamW's state have
    worked: a set-up that fails (here AdamW's state out of GPU memory) leaves every file of the previous run as it was."""
    out = tmp_path / "run"
    r0.train(run_cfg(out, "--max-steps", "1"))
    files = lambda: {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    before = files()

    def out_of_memory(optimizer, params):
        raise r0.UserError("out of GPU memory for AdamW's state (a stand-in)")
    monkeypatch.setattr(r0, "allocate_optimizer_state", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        r0.main(["--tiny", "--prompts", few_prompts(), "--output-dir", str(out), "--max-steps", "1", "--device", "cpu",
                 "--overwrite"])
    assert exit_info.value.code == 2 and "AdamW's state" in capsys.readouterr().err
    assert len(before) > 3 and files() == before


def test_unwritable_output_dir_and_non_sd15_model_are_refused_before_writing(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        r0.main(["--tiny", "--prompts", PROMPTS, "--output-dir", str(tmp_path / "file" / "run"), "--device", "cpu"])
    assert "cannot write to --output-dir" in capsys.readouterr().err
    # a local diffusers folder whose scheduler predicts v (SD2-style): refused, and no run folder appears
    from diffusers import StableDiffusionPipeline
    tok, te, vae, unet = r0.build_tiny_sd15(seed=0)
    scheduler = r0.few_step_scheduler({**r0.SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp_path / "v_model")
    with pytest.raises(SystemExit) as exit_info:
        r0.main(["--model", str(tmp_path / "v_model"), "--prompts", PROMPTS, "--output-dir", str(tmp_path / "out"),
                 "--rewards", "color=1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "epsilon" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# Benchmark, not a test: speed and memory on SD1.5's real architecture (UNet 860M, VAE, text encoder) and two
# full-size ViT-H-14 reward towers, all with random weights built in code (offline: r0.py's --tiny path, its
# builders swapped for the full-size ones below in the worker processes).
#   R0_BENCHMARK=1 python -m pytest -s -q test_r0.py -k benchmark
# Knobs (environment; default on a GPU / on a CPU):
#   R0_BENCH_MODES      lora,lora+,full,full+,sampling / lora,lora+,sampling
#   R0_BENCH_RES        512 / 256              pixels
#   R0_BENCH_BATCHES    1,2,4,8,16 / 1,2       each mode stops at the first batch size that runs out of memory
#   R0_BENCH_PRECISION  auto                   r0.py's --precision: bf16 on a GPU, fp32 on a CPU
#   R0_BENCH_REWARDS    hps=1.0,clip=1.0       r0.py's --rewards (two ViT-H-14 towers); full size: hps, clip, cfg
#   R0_BENCH_REPEATS    5 / 1                  timed repeats after one warm-up
#   R0_BENCH_SIZE       full                   'tiny' checks the benchmark code itself in seconds
# Each mode runs in its own process (a clean peak-memory reading). It prints figures; it asserts no timings.

BENCH_MODES = {"lora": ("64", False), "lora+": ("64", True), "full": ("0", False), "full+": ("0", True)}
BENCH_SIZE = os.environ.get("R0_BENCH_SIZE", "full")


def full_size_sd15(seed=0):
    """SD1.5's (tokenizer, text_encoder, vae, unet) at their published shapes (the numbers of its unet/vae/text_encoder
    config.json files), with random weights. Like r0.py's builders, it leaves the global RNG as it found it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                    attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                                            eos_token_id=49407, pad_token_id=49407))
    return r0.sd15_tokenizer_offline(), text, vae, unet


def full_size_clip_tower(seed=0):
    """open_clip's ViT-H-14 (the HPS v2.1 / CLIP-score architecture) with random weights, and its tokenizer."""
    import open_clip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.create_model("ViT-H-14", pretrained=None)
    return model, open_clip.get_tokenizer("ViT-H-14")


def bench_timed(fn, repeats, device):
    """Mean seconds of fn() over `repeats` calls, after one warm-up call (allocator, kernel selection)."""
    import time
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


# dense bf16 peak of the GPUs we know (from their data sheets), for the model FLOP utilization; R0_BENCH_PEAK_TFLOPS
# names another card's. Matched against torch.cuda.get_device_name() in this order.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L40S", 362.1),
                    ("RTX 4090", 165.2), ("A10G", 70.0), ("L4", 121.0)]


def peak_flops(device):
    if os.environ.get("R0_BENCH_PEAK_TFLOPS"):
        return float(os.environ["R0_BENCH_PEAK_TFLOPS"]) * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def bench_utilization(fn, device, seconds):
    """(share of the wall time the GPU is busy, FLOPs of one call of fn). The busy share is the kernel time that
    torch.profiler records over one call, over `seconds` (the mean wall time of an unprofiled call): well under 1,
    the step waits on the CPU launching kernels. FLOPs are counted by torch.utils.flop_counter (matmuls and
    convolutions, the recomputation of gradient checkpointing included)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class FlopCount(TorchDispatchMode):  # FlopCounterMode's own arithmetic, without its module tracker (whose
        flops = 0                        # hooks refuse the reward's torch.autograd.grad)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in flop_registry:
                self.flops += flop_registry[func.overloadpacket](*args, **(kwargs or {}), out_val=out)
            return out

    with FlopCount() as counter:
        fn()
    busy = None
    if device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6 / seconds
    return busy, counter.flops


def tensors_gb(tensors):
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def bench_mode(mode, resolution, device, precision, rewards, repeats, batch_sizes):
    """One training mode, for each batch size until one runs out of memory: seconds per step and its parts,
    images/s, peak memory, and the static memory (weights, gradients, AdamW state) counted from the tensors.
    Yields one row per batch size (printed at once: on a CPU, running out of RAM kills the process)."""
    rank, plus = BENCH_MODES[mode]
    # before anything is loaded: the Python runtime and libraries (peak RSS counts them; CUDA's allocator does not)
    runtime_gb = 0.0 if device.startswith("cuda") else r0.peak_memory_gb(device)
    m = None
    for batch in batch_sizes:
        argv = ["--prompts", PROMPTS, "--output-dir", tempfile.mkdtemp(), "--device", device, "--lora-rank", rank,
                "--resolution", str(resolution), "--batch-size", str(batch), "--grad-accum", "1",
                "--precision", precision, "--rewards", rewards] + (["--r0-plus"] if plus else [])
        cfg = r0.resolve_config(r0.build_parser().parse_args(argv))
        cfg.tiny = True  # r0.py's own builders, no download (in a worker process they build the full size)
        assert not (BENCH_SIZE == "full" and "imagereward" in rewards), \
            "no full-size ImageReward here (r0.py's --tiny builds a tiny one): leave it out of R0_BENCH_REWARDS"
        try:
            if m is None:
                m = r0.load_models(cfg)
                params = r0.trainable_parameters(m.unet)
                optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=device.startswith("cuda"))
                order, gen = r0.PromptOrder(r0.load_prompts(PROMPTS), 0), torch.Generator(device).manual_seed(0)
            timed = functools.partial(bench_timed, repeats=repeats, device=device)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            one_step = lambda: r0.optimizer_step(m, optimizer, params, order, cfg, gen)
            step = timed(one_step)
            peak = r0.peak_memory_gb(device)
            busy, flops = bench_utilization(one_step, device, step)
        except torch.OutOfMemoryError:
            yield {"mode": mode, "batch": batch, "oom": True}
            return
        modules = [m.unet, m.frozen_unet, m.vae, m.text_encoder] + [r.model for r in m.rewards.values()
                                                                     if hasattr(r, "model")]
        memory = {"weights": tensors_gb(p for mod in modules if mod is not None for p in mod.parameters()),
                  "grads": tensors_gb(params),  # set to None after each step; they exist from backward to step
                  "adamw": tensors_gb(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))}
        memory["activations"] = peak - runtime_gb - sum(memory.values())  # + allocator caches and transients
        memory["runtime"] = runtime_gb
        # the parts, each alone, with the same precision and checkpointing settings; a step is nothing else
        prompts = order.batch(batch)
        h, K = resolution // 8, cfg.steps
        emb = r0.encode_prompts(m.tokenizer, m.text_encoder, prompts)
        x = torch.randn((batch, 4, h, h), device=device)
        t = torch.full((batch,), 999, device=device)
        def unet_fwd_bwd():
            with r0.autocast(device, cfg.precision):
                out = m.unet(x, t, encoder_hidden_states=emb).sample
            out.float().square().mean().backward()
            optimizer.zero_grad(set_to_none=True)
        def unet_fwd_no_grad():
            with torch.no_grad(), r0.autocast(device, cfg.precision):
                m.unet(x, t, encoder_hidden_states=emb)
        def vae_fwd_bwd():
            z = x.clone().requires_grad_(True)
            with r0.autocast(device, cfg.precision):
                r0.decode(m.vae, z).square().mean().backward()
        pixels = torch.rand((batch, 3, resolution, resolution), device=device)
        def rewards_fwd_bwd():
            with r0.autocast(device, cfg.precision):
                r0.composed_reward_gradients(m.rewards, m.reward_weights, pixels, x, prompts, emb)
        def text():
            r0.encode_prompts(m.tokenizer, m.text_encoder, prompts)
        def update():  # the rest of a step: the anchor's forward/backward, clipping, AdamW, over every trainable weight
            (cfg.weight_reg * r0.weight_regularization(m.unet, m.frozen_unet)).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t_unet, t_unet_ng = timed(unet_fwd_bwd), timed(unet_fwd_no_grad)
        # R0: K UNet calls in the graph; R0+: k ~ U{0..K-1} calls without graph, then one in it: (K-1)/2 + 1 on average
        unet_part = (K - 1) / 2 * t_unet_ng + t_unet if plus else K * t_unet
        parts = {"unet": unet_part, "vae": timed(vae_fwd_bwd), "rewards": timed(rewards_fwd_bwd), "text": timed(text),
                 "update": timed(update)}
        yield {"mode": mode, "batch": batch, "resolution": resolution, "device": device, "precision": cfg.precision,
               "s_per_step": step, "images_per_s": batch / step, "peak_gb": peak, "memory_gb": memory,
               "parts_s": parts, "overhead": 1 - sum(parts.values()) / step, "gpu_busy": busy,
               "tflops": flops / step / 1e12, "mfu": flops / step / peak_flops(device) if peak_flops(device) else None,
               "trainable_params": sum(p.numel() for p in params)}


def bench_sampling(resolution, device, precision, repeats, batches):
    """Seconds per image at each batch size: R0 at 1, 2, 4 steps (r0.sample_images, what sample.py uses) beside
    diffusers' StableDiffusionPipeline with our few-step scheduler and guidance 1 (what a run's pipeline/ gives) and
    the base model's 25-step CFG sampler, on the same modules, loaded the way sample.py loads them. The ideal
    speed-up of K steps over the base is the ratio of their UNet and VAE FLOPs, (50 U + D) / (K U + D), counted by
    torch.utils.flop_counter at batch 1; parts: UNet calls + one VAE decode + text encoding, each timed alone."""
    from diffusers import StableDiffusionPipeline
    from torch.utils.flop_counter import FlopCounterMode
    import sample
    precision = {"auto": "bf16" if device.startswith("cuda") else "fp32"}.get(precision, precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    m = sample.as_models((*r0.build_tiny_sd15(), dict(r0.SD15_SCHEDULER_CONFIG)), device, dtype)
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                   scheduler=r0.few_step_scheduler(m.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    timed = functools.partial(bench_timed, repeats=repeats, device=device)
    prompt = ["a red fox in the snow"]
    emb = r0.encode_prompts(m.tokenizer, m.text_encoder, prompt)
    x = torch.randn((1, 4, resolution // 8, resolution // 8), device=device, dtype=dtype)
    t = torch.tensor([999], device=device)
    flops = {}
    with torch.no_grad():
        for name, fn in [("unet", lambda: m.unet(x, t, encoder_hidden_states=emb)), ("vae", lambda: r0.decode(m.vae, x))]:
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[name] = counter.get_total_flops()
        t_unet = timed(lambda: m.unet(x, t, encoder_hidden_states=emb))
        t_unet_cfg = timed(lambda: m.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([emb, emb])))
        t_vae = timed(lambda: r0.decode(m.vae, x))
        t_text = timed(lambda: r0.encode_prompts(m.tokenizer, m.text_encoder, prompt))
    ideal = lambda k: (2 * sample.BASE_STEPS * flops["unet"] + flops["vae"]) / (k * flops["unet"] + flops["vae"])
    rows = []
    for batch in batches:
        prompts, seeds = prompt * batch, list(range(batch))
        latents = torch.stack([r0.initial_noise(s, resolution, device) for s in seeds]).to(dtype)
        base = timed(lambda: sample.sample_base(m, prompts, seeds, resolution, batch)) / batch
        rows.append({"row": "base 25-step CFG 7.5", "batch": batch, "s_per_image": base, "unet_calls": 50,
                     "parts_s": 25 * t_unet_cfg + t_vae + 2 * t_text})
        for k in (1, 2, 4):
            ours = timed(lambda: r0.sample_images(m, prompts, seeds, k, resolution, precision, batch_size=batch)) / batch
            with torch.no_grad():
                theirs = timed(lambda: pipe(prompts, height=resolution, width=resolution, num_inference_steps=k,
                                            guidance_scale=1.0, latents=latents, output_type="pt")) / batch
            rows.append({"row": f"R0 {k}-step", "batch": batch, "s_per_image": ours, "diffusers_s_per_image": theirs,
                         "unet_calls": k, "parts_s": k * t_unet + t_vae + t_text, "speedup_vs_base": base / ours,
                         "diffusers_speedup_vs_base": base / theirs, "ideal_speedup": ideal(k)})
    return {"resolution": resolution, "device": device, "precision": precision, "unet_fwd_s": t_unet,
            "vae_decode_s": t_vae, "unet_gflops": flops["unet"] / 1e9, "vae_gflops": flops["vae"] / 1e9, "rows": rows}


def memory_model():
    """Parameter counts of the full-size models, for the memory model (bf16 frozen, fp32 trainable, AdamW 2x)."""
    tok, te, vae, unet = full_size_sd15()
    tower, _ = full_size_clip_tower()
    n = {"unet": sum(p.numel() for p in unet.parameters()), "vae": sum(p.numel() for p in vae.parameters()),
         "text": sum(p.numel() for p in te.parameters()), "tower": sum(p.numel() for p in tower.parameters())}
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    n["lora64"] = sum(p.numel() for name, p in unet.named_parameters() if "lora" in name)
    return n


def bench_worker(*args):
    """Runs `python test_r0.py bench-mode|bench-sampling ...`; returns (JSON rows, return code, stderr)."""
    out = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")], out.returncode, out.stderr


@pytest.mark.skipif(not os.environ.get("R0_BENCHMARK"), reason="benchmark: set R0_BENCHMARK=1 (and pytest -s)")
def test_benchmark():
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    env = lambda name, gpu_default, cpu_default: os.environ.get(name, gpu_default if gpu else cpu_default)
    modes = env("R0_BENCH_MODES", "lora,lora+,full,full+,sampling", "lora,lora+,sampling").split(",")
    resolution = int(env("R0_BENCH_RES", 512, 256))
    batches = env("R0_BENCH_BATCHES", "1,2,4,8,16", "1,2").split(",")
    precision = os.environ.get("R0_BENCH_PRECISION", "auto")
    rewards = os.environ.get("R0_BENCH_REWARDS", "hps=1.0,clip=1.0")
    repeats = int(env("R0_BENCH_REPEATS", 5, 1))
    print(f"\nbenchmark: {torch.cuda.get_device_name() if gpu else 'CPU'}, {resolution} px, precision {precision}, "
          f"rewards {rewards}, torch {torch.__version__}, {BENCH_SIZE} models")
    for mode in [m for m in modes if m != "sampling"]:  # each mode in a fresh process: its peak memory alone
        rows, code, err = bench_worker("bench-mode", mode, resolution, device, precision, rewards, repeats,
                                         ",".join(batches))
        # a CPU process that runs out of RAM is killed by the kernel (SIGKILL): its rows so far are still printed
        killed = code == -signal.SIGKILL and len(rows) < len(batches)
        assert code == 0 or killed, err[-3000:]
        if killed:
            rows.append({"mode": mode, "batch": int(batches[len(rows)]), "oom": True})
        for r in rows:
            if r.get("oom"):
                print(f"| {mode} | batch {r['batch']} | out of memory |")
                continue
            p, mem = r["parts_s"], r["memory_gb"]
            print(f"| {mode} | {r['precision']} | batch {r['batch']} | {r['s_per_step']:.3f} s/step | "
                  f"{r['images_per_s']:.3f} img/s | peak {r['peak_gb']:.2f} GB = weights {mem['weights']:.2f} + "
                  f"grads {mem['grads']:.2f} + AdamW {mem['adamw']:.2f} + activations {mem['activations']:.2f} + "
                  f"runtime {mem['runtime']:.2f} | parts: UNet {p['unet']:.3f} + VAE {p['vae']:.3f} + rewards "
                  f"{p['rewards']:.3f} + text {p['text']:.3f} + update {p['update']:.3f} s | overhead "
                  f"{r['overhead']:+.1%} | " + (f"GPU busy {r['gpu_busy']:.0%} | " if r["gpu_busy"] is not None else "")
                  + f"{r['tflops']:.3f} TFLOP/s" + (f" = MFU {r['mfu']:.1%}" if r["mfu"] is not None else "") + " |")
    if "sampling" in modes:
        sample_batches = env("R0_BENCH_SAMPLE_BATCHES", "1,8", "1")
        rows, code, err = bench_worker("bench-sampling", resolution, device, precision, repeats, sample_batches)
        assert code == 0 and rows, err[-3000:]
        r = rows[-1]
        parts = lambda row: f"{row['parts_s'] * 1e3:.1f} ms" if row["batch"] == 1 else "-"
        print(f"sampling: one UNet call {r['unet_gflops']:.4g} GFLOP, one VAE decode {r['vae_gflops']:.4g} GFLOP "
              f"(batch 1, torch.utils.flop_counter); ideal speed-up = (50 U + D) / (K U + D)")
        print("| sampler | precision | batch | UNet calls/img | ours s/img | diffusers pipeline s/img | ours / diffusers "
              "| speed-up vs base: ours, diffusers, ideal | parts at batch 1 |")
        for row in r["rows"]:
            if "diffusers_s_per_image" not in row:  # the base row
                print(f"| {row['row']} | {r['precision']} | {row['batch']} | {row['unet_calls']} | "
                      f"{row['s_per_image'] * 1e3:.1f} ms | - | - | 1x | {parts(row)} |")
                continue
            print(f"| {row['row']} | {r['precision']} | {row['batch']} | {row['unet_calls']} | "
                  f"{row['s_per_image'] * 1e3:.1f} ms | {row['diffusers_s_per_image'] * 1e3:.1f} ms | "
                  f"{row['s_per_image'] / row['diffusers_s_per_image']:.2f} | {row['speedup_vs_base']:.2f}x, "
                  f"{row['diffusers_speedup_vs_base']:.2f}x, {row['ideal_speedup']:.2f}x | {parts(row)} |")
    n = memory_model()
    gb = 1 / 2**30
    print(f"parameters: UNet {n['unet'] / 1e6:.1f}M, VAE {n['vae'] / 1e6:.1f}M, text encoder {n['text'] / 1e6:.1f}M, "
          f"ViT-H-14 tower {n['tower'] / 1e6:.1f}M (x2), LoRA-64 adapters {n['lora64'] / 1e6:.2f}M")
    frozen = (n["vae"] + n["text"] + 2 * n["tower"]) * 2 * gb  # bf16
    print(f"memory model (GB, before activations): LoRA: frozen bf16 {frozen + 2 * n['unet'] * gb:.2f} + LoRA fp32 "
          f"weights/grads/AdamW {16 * n['lora64'] * gb:.2f}; full: frozen bf16 {frozen:.2f} + UNet fp32 weights/"
          f"grads/AdamW {16 * n['unet'] * gb:.2f} + theta_0 copy {4 * n['unet'] * gb:.2f}")


if __name__ == "__main__":  # the benchmark's worker processes
    if BENCH_SIZE == "full":  # r0.py's tiny builders give SD1.5 and ViT-H-14 at their real sizes here instead
        r0.build_tiny_sd15, r0.build_tiny_clip_tower = full_size_sd15, full_size_clip_tower
    if sys.argv[1] == "bench-mode":
        if sys.argv[4] == "cpu":  # out of RAM, the kernel should kill this worker, not the process that waits for it
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        mode, resolution, device, precision, rewards, repeats, batches = sys.argv[2:9]
        for row in bench_mode(mode, int(resolution), device, precision, rewards, int(repeats),
                              [int(b) for b in batches.split(",")]):
            print(json.dumps(row), flush=True)
    elif sys.argv[1] == "bench-sampling":
        print(json.dumps(bench_sampling(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]),
                                        [int(b) for b in sys.argv[6].split(",")])))
