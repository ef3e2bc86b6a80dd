"""Training throughput of MAE and DS-MAE: images/s, analytic FLOPs per image, and the achieved
fraction of this machine's measured matmul throughput.

    python bench.py                          # C1: 32 px, patch 4, ViT-T, batch 64, on the CPU
    python bench.py --config C2 --precision fp32
    python bench.py --config C3 --device cuda --compile

One timed step is what pretrain.py does per step: forward, backward, AdamW, and for DS-MAE the
EMA update of the teacher; inputs are a fixed random batch (no data loading). Methods are
interleaved (A B A B ...) and the median over rounds is reported, because this machine's speed
drifts by up to ~18% between runs of the same thing.
"""
import argparse
import resource
import statistics
import time
from contextlib import nullcontext

import torch

from models import DSMAE, MAE, MODELS, ViT

CONFIGS = {  # the configurations the project is measured on
    "C1": dict(img_size=32, patch_size=4, model="vit_tiny", batch_size=64, decoder_dim=128),
    "C2": dict(img_size=32, patch_size=2, model="vit_tiny", batch_size=32, decoder_dim=256),   # paper, CIFAR
    "C3": dict(img_size=96, patch_size=6, model="vit_small", batch_size=16, decoder_dim=256),  # paper, STL-10
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="C1", choices=CONFIGS)
    p.add_argument("--methods", default="mae,dsmae")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--batch-size", type=int, default=None, help="override the configuration's batch")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    p.add_argument("--steps", type=int, default=3, help="timed steps per method and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    return p.parse_args(argv)


def block_flops(n, d, mlp_ratio=4):
    """Forward FLOPs of one transformer block over n tokens of width d (2 per multiply-add):
    qkv 6nd^2, projection 2nd^2, MLP 4 mlp_ratio nd^2, QK^T and AV 4n^2d."""
    return 8 * n * d * d + 4 * mlp_ratio * n * d * d + 4 * n * n * d


def train_flops(model):
    """Analytic matmul FLOPs per image of one training step: 3x the forward of everything that
    is trained (forward + backward), 1x the forward of the gradient-free teacher."""
    enc = model.encoder
    N, D, P = enc.grid ** 2, enc.embed_dim, enc.patch_size ** 2 * enc.in_chans
    embed = 2 * N * P * D
    trained, frozen = 0, 0
    if isinstance(model, MAE):
        keep, Dd = N - model.num_masked, model.mask_token.shape[-1]
        trained += embed + enc.depth * block_flops(keep + 1, D)
        trained += 2 * (keep + 1) * D * Dd + len(model.decoder.decoder_blocks) * block_flops(N + 1, Dd)
        trained += 2 * (N + 1) * Dd * P
    else:
        M = model.num_noised
        trained += embed + enc.depth * block_flops(N + 1, D)
        if model.decoder is not None:
            Dd = model.decoder.decoder_embed.out_features
            trained += 2 * M * D * Dd + len(model.decoder.decoder_blocks) * block_flops(M, Dd) + 2 * M * Dd * P
        if model.teacher is not None:
            trained += (len(model.regressor) - 1) * block_flops(M, D)
            frozen += embed + enc.depth * block_flops(N + 1, D)
    return 3 * trained + frozen


def matmul_ceiling(device, dtype, n=2048, seconds=1.0):
    """Median FLOP/s of torch.mm on n x n matrices: what this machine's matmuls can do."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def build(method, cfg, device):
    torch.manual_seed(0)
    enc = ViT(img_size=cfg["img_size"], patch_size=cfg["patch_size"], **MODELS[cfg["model"]])
    if method == "mae":
        model = MAE(enc, decoder_dim=cfg["decoder_dim"], decoder_depth=4)
    else:
        model = DSMAE(enc, decoder_dim=cfg["decoder_dim"], decoder_depth=4)
    return model.to(device).train()


def main(args):
    device = torch.device(args.device)
    cfg = dict(CONFIGS[args.config])
    if args.batch_size:
        cfg["batch_size"] = args.batch_size
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ceiling = matmul_ceiling(device, dtype)
    print(f"{args.config}: {cfg} | {args.precision}{' compiled' if args.compile else ''} | {device} | "
          f"{torch.get_num_threads()} threads | torch {torch.__version__}")
    print(f"measured {args.precision} matmul ceiling: {ceiling / 1e9:.0f} GFLOP/s")

    runs = {}
    x = torch.randn(cfg["batch_size"], 3, cfg["img_size"], cfg["img_size"], device=device)
    for method in args.methods.split(","):
        model = build(method, cfg, device)
        fwd = torch.compile(model) if args.compile else model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                                fused=device.type == "cuda" or None)

        def step(model=model, fwd=fwd, opt=opt):
            with amp:
                loss, _ = fwd(x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if isinstance(model, DSMAE):
                model.update_teacher(0.99)

        for _ in range(args.warmup):
            step()
        runs[method] = dict(step=step, times=[], flops=train_flops(model))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    for _ in range(args.rounds):                     # interleave the methods: drift hits all alike
        for r in runs.values():
            for _ in range(args.steps):
                sync()
                t = time.perf_counter()
                r["step"]()
                sync()
                r["times"].append(time.perf_counter() - t)

    print(f"{'method':8s} {'img/s':>8s} {'GFLOP/img':>10s} {'GFLOP/s':>8s} {'of ceiling':>10s}")
    for method, r in runs.items():
        ips = cfg["batch_size"] / statistics.median(r["times"])
        achieved = r["flops"] * ips
        print(f"{method:8s} {ips:8.1f} {r['flops'] / 1e9:10.3f} {achieved / 1e9:8.0f} {achieved / ceiling:10.2f}")
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak {'GPU memory' if device.type == 'cuda' else 'RSS (whole process)'}: {peak:.0f} MiB")
    return runs


if __name__ == "__main__":
    main(get_args())
