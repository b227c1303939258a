"""
Few-step images from an R0 generator, side by side with the base model, scored: the paper's Table 1 in miniature.

    python sample.py --run runs/r0 --prompt "a red fox in the snow"                  # 4-step R0 images
    python sample.py --run runs/r0 --prompts prompts.txt --compare-base --score      # base 25-step CFG vs R0 1/2/4
    python sample.py --tiny --prompt "a red fox" --compare-base --score              # offline, no run needed

The generator, its sampler, the rewards and the grids come from r0.py; this file adds the base model's 25-step
sampler and an aesthetic score, picks what to sample, times it, scores it and writes it. Output (--out, created only
once the inputs are known good): one PNG per image, grid.png (one block per sampler, prompt under each image, at most
GRID_COLUMNS images a line and the first GRID_MAX_IMAGES images of each sampler, so it stays viewable) and, with
--score, scores.json.
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

import r0

# The base model's usual sampler, the paper's reference row: 25 steps with classifier-free guidance 7.5 (two UNet
# evaluations per step, conditional and unconditional: 50 per image, against R0's K).
BASE_STEPS, BASE_GUIDANCE = 25, 7.5


class AestheticScore(torch.nn.Module):
    """The LAION improved aesthetic predictor: an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropouts, no activations)
    on the L2-normalized image embedding of OpenAI's CLIP ViT-L/14 (open_clip's evaluation transform, here
    r0.clip_preprocess). Scores are on a 1-10 scale (the paper's 'Aes' column)."""

    def __init__(self, clip_model, dim=768):
        super().__init__()
        self.clip = clip_model
        self.layers = r0.preference_head(dim)  # the published weights' layout: layers.0/2/4/6/7
        self.requires_grad_(False).eval()

    def forward(self, pixels, prompts=None):  # the prompt plays no part
        dtype = next(self.clip.parameters()).dtype
        emb = self.clip.encode_image(r0.clip_preprocess(pixels, 224).to(dtype)).float()  # (B,768)
        # normalized and scored in fp32, as the predictor's own code does (it casts its input to a float tensor)
        return self.layers(torch.nn.functional.normalize(emb, dim=-1)).squeeze(-1)  # (B,)


AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac+logos+ava1-l14-linearMSE.pth")
AESTHETIC_PATH = os.path.join(torch.hub.get_dir(), "r0", os.path.basename(AESTHETIC_URL))  # where it is kept


def load_aesthetic(tiny, device, dtype):
    """The aesthetic metric, frozen: its CLIP tower in dtype on device, its head in fp32 (tiny: random-weight tiny
    twins, offline)."""
    import open_clip
    if tiny:
        model, _ = r0.build_tiny_clip_tower(seed=7)
        with torch.random.fork_rng():  # its head too from a fixed seed, whatever ran before
            torch.manual_seed(7)
            scorer = AestheticScore(model, dim=model.visual.output_dim)
    else:
        clip_file = r0.hub_file("aesthetic", AESTHETIC.downloads[0])
        model = open_clip.create_model("ViT-L-14", pretrained=clip_file, force_quick_gelu=True)  # OpenAI CLIP: QuickGELU
        if not os.path.isfile(AESTHETIC_PATH):
            try:
                os.makedirs(os.path.dirname(AESTHETIC_PATH), exist_ok=True)
                torch.hub.download_url_to_file(AESTHETIC_URL, AESTHETIC_PATH, progress=False)
            except Exception as err:
                raise r0.UserError(f"could not download the aesthetic predictor's weights ({type(err).__name__}); "
                                   f"fetch {AESTHETIC_URL} into {AESTHETIC_PATH} on a machine with network, or leave "
                                   "aesthetic out of --score-with.")
        scorer = AestheticScore(model)
        scorer.layers.load_state_dict({k.removeprefix("layers."): v for k, v in
                                       r0.load_tensors(AESTHETIC_PATH, "aesthetic predictor").items()})
        print(f"aesthetic: OpenAI CLIP ViT-L/14 with {clip_file}, predictor {AESTHETIC_PATH}")
    r0.cast(scorer, device, dtype).layers.float()  # the CLIP tower in dtype, the head in fp32
    return scorer


# --score's metrics, each an r0.Reward (its loader, its hub downloads, its table scale): r0.py's rewards that are
# metrics (r0.REWARDS with weights to download: hps, clip, imagereward, and any reward registered so), the aesthetic
# score (evaluation only) and the toy's colour accuracy. Default: the paper's Table 1 columns that need no dataset.
AESTHETIC = r0.Reward(load_aesthetic, [("OpenAI CLIP ViT-L/14 weights", "timm/vit_large_patch14_clip_224.openai",
                                        ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))])
COLOUR_ACCURACY = r0.Reward(None)  # the toy's colour accuracy (no model)
DEFAULT_METRICS = "hps,aesthetic,clip,imagereward"


def metrics():
    """name -> r0.Reward of every metric --score-with knows, r0.REWARDS read as it is now."""
    return {**{n: r for n, r in r0.REWARDS.items() if r.downloads}, "aesthetic": AESTHETIC, "color": COLOUR_ACCURACY}


# grid.png stays viewable however many images are sampled: each sampler's images wrap after GRID_COLUMNS, and only
# its first GRID_MAX_IMAGES are shown (every image is written as its own PNG anyway). At SD1.5's 512 px and 4
# samplers (base + R0 1/2/4): 8 x 512 = 4096 px wide, 4 samplers x 2 lines x 526 px = 4208 px high, at most.
GRID_COLUMNS, GRID_MAX_IMAGES = 8, 16


def find_run(path):
    """A run folder, its pipeline/ folder, or any diffusers folder -> (pipeline folder, run config or None)."""
    if not os.path.exists(path):
        raise r0.UserError(f"run folder '{path}' does not exist; pass the --output-dir of a finished r0.py run.")
    if os.path.isfile(os.path.join(path, "pipeline", "model_index.json")):
        pipeline_dir, config_path = os.path.join(path, "pipeline"), os.path.join(path, "config.json")
    elif os.path.isfile(os.path.join(path, "model_index.json")):
        pipeline_dir, config_path = path, os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    else:
        raise r0.UserError(f"'{path}' holds no trained weights (no pipeline/model_index.json); pass the folder of a "
                           "finished r0.py run (training writes pipeline/ at the end).")
    run_cfg = None  # a bare diffusers folder has no r0.py config: then we fall back to defaults (4 steps, 512 px)
    if os.path.isfile(config_path):
        with open(config_path) as f:
            run_cfg = argparse.Namespace(**json.load(f))
    return pipeline_dir, run_cfg


def as_models(parts, device, dtype):
    """(tokenizer, text_encoder, vae, unet, scheduler_config) -> r0.Models for sampling (no rewards, frozen)."""
    tokenizer, text_encoder, vae, unet, scheduler_config = parts
    r0.check_sd15_shaped(text_encoder, vae, unet, scheduler_config)  # the same refusal as training
    for module in (text_encoder, vae, unet):  # inference only: no gradients, bf16 on a GPU
        r0.cast(module.requires_grad_(False).eval(), device, dtype)
    alphas_cumprod = r0.sd15_alphas_cumprod(scheduler_config["beta_start"], scheduler_config["beta_end"])
    return r0.Models(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, frozen_unet=None,
                     scheduler_config=scheduler_config, alphas_cumprod=alphas_cumprod, rewards={}, reward_weights={},
                     device=device)


def load_models(args, device, dtype, run=None):
    """(R0 generator, base model or None, run config or None) from --run (run: find_run's answer, if known) /
    --model [--lora] / --tiny."""
    run_cfg = None
    if args.run:  # a trained run: its pipeline/ holds the generator with LoRA already merged in
        pipeline_dir, run_cfg = run or find_run(args.run)
        generator = r0.load_sd15(pipeline_dir)
    elif args.tiny:  # a tiny model R0 has not trained: checks the whole path offline
        generator = (*r0.build_tiny_sd15(args.seed), dict(r0.SD15_SCHEDULER_CONFIG))
    else:  # any SD1.5 folder or hub id, e.g. the base model plus --lora
        generator = r0.load_sd15(args.model)
    base = None
    if args.compare_base:  # with --lora the base model is the one just loaded, before the adapters go in
        if args.lora:
            base_unet, base_scheduler_config = copy.deepcopy(generator[3]), dict(generator[4])
        else:
            *_, base_unet, base_scheduler_config = load_base(args, run_cfg)
        # R0 trains only the UNet: the text encoder, VAE and tokenizer are the base model's, so share them. The
        # scheduler config is the base model's own (SD1.5: DDIM-readable, leading spacing, steps_offset 1, final
        # alpha not 1), never the run's: a run's pipeline/ holds the few-step (trailing) one, made for R0's sampler.
        base = (*generator[:3], base_unet, base_scheduler_config)
    if args.lora:  # LoRA adapters of a LoRA run, folded into the UNet
        if not os.path.isfile(os.path.join(args.lora, "pytorch_lora_weights.safetensors")):
            raise r0.UserError(f"--lora {args.lora} holds no pytorch_lora_weights.safetensors; pass the lora/ "
                               "folder of a LoRA run.")
        pipe = r0.sd_pipeline(*generator[:4], r0.few_step_scheduler(generator[4]))
        pipe.load_lora_weights(args.lora)
        pipe.fuse_lora()  # fold delta W into the UNet weights (unet is modified in place)
        pipe.unload_lora_weights()
    return as_models(generator, device, dtype), (as_models(base, device, dtype) if base else None), run_cfg


def load_base(args, run_cfg):
    """The model R0 started from: the run's --model (or its tiny twin), else --model / a fresh tiny model."""
    if run_cfg is not None:  # the run's config names its base: its --model, or the tiny twin of its seed
        if run_cfg.tiny:
            return (*r0.build_tiny_sd15(run_cfg.seed), dict(r0.SD15_SCHEDULER_CONFIG))
        return r0.load_sd15(run_cfg.model)
    if args.tiny:
        return (*r0.build_tiny_sd15(args.seed), dict(r0.SD15_SCHEDULER_CONFIG))
    return r0.load_sd15(args.model)


def base_scheduler(scheduler_config):
    """The base model's sampler: diffusers' DDIM read from the base model's own scheduler config. For SD1.5 (a PNDM
    config, which DDIM reads too) that is 'leading' timestep spacing, steps_offset 1 and set_alpha_to_one False:
    at 25 steps, t = 961, 921, ..., 1, the way SD1.5 is usually sampled."""
    from diffusers import DDIMScheduler
    return DDIMScheduler.from_config(scheduler_config)


@torch.no_grad()
def sample_base(m, prompts, seeds, resolution, batch_size):
    """The base model's usual sampler (a standard diffusers pipeline and scheduler: DDIM, 25 steps, CFG 7.5), from
    the same initial noise per seed as the R0 rows. (N,3,H,W) in [0,1]."""
    pipe = r0.sd_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet, base_scheduler(m.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    images = []  # batches of (b,3,H,W) in [0,1]
    for i in range(0, len(prompts), batch_size):
        # the same x_T per seed as r0.sample_images, so base and R0 rows start from identical noise
        noise = torch.stack([r0.initial_noise(s, resolution, m.device) for s in seeds[i : i + batch_size]])
        out = pipe(prompts[i : i + batch_size], height=resolution, width=resolution, num_inference_steps=BASE_STEPS,
                   guidance_scale=BASE_GUIDANCE, latents=noise.to(m.unet.dtype), output_type="pt").images
        images.append(out.float().cpu())
    return torch.cat(images)


def timed(fn, device):
    """(fn(), wall seconds). CUDA runs asynchronously: synchronize before reading the clock, or we time launches."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def mean_se(values):
    """(mean, standard error of the mean) of a list of numbers. SE = sample std / sqrt(n): roughly how far the
    mean would move with other seeds."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


@torch.no_grad()
def score(images, prompts, scorers, device):
    """Per-image scores, in the paper's Table 1 units (their scale: HPS v2.1 and CLIP score as 100 x cosine,
    ImageReward and the aesthetic score as they come); colour accuracy (%) on prompts that name a colour."""
    result = {}
    for name, reward in scorers.items():
        scale = metrics()[name].scale
        values = []
        for i in range(0, len(images), 8):  # small batches: two ViT-H-14 towers at once are large
            values += (scale * reward(images[i : i + 8].to(device), prompts[i : i + 8])).tolist()
        result[f"{name} x100" if scale == 100 else name] = values
    # colour accuracy: the toy metric of the tiny demo, meaningful on any prompt that names a colour
    colour_prompts = [(img, p) for img, p in zip(images, prompts) if r0.colour_of(p)]
    if colour_prompts:
        got = r0.dominant_colour(torch.stack([img for img, _ in colour_prompts]))
        result["colour acc %"] = [100.0 * (g == r0.colour_of(p)) for g, (_, p) in zip(got, colour_prompts)]
    return result


def parse_steps(text):
    """'4' or '1,2,4' -> [4] or [1, 2, 4], each within the generator's 1..8."""
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise r0.UserError(f"--steps takes whole numbers from 1 to 8, like 4 or 1,2,4; got '{text}'.")
    if not steps or any(not 1 <= k <= 8 for k in steps):
        raise r0.UserError(f"--steps must be between 1 and 8 (like 4 or 1,2,4), got '{text}'.")
    return steps


def make_out_dir(out):
    """Create --out once there is something to write (the check above can still be beaten by a race or a quota)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise r0.UserError(f"cannot write to --out {out} ({err.strerror}); pick a folder you can write to.")


def save_sampler_grid(rows, captions, path):
    """grid.png: one block per sampler, read like a table. rows: [(label, (N,3,H,W) images)], captions: N prompts.
    Only the first GRID_MAX_IMAGES images of each sampler are shown, GRID_COLUMNS a line; the sampler's label is left
    of each of its lines and the prompt under each image. A block's last line is padded with blank (white) cells, so
    the next sampler starts on a fresh line and image i sits in the same cell of every block.
    Returns how many images of each sampler the grid shows."""
    n = min(len(captions), GRID_MAX_IMAGES)
    ncols = min(n, GRID_COLUMNS)
    lines = math.ceil(n / ncols)  # lines per sampler block
    pad = lines * ncols - n
    images, texts, labels = [], [], []
    for label, imgs in rows:
        images += [imgs[:n], torch.ones(pad, *imgs.shape[1:])]
        texts += captions[:n] + [""] * pad
        labels += [label] * lines
    r0.save_grid(torch.cat(images), path, ncols, captions=texts, row_labels=labels)  # r0 draws it, row-major
    return n


def build_parser():
    p = r0.Parser(prog="sample.py", description="Few-step images from an R0 generator (optionally vs the base model, "
                                                "scored)", allow_abbrev=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="an r0.py run folder (or its pipeline/ folder)")
    src.add_argument("--model", help="any SD1.5 diffusers folder or hub id (e.g. with --lora)")
    src.add_argument("--tiny", action="store_true", help="a fresh tiny model, built in code (offline)")
    p.add_argument("--lora", help="lora/ folder of a LoRA run, applied onto --model")
    txt = p.add_mutually_exclusive_group(required=True)
    txt.add_argument("--prompt", help="one prompt")
    txt.add_argument("--prompts", help="prompt file, one a line")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--steps", default=None, help="generator steps, e.g. 4 or 1,2,4 (default: as trained; "
                                                 "with --compare-base: 1,2,4)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity of the few-step sampler, 0..1 (above 0, "
                                                          "images are sampled one at a time, each from its own seed)")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed; image i of a prompt uses seed + i (with --tiny it also builds the models)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts of the file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=None, help="default: as trained (512 for SD1.5)")
    p.add_argument("--compare-base", action="store_true", help=f"add the base model, {BASE_STEPS} steps, CFG {BASE_GUIDANCE}")
    p.add_argument("--score", action="store_true", help="print and save a score table (scores.json)")
    p.add_argument("--score-with", default=None, help=f"metrics, from {','.join(metrics())} (default: the paper's "
                                                     f"Table 1 columns that need no dataset: {DEFAULT_METRICS})")
    p.add_argument("--device", default="auto")
    return p


def main(argv=None):
    r0.quiet_libraries()
    try:
        run(build_parser().parse_args(argv))
    except r0.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run(args):
    job = check(args)  # everything the user typed, before anything loads
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.bfloat16 if r0.native_bf16(device) else torch.float32
    m, base, run_cfg = load_models(args, device, dtype, job.run)
    rows, prompts, seeds, resolution = sample_rows(args, job, m, base, run_cfg, device, dtype)
    write_and_score(args, job, rows, prompts, seeds, resolution, device, dtype)


def check(args):
    """Every input checked before minutes of loading and sampling: one sentence per mistake. Returns what was read:
    the prompts, --steps, the metrics, the run folder (find_run), whether its models are the tiny twins."""
    if args.prompt is not None:
        prompts = [args.prompt.strip()]
        if not prompts[0]:
            raise r0.UserError("--prompt is empty; give a text such as --prompt \"a red fox in the snow\".")
    else:
        prompts = r0.load_prompts(args.prompts)
    for name in ("num_images", "batch_size"):
        if getattr(args, name) <= 0:
            raise r0.UserError(f"--{name.replace('_', '-')} must be a positive whole number, got {getattr(args, name)}.")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        raise r0.UserError(f"--resolution must be a positive multiple of 8, got {args.resolution}.")
    if args.eta < 0 or args.eta > 1:
        raise r0.UserError(f"--eta must be between 0 and 1, got {args.eta}.")
    if args.lora and not args.model:
        raise r0.UserError("--lora goes with --model (the base model the adapters were trained on).")
    names = [n.strip() for n in (args.score_with or DEFAULT_METRICS).split(",") if n.strip()]
    unknown = [n for n in names if n not in metrics()]
    if unknown:
        raise r0.UserError(f"unknown metric '{unknown[0]}' in --score-with; choose from {', '.join(metrics())}.")
    r0.check_writable(args.out, "--out")  # checks only: --out is made after sampling, once there is something to write
    run = find_run(args.run) if args.run else None  # a bad run folder fails here, before anything heavy
    if args.compare_base and run is not None and run[1] is None:
        raise r0.UserError(f"{args.run} has no config.json that names its base model, which --compare-base needs; "
                           "pass the run folder itself, or the base with --model and a LoRA run's lora/ with --lora.")
    tiny = bool(args.tiny or (run is not None and run[1] is not None and run[1].tiny))
    if not tiny:  # offline: every missing download (models, metrics) in one sentence, before anything loads
        scored = names if args.score else []
        base = run[1].model if run is not None and run[1] is not None and args.compare_base else None  # a run's base
        head = f"the aesthetic predictor's head (download {AESTHETIC_URL} to {AESTHETIC_PATH})"
        r0.check_downloads(args.model or base, [d for n in scored for d in metrics()[n].downloads],
                           also_missing=[head] if "aesthetic" in scored and not os.path.isfile(AESTHETIC_PATH) else [])
    return argparse.Namespace(prompts=prompts[: args.max_prompts] if args.max_prompts else prompts, run=run, tiny=tiny,
                              steps=parse_steps(args.steps) if args.steps else None, metrics=names)


def sample_rows(args, job, m, base, run_cfg, device, dtype):
    """Every sampler's images, timed (a warm-up call first, so one-time costs are not counted): the base model's
    usual sampler with --compare-base, then R0 at each step count. Returns (rows, prompts, seeds, resolution); a row
    is (label, UNet evaluations per image, images (N,3,H,W) in [0,1], seconds per image)."""
    steps_list = job.steps or ([1, 2, 4] if args.compare_base else [run_cfg.steps if run_cfg else 4])  # as trained
    resolution = args.resolution or (run_cfg.resolution if run_cfg else (64 if args.tiny else 512))
    # image i of every prompt uses seed + i: each column of the grid shares its initial noise across rows
    seeds = [args.seed + i for _ in job.prompts for i in range(args.num_images)]
    prompts = [p for p in job.prompts for _ in range(args.num_images)]
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    rows = []
    if base is not None:
        sample_base(base, prompts[:1], seeds[:1], resolution, 1)
        images, secs = timed(lambda: sample_base(base, prompts, seeds, resolution, args.batch_size), device)
        rows.append((f"base {BASE_STEPS}-step CFG {BASE_GUIDANCE}", 2 * BASE_STEPS, images, secs / len(seeds)))
    for k in steps_list:
        def few_step():
            return r0.sample_images(m, prompts, seeds, k, resolution, precision, args.eta, args.batch_size)
        r0.sample_images(m, prompts[:1], seeds[:1], k, resolution, precision, eta=args.eta)
        images, secs = timed(few_step, device)
        rows.append((f"R0 {k}-step", k, images, secs / len(seeds)))
    return rows, prompts, seeds, resolution


def write_and_score(args, job, rows, prompts, seeds, resolution, device, dtype):
    """Every image as its own PNG, the captioned grid (wrapped and capped: see save_sampler_grid) and, with --score,
    the score table of every row, by the same metric models (scores.json)."""
    make_out_dir(args.out)
    for label, _, images, _ in rows:
        tag = label.split(" CFG")[0].replace(" ", "_")
        for img, p, s in zip(images, prompts, seeds):
            r0.save_grid(img[None], os.path.join(args.out, f"{tag}_{job.prompts.index(p):03d}_seed{s}.png"), 1)
    shown = save_sampler_grid([(label, images) for label, _, images, _ in rows], prompts,
                              os.path.join(args.out, "grid.png"))
    print(f"wrote {len(rows) * len(seeds)} images and grid.png to {args.out}")
    if shown < len(seeds):
        print(f"grid.png shows the first {shown} of {len(seeds)} images of each row; every image is written as its "
              "own PNG.")
    if not args.score:
        return
    # a tiny run (or --tiny) scores with random-weight tiny towers (offline): its numbers check the plumbing only
    scorers = {n: metrics()[n].load(job.tiny, device, dtype) for n in job.metrics if n != "color"}
    table = []
    for label, evals, images, secs in rows:
        scores = score(images, prompts, scorers, device)
        table.append({"row": label, "unet_evals_per_image": evals, "seconds_per_image": secs,
                      **{k: dict(zip(("mean", "se"), mean_se(v))) for k, v in scores.items()}})
    random_weights = job.tiny and bool(scorers)
    print_table(table)
    if random_weights:
        print(f"note: {', '.join(scorers)} are scored by random-weight tiny towers (--tiny), not the real "
              "weights: the numbers check the pipeline, not image quality.")
    else:
        print("weights: " + "; ".join(f"{n}: " + ", ".join(f"{repo} {files[0]}" for _, repo, files in metrics()[n].downloads)
                                      + (f" and {AESTHETIC_URL}" if n == "aesthetic" else "") for n in scorers))
    with open(os.path.join(args.out, "scores.json"), "w") as f:
        json.dump({"device": device, "resolution": resolution, "images_per_row": len(seeds),
                   "random_weights": random_weights, "rows": table}, f, indent=2)


def print_table(table):
    """The score table on stdout: one row per sampler, mean ± standard error per metric."""
    columns = [k for k in table[0] if k not in ("row", "unet_evals_per_image", "seconds_per_image")]
    header = f"{'row':<24} {'UNet evals/img':>14} {'s/img':>8} " + " ".join(f"{c:>16}" for c in columns)
    print(header)
    print("-" * len(header))
    for row in table:
        cells = " ".join(f"{row[c]['mean']:>9.2f} ± {row[c]['se']:<4.2f}" for c in columns)
        print(f"{row['row']:<24} {row['unet_evals_per_image']:>14} {row['seconds_per_image']:>8.3f} {cells}")


if __name__ == "__main__":
    main()
