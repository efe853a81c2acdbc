"""Fine-tune a tiny timm ViT whose attention carries a learnable per-head Gaussian neighbourhood bias.

Every block of a random-init timm ViT is patched with :func:`naclip_kernels.nn.patch_vit`
(``learnable_sigma=True, per_head_sigma=True``); the model then trains for a few AdamW steps on synthetic
images (horizontal vs vertical stripes plus noise, a task local attention suits) and prints the learned sigma
of every head. The ``sigma`` parameters get their own optimizer group (higher learning rate, no weight decay).

    python examples/finetune_learnable_sigma.py --steps 20
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

from naclip_kernels.nn import patch_vit


def stripes(batch: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, 3, size, size]`` images of horizontal (label 0) or vertical (label 1) stripes with noise."""
    labels = torch.randint(0, 2, (batch,), generator=generator)
    period = torch.randint(4, 12, (batch, 1, 1), generator=generator).float()
    phase = torch.rand(batch, 1, 1, generator=generator) * 6.283
    coord = torch.arange(size, dtype=torch.float32)
    rows = torch.sin(coord[None, :, None] * 6.283 / period + phase).expand(batch, size, size)
    cols = torch.sin(coord[None, None, :] * 6.283 / period + phase).expand(batch, size, size)
    img = torch.where(labels[:, None, None] == 0, rows, cols)
    img = img[:, None].expand(batch, 3, size, size) + 0.5 * torch.randn(
        batch, 3, size, size, generator=generator
    )
    return img, labels


def sigma_table(handle) -> str:
    return "\n".join(
        f"  block {i:2d}: " + " ".join(f"{s:6.3f}" for s in m.sigma_value().tolist())
        for i, m in sorted(handle.modules.items())
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    ap.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    ap.add_argument("--image-size", type=int, default=64, help="square image side in pixels (default 64)")
    ap.add_argument("--sigma", type=float, default=2.0, help="starting sigma in patch units (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=2,
        img_size=args.image_size,
        depth=4,
        global_pool="avg",  # pool the patch tokens: with CLS pooling the last block's sigma gets no gradient
    )
    handle = patch_vit(model, sigma=args.sigma, learnable_sigma=True, per_head_sigma=True)
    sigmas = [p for n, p in model.named_parameters() if n.endswith(".sigma")]
    others = [p for n, p in model.named_parameters() if not n.endswith(".sigma")]
    opt = torch.optim.AdamW(
        [{"params": others, "lr": 1e-3}, {"params": sigmas, "lr": 5e-2, "weight_decay": 0.0}]
    )
    print(f"patched {handle}; sigma per head at the start:\n{sigma_table(handle)}")
    model.train()
    for step in range(1, args.steps + 1):
        images, labels = stripes(args.batch, args.image_size, gen)
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"sigma per head after {args.steps} steps:\n{sigma_table(handle)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
