"""r0.py's ImageRewardReward, loaded through r0.imagereward_key_map, against ImageReward's original code on the same
random full-size weights and inputs (written by .ci/imagereward/original.py; see there). fp32, CPU, ~1 min.
    HF_HUB_OFFLINE=1 .venv/bin/python .ci/imagereward/compare.py /tmp/ir_original.pt"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402

import r0  # noqa: E402

ref = torch.load(sys.argv[1], weights_only=True)
reward = r0.ImageRewardReward(*r0.imagereward_configs("full"), tokenizer=None)
reward.load_state_dict(r0.imagereward_key_map(ref.pop("state_dict")), strict=True)


def check(label):
    x = ref["pixels"].clone().requires_grad_(True)
    scores = r0.imagereward_score(reward, x, ref["input_ids"], ref["attention_mask"])  # the same token ids as the original
    scores.sum().backward()
    a, b = x.grad.double().flatten(), ref["pixel_grad"].double().flatten()
    print(f"{label}: scores {scores.tolist()} (original {ref['scores'].tolist()}), max abs difference "
          f"{(scores.detach() - ref['scores']).abs().max().item():.1e}; pixel gradients: relative L2 difference "
          f"{((a - b).norm() / b.norm()).item():.1e}, cosine {(a @ b / (a.norm() * b.norm())).item():.9f}")
    assert all(p.grad is None for p in reward.parameters())


check("ImageRewardReward")
reward.enable_gradient_checkpointing()
check("with gradient checkpointing")
