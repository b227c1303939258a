"""ImageReward's ORIGINAL model code at the size of r0.py's tiny twin, on the deterministic weights and inputs of
test_r0.py: prints IMAGEREWARD_REFERENCE, the numbers test_imagereward_gives_the_scores_and_gradients_of_its_original_code
compares against. A maintainer's tool, run once in the scratch environment of original.py (see its docstring; add
pytest to that environment, since this script takes the weights and inputs from test_r0.py):

    /tmp/irvenv/bin/pip install pytest
    HF_HUB_OFFLINE=1 /tmp/irvenv/bin/python .ci/imagereward/tiny_reference.py /tmp/ImageReward

Everything ImageReward computes comes from its own code: the ViT (BLIP's vit.py), the BERT with cross-attention
(BLIP's med.py), the MLP head, the mean and std of ImageReward.__init__ and score_gard's arithmetic. Only the sizes are
the tiny twin's (r0.imagereward_configs("tiny")), given through a med_config file and a smaller ViT."""
import json
import os
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
repo = sys.argv[1]
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # r0.py and test_r0.py
sys.path.insert(0, repo)
for package in ("ImageReward", "ImageReward.models"):  # the model files alone (the package __init__s pull in more)
    module = types.ModuleType(package)
    module.__path__ = [os.path.join(repo, *package.split("."))]
    sys.modules[package] = module

import torch  # noqa: E402

import r0  # noqa: E402
import test_r0  # noqa: E402
import ImageReward.ImageReward as image_reward  # noqa: E402
import ImageReward.models.BLIP.blip_pretrain as blip_pretrain  # noqa: E402
from ImageReward.models.BLIP.vit import VisionTransformer  # noqa: E402

vision, text = r0.imagereward_configs("tiny")
assert vision.intermediate_size == 4 * vision.hidden_size  # BLIP's ViT: mlp_ratio 4
blip_pretrain.init_tokenizer = lambda: None  # it downloads bert-base-uncased; score_gard takes token ids
blip_pretrain.create_vit = lambda *args, **kwargs: (VisionTransformer(  # BLIP's ViT at the tiny twin's size
    img_size=vision.image_size, patch_size=vision.patch_size, embed_dim=vision.hidden_size,
    depth=vision.num_hidden_layers, num_heads=vision.num_attention_heads), vision.hidden_size)
original_mlp = image_reward.MLP
image_reward.MLP = lambda input_size: original_mlp(text.hidden_size)  # ImageReward builds MLP(768): BERT-base's width
med_config = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
                  hidden_dropout_prob=0.1, hidden_size=text.hidden_size, initializer_range=0.02,
                  intermediate_size=text.intermediate_size, layer_norm_eps=1e-12,
                  max_position_embeddings=text.max_position_embeddings, model_type="bert",
                  num_attention_heads=text.num_attention_heads, num_hidden_layers=text.num_hidden_layers,
                  pad_token_id=0, type_vocab_size=2, vocab_size=text.vocab_size, encoder_width=vision.hidden_size,
                  add_cross_attention=True)  # train/src/config/med_config.json's keys, the tiny twin's sizes
with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(med_config, f)
model = image_reward.ImageReward(med_config=f.name, device="cpu").eval()

with torch.no_grad():
    for name, p in model.named_parameters():
        p.copy_(test_r0.imagereward_reference_weight(name, tuple(p.shape)))
pixels, ids, mask = test_r0.imagereward_reference_inputs()
x = pixels.clone().requires_grad_(True)
scores = model.score_gard(ids, mask, r0.clip_preprocess(x, 224)).flatten()  # its differentiable path
(grad,) = torch.autograd.grad(scores.sum(), x)
dots = (grad * test_r0.imagereward_reference_direction()).flatten(1).sum(1)
print({"scores": scores.tolist(), "grad_norms": grad.flatten(1).norm(dim=1).tolist(), "grad_dots": dots.tolist(),
       "mean_std": [model.mean, model.std]})
