"""A minimal GPT in plain PyTorch, the yardstick for bench/pretrain_throughput.py (no transformers, no Trainer).

nanoGPT's architecture, written here from its description: token + position embeddings, pre-LayerNorm
blocks (causal self-attention through fused scaled_dot_product_attention with is_causal=True, then a
4x MLP with GPT-2's tanh GELU), a final LayerNorm, and an LM head tied to the token embedding. Init
N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer). AdamW with decay on matrices only, fused
(one kernel over all parameters) where torch has it. The training loop is nanoGPT's: random windows,
forward, loss, backward, clip, step.

    python bench/plain_gpt.py --steps 50            # tokens/s of the plain model at nanoGPT's CPU shape
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, context, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, context, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # no mask tensor: the kernel knows "causal"
        return self.proj(y.transpose(1, 2).reshape(batch, context, width))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), CausalSelfAttention(n_embd, n_head)
        self.ln_2, self.fc, self.proj = (
            nn.LayerNorm(n_embd),
            nn.Linear(n_embd, 4 * n_embd),
            nn.Linear(4 * n_embd, n_embd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_embd: int, n_head: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections: GPT-2's scaled init
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW, decay on matrices (not biases/LayerNorms), fused when available (CPU and CUDA in torch >= 2.4)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, foreach=True)


def train(tokens: torch.Tensor, settings: dict, vocab_size: int, steps: int, seed: int = 1337) -> list[float]:
    """nanoGPT's loop on `tokens` (1-D int64): returns the wall time at the end of every step.
    Shifted targets as nanoGPT's get_batch: the window and the window one token later."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    block, batch = settings["block_size"], settings["per_device_train_batch_size"]
    model = GPT(vocab_size, block, settings["n_layer"], settings["n_embd"], settings["n_head"])
    opt = optimizer(model, settings["learning_rate"], settings["weight_decay"], (0.9, settings["adam_beta2"]))
    schedule = get_cosine_schedule_with_warmup(opt, settings["warmup_steps"], steps)
    model.train()
    step_ends = []
    for _ in range(steps):
        offsets = torch.randint(len(tokens) - block - 1, (batch,))
        x = torch.stack([tokens[i : i + block] for i in offsets])
        y = torch.stack([tokens[i + 1 : i + 1 + block] for i in offsets])
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"])
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        step_ends.append(time.perf_counter())
    return step_ends


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    shape = dict(
        n_layer=4,
        n_embd=128,
        n_head=4,
        block_size=64,
        per_device_train_batch_size=12,
        learning_rate=1e-3,
        weight_decay=0.1,
        adam_beta2=0.99,
        warmup_steps=10,
        max_grad_norm=1.0,
    )
    ends = train(torch.randint(65, (100_000,)), shape, 65, args.steps)
    timed = ends[10:]
    print(f"{(len(timed) - 1) * 12 * 64 / (timed[-1] - timed[0]):,.0f} tokens/s ({torch.get_num_threads()} threads)")
