"""PyTorch peer baseline: the DiT train step in diffusers (``DiTTransformer2DModel``), bf16
autocast, SDPA attention, optional ``torch.compile``, on the GPU, with the same FLOP
counting as ``tools/bench_train_step.py`` so the two print comparable MFU.

  python tools/bench_torch_dit.py --size XL --batch 128 --compile
  python tools/bench_train_step.py --config experiments/race_dit.py:XL-dense --batch 128 \\
      --optim adamw --attn_impl cudnn --remat none          # the same model in jaxdit

The jaxdit side is Race-DiT's dense DiT, the architecture ``jaxdit.convert.dit``
loads diffusers DiT weights into (its parity test proves the two compute the same
function). Inputs are cached latents (32x32x4, ImageNet 256 through SD-VAE) and class
labels; flow-matching loss; AdamW over fp32 params. Needs torch with CUDA and diffusers.
FLOPs: ``6 * block matmul params (attention + MLP, not the per-sample AdaLN) * tokens`` +
``12 * depth * S^2 * width`` per sample; MFU against ``--peak_tflops``.
"""
from __future__ import annotations

import argparse
import time

import torch

SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, width, heads


def build(size: str, channels: int, grid: int):
    from diffusers import DiTTransformer2DModel  # pylint: disable=import-outside-toplevel
    depth, width, heads = SIZES[size]
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads,
                                 in_channels=channels, out_channels=channels, num_layers=depth,
                                 sample_size=grid, patch_size=2, num_embeds_ada_norm=1000)


def block_matmul_params(model) -> int:
    return sum(p.numel() for n, p in model.transformer_blocks.named_parameters()
               if p.ndim >= 2 and (".attn1." in n or ".ff." in n))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="XL", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    ap.add_argument("--peak_tflops", type=float, default=989.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, channels, grid = "cuda", 4, 32
    model = build(args.size, channels, grid).to(dev)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    params = sum(p.numel() for p in model.parameters())
    matmul = block_matmul_params(model)
    fwd = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    b = args.batch
    x = torch.randn(b, channels, grid, grid, device=dev)
    y = torch.randint(0, 1000, (b,), device=dev)

    def step():
        t = torch.rand(b, device=dev)
        noise = torch.randn_like(x)
        tt = t.view(-1, 1, 1, 1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = fwd((1 - tt) * x + tt * noise, timestep=t * 1000, class_labels=y).sample
        loss = ((pred.float() - (noise - x)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    dt = start.elapsed_time(end) / 1e3 / args.steps
    seq = (grid // 2) ** 2
    depth, width, _ = SIZES[args.size]
    flops = 6.0 * matmul * seq * b + 12.0 * depth * seq * seq * width * b
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | diffusers DiT-"
          f"{args.size}/2 | params {params / 1e6:.1f}M | batch {b} | bf16 autocast, SDPA, "
          f"AdamW, compile={args.compile}, checkpointing={args.checkpointing}")
    print(f"warm-up {warm_s:.1f}s | step {dt * 1e3:.1f} ms | {b / dt:.1f} img/s | model "
          f"{flops / dt / 1e12:.1f} TFLOP/s | MFU {flops / dt / 1e12 / args.peak_tflops:.1%} | "
          f"peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB | loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
