"""The README's pictures of the toy, from a finished demo run (`python r0.py --tiny --prompts prompts.txt`):

    python .ci/figures.py [--run runs/tiny]

assets/tiny_train_before_after.png: six prompts of six colours, each row the target colour's swatch, then the base
model's images (the generator before training) and the trained generator's, at held-out seeds 1000-1003.
assets/tiny_compare.png: one prompt per colour at seed 0, a row per sampler (the base model's 25-step CFG sampler,
R0 at 1, 2 and 4 steps), each row labelled with its colour accuracy over every colour prompt at seeds 0-3.
"""

import argparse
import dataclasses
import os
import sys

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import r0  # noqa: E402
import sample  # noqa: E402

ROWS = ["a red apple on a wooden kitchen table", "a blue whale breaching beside a small sailing boat",
        "a green bamboo forest with light rays", "a yellow taxi parked under neon lights",
        "a purple lavender field in Provence", "a white lighthouse on a rocky cliff"]


def trained_models(run):
    cfg = r0.resolve_config(r0.build_parser().parse_args(["--resume", run, "--device", "cpu"]))
    m = r0.load_models(cfg)
    params = dict(m.unet.named_parameters())
    for name, value in r0.load_tensors(r0.checkpoint_files(run)[-1], "checkpoint")["trainable"].items():
        params[name].data.copy_(value)
    return m, cfg


def swatches(colours, size):
    return torch.tensor([r0.COLOURS[c] for c in colours]).view(-1, 3, 1, 1).expand(-1, 3, size, size)


def before_after(m, cfg):
    seeds = list(r0.HELD_OUT_SEEDS)
    prompts = [p for p in ROWS for _ in seeds]
    with r0.theta_0(m.unet, m.frozen_unet) as base:
        before = r0.sample_images(dataclasses.replace(m, unet=base), prompts, seeds * len(ROWS), cfg.steps,
                                  cfg.resolution, cfg.precision)
    after = r0.sample_images(m, prompts, seeds * len(ROWS), cfg.steps, cfg.resolution, cfg.precision)
    cells, k = [], len(seeds)
    for i, p in enumerate(ROWS):
        cells += [swatches([r0.colour_of(p)], cfg.resolution)[0], *before[i * k:(i + 1) * k], *after[i * k:(i + 1) * k]]
    labels = [f"{r0.colour_of(p)}: target | step 0 (the base model) x4 | step {cfg.max_steps} x4" for p in ROWS]
    r0.save_grid(torch.stack(cells), os.path.join(HERE, "assets", "tiny_train_before_after.png"), 1 + 2 * k,
                 row_labels=[lab.split(":")[0] for lab in labels])
    print("wrote assets/tiny_train_before_after.png: per row, target swatch | 4 images at step 0 | 4 after training")


def compare(cfg, run):
    args = argparse.Namespace(run=run, model=None, tiny=False, lora=None, compare_base=True, seed=0)
    generator, base, _ = sample.load_models(args, "cpu", torch.float32)  # as sample.py --compare-base loads them
    prompts = [p for p in r0.load_prompts(cfg.prompts) if r0.colour_of(p)]
    scored_prompts, scored_seeds = [p for p in prompts for _ in range(4)], [s for _ in prompts for s in range(4)]
    rows = []
    for label, steps in [(f"base {sample.BASE_STEPS}-step CFG {sample.BASE_GUIDANCE}", None), ("R0 1-step", 1),
                         ("R0 2-step", 2), ("R0 4-step", 4)]:
        def images(ps, ss):
            if steps is None:
                return sample.sample_base(base, ps, ss, cfg.resolution, 8)
            return r0.sample_images(generator, ps, ss, steps, cfg.resolution, "fp32")
        got = r0.dominant_colour(images(scored_prompts, scored_seeds))
        accuracy = sum(g == r0.colour_of(p) for g, p in zip(got, scored_prompts)) / len(got)
        rows.append((f"{label}: {accuracy:.0%}", images(ROWS, [0] * len(ROWS))))
    r0.save_grid(torch.cat([imgs for _, imgs in rows]), os.path.join(HERE, "assets", "tiny_compare.png"), len(ROWS),
                 captions=ROWS * len(rows), row_labels=[label for label, _ in rows])
    print("wrote assets/tiny_compare.png:", "; ".join(label for label, _ in rows), "(colour accuracy, seeds 0-3)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=os.path.join(HERE, "runs", "tiny"))
    args = p.parse_args()
    r0.quiet_libraries()
    m, cfg = trained_models(args.run)
    before_after(m, cfg)
    compare(cfg, args.run)


if __name__ == "__main__":
    main()
