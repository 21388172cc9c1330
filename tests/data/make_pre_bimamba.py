"""Writes tests/data/pre_bimamba with the code from before ``model.bimamba`` existed (commit ce804f2):

    git archive ce804f2 src | tar -x -C /tmp/pre_bimamba_src
    PYTHONPATH=/tmp/pre_bimamba_src/src python tests/data/make_pre_bimamba.py

An export (config.json without ``bimamba``, model.safetensors, README.md) of a tiny masked model with
training-like weights, and ``expected.safetensors``: token ids with [MASK]s and that code's logits on
them, which ``tests/test_bimamba.py`` compares with the logits of the current code.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from dimba import DIMBA

out = Path(__file__).parent / "pre_bimamba"
torch.manual_seed(0)
model = DIMBA(vocab_size=40, d_model=16, num_denoiser_layers=2, family="masked", d_state=8, headdim=8, chunk_size=8)
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.3 * torch.randn_like(p))  # the zero-initialised modulations matter too
model.eval()
model.save_pretrained(out)
ids = torch.randint(4, 40, (2, 21), generator=torch.Generator().manual_seed(1))  # (B, L)
ids[:, ::3] = model.mask_id
with torch.no_grad():
    logits = model.token_logits(ids)  # (B, L, V)
save_file({"input_ids": ids, "logits": logits}, out / "expected.safetensors")
