"""ImageReward's ORIGINAL model code with random weights, for .ci/imagereward/compare.py. A maintainer's check, not CI.
ImageReward's code pins packages this project cannot install beside open_clip, so it runs in a scratch environment:

    git clone https://github.com/THUDM/ImageReward /tmp/ImageReward && git -C /tmp/ImageReward checkout c1392c6
    python3 -m venv /tmp/irvenv && /tmp/irvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 "numpy<2" \\
        transformers==4.27.4 timm==0.6.13 && /tmp/irvenv/bin/pip install --no-build-isolation fairscale==0.4.13
    HF_HUB_OFFLINE=1 /tmp/irvenv/bin/python .ci/imagereward/original.py /tmp/ImageReward /tmp/ir_original.pt
    HF_HUB_OFFLINE=1 .venv/bin/python .ci/imagereward/compare.py /tmp/ir_original.pt      # the project's venv

Writes the original model's state dict (original key names, random weights at full size), fixed inputs, its scores
and the gradient of their sum with respect to the [0,1] pixels, which go through r0.clip_preprocess on both sides (so
the comparison isolates the model). It also prints every key with its shape (test_r0.py's IMAGEREWARD_CHECKPOINT_KEYS
is that list, folded into patterns)."""
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
repo, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # r0.py, for clip_preprocess only
sys.path.insert(0, repo)
for package in ("ImageReward", "ImageReward.models"):  # import the model files alone: the package __init__s pull in
    module = types.ModuleType(package)                 # CLIP, diffusers and the ReFL trainer
    module.__path__ = [os.path.join(repo, *package.split("."))]
    sys.modules[package] = module

import torch  # noqa: E402

import r0  # noqa: E402
import ImageReward.models.BLIP.blip_pretrain as blip_pretrain  # noqa: E402
blip_pretrain.init_tokenizer = lambda: None  # it downloads bert-base-uncased; the score path takes token ids
from ImageReward.ImageReward import ImageReward  # noqa: E402

torch.manual_seed(0)
model = ImageReward(med_config=os.path.join(repo, "train", "src", "config", "med_config.json"), device="cpu")
# The original init leaves LayerNorms at (1, 0), biases at 0 and the head near 0 (a constant score): draw those away
# from their init too, so that the comparison sees every part of the model.
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, torch.nn.Linear):
            if name.startswith("mlp."):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
            m.bias.copy_((0.1 if name.startswith("mlp.") else 0.02) * torch.randn(m.bias.shape, generator=g))
model.eval()
state = model.state_dict()
for k, v in state.items():
    print(k, "x".join(map(str, v.shape)))

# inputs: two smooth random 512 px images, and token ids shaped as ImageReward makes them ([CLS] ... [SEP], padded
# to 35 with [PAD] = 0; the second fills all 35)
low = torch.rand(2, 3, 16, 16, generator=g)
pixels = torch.nn.functional.interpolate(low, size=(512, 512), mode="bilinear", align_corners=False)
pixels = (pixels + 0.05 * torch.randn(2, 3, 512, 512, generator=g)).clamp(0, 1)
words = torch.randint(1996, 30000, (2, 33), generator=g)  # ordinary word-piece ids of bert-base-uncased
input_ids = torch.cat([torch.full((2, 1), 101), words, torch.full((2, 1), 102)], dim=1)
input_ids[0, 12], input_ids[0, 13:] = 102, 0
attention_mask = (input_ids != 0).long()
x = pixels.clone().requires_grad_(True)
scores = model.score_gard(input_ids, attention_mask, r0.clip_preprocess(x, 224)).flatten()  # its differentiable path
scores.sum().backward()
torch.save(dict(state_dict=state, pixels=pixels, input_ids=input_ids, attention_mask=attention_mask,
                scores=scores.detach(), pixel_grad=x.grad), out)
print(f"scores {scores.tolist()}; wrote {out}", file=sys.stderr)
