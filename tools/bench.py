"""Training throughput of MAE and DS-MAE: images/s, analytic FLOPs per image, the achieved fraction
of this machine's measured matmul throughput, peak memory, and the ratio to peers measured in the
same process.

    python tools/bench.py                                   # C1 on the CPU, our default precision
    python tools/bench.py --config C2 --precision bf16,fp32 --peers      # + timm-MAE, lightly MAE, DS-MAE ref.
    python tools/bench.py --config C3 --memory              # + peak memory, one fresh process per method
    python tools/bench.py --config C3 --device cuda --precision bf16 --compile --data-path

One timed step is what pretrain.py does per step: forward under autocast, backward, AdamW, the EMA
update of the DS-MAE teacher, the losses summed on the device and read every --log-every steps.
Inputs are a fixed random batch; --data-path adds the same step fed as pretrain.py feeds it (uint8
images held on the device, data.epoch_batches, data.augment on the device) and reports its rate as
a fraction of the fixed-batch rate. Everything timed runs interleaved (A B C A B C ...) and the
median round counts, because a shared machine's speed drifts by up to ~20% within minutes: quote
the ratios, which are measured under the same drift.

--peers (needs `pip install timm lightly`, kept out of requirements.txt) adds, each in fp32 (their
default) and under bf16 autocast (the one line a user would add): an MAE on timm's Block in the
structure of facebookresearch/mae's models_mae.py, lightly's MAE modules (MaskedVisionTransformerTIMM
+ MaskedVisionTransformerDecoderTIMM) as in lightly's MAE example, and a straightforward DS-MAE on
timm blocks (decoder and regressor on every token, masked losses, Python-loop EMA). The "x peer"
columns divide our rate by the peer's at its faster setting. Everything runs in one process, so the
peers get the allocator setting the scripts use on a CPU (models.reuse_freed_memory) as ours do.
--profile adds where the time of one step goes (torch.profiler): matmuls, attention softmax,
LayerNorm, GELU, copies and casts, other elementwise, optimiser, EMA, per method.
"""
import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))    # models.py, data.py
import data  # noqa: E402
from models import (DSMAE, MAE, MODELS, ViT, bf16_is_fast, init_weights, param_groups, patchify, reuse_freed_memory,
                    sincos_pos_embed)

CONFIGS = {  # the configurations the project is measured on (C2: the paper's CIFAR, C3: STL-10; tiny: the tests)
    "C1": dict(img_size=32, patch_size=4, model="vit_tiny", batch_size=64, decoder_dim=128, decoder_depth=4),
    "C2": dict(img_size=32, patch_size=2, model="vit_tiny", batch_size=32, decoder_dim=256, decoder_depth=4),
    "C3": dict(img_size=96, patch_size=6, model="vit_small", batch_size=16, decoder_dim=256, decoder_depth=4),
    # the CPU labs and the first run: pretrain.py's synthetic defaults
    "lab": dict(img_size=32, patch_size=4, model="vit_micro", batch_size=128, decoder_dim=128, decoder_depth=2),
    "tiny": dict(img_size=16, patch_size=4, model="vit_nano", batch_size=8, decoder_dim=32, decoder_depth=4),
}
MASK_RATIO, NOISE_RATIO, LAM = 0.75, 0.9, 0.6        # pretrain.py's defaults
OURS, PEERS = ("mae", "dsmae"), ("timm-mae", "lightly-mae", "timm-dsmae")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="C1", choices=CONFIGS)
    p.add_argument("--methods", default="mae,dsmae", help=f"any of {', '.join(OURS + PEERS)}")
    p.add_argument("--peers", action="store_true", help="add the three peers (fp32 and bf16 autocast; needs timm "
                   "and lightly)")
    p.add_argument("--reuse-memory", action=argparse.BooleanOptionalAction, default=True, help="on a CPU, "
                   "models.reuse_freed_memory() as the scripts call it; --no-reuse-memory: glibc's default")
    p.add_argument("--profile", action="store_true", help="also print where one step's time goes, per method")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto",
                   help="ours: auto (bf16 where fast, as pretrain.py), bf16, fp32, or a list: bf16,fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile our models (not the peers)")
    p.add_argument("--batch-size", type=data.POS_INT, default=None, help="override the configuration's batch")
    p.add_argument("--warmup", type=data.NONNEG_INT, default=2, help="untimed steps per method (compiles there)")
    p.add_argument("--steps", type=data.POS_INT, default=2, help="timed steps per method and round")
    p.add_argument("--rounds", type=data.POS_INT, default=5, help="interleaved rounds; the median counts")
    p.add_argument("--log-every", type=data.POS_INT, default=20, help="steps between reading the loss (pretrain.py's)")
    p.add_argument("--data-path", action="store_true",
                   help="also time our steps fed from uint8 images on the device through data.augment")
    p.add_argument("--memory", action="store_true", help="peak memory of each method, each in a fresh process, "
                   "and MAE at the batch that puts DS-MAE's number of tokens through its encoder")
    p.add_argument("--out", default=None, help="write the results here as JSON (and a .md table beside it)")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data-memory", default=None, metavar="N,N,...", type=data.Number(int, "[1, inf)", items=True),
                   help="host memory the training data takes "
                   "per rank under torchrun with N CPU processes each, one copy per machine (data.load_split) "
                   "against a private copy per rank (data.build_dataset in every rank, as before); with --dataset "
                   "and --data-dir")
    p.add_argument("--dataset", default="npz", choices=data.DATASETS)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--split", default="train")
    p.add_argument("--img-size", type=data.POS_INT, default=32)
    p.add_argument("--seed", type=data.SEED, default=0)
    p.add_argument("--num-workers", type=data.NONNEG_INT, default=4)
    p.add_argument("--data-memory-child", default=None, choices=["shared", "private"], help=argparse.SUPPRESS)
    data.add_data_args(p)
    data.finish_parser(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- analytic FLOPs

def block_flops(n, d, mlp_ratio=4):
    """Forward FLOPs of one transformer block over n tokens of width d (2 per multiply-add):
    qkv 6nd^2, projection 2nd^2, MLP 4 mlp_ratio nd^2, QK^T and AV 4n^2d."""
    return 8 * n * d * d + 4 * mlp_ratio * n * d * d + 4 * n * n * d


def train_flops(model):
    """Analytic matmul FLOPs per image of one training step of our MAE or DS-MAE: 3x the forward of
    everything that is trained (forward + backward), 1x the forward of the gradient-free teacher."""
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


def peer_train_flops(name, cfg):
    """The same count for a peer: the official MAE predicts every token, lightly's example only the
    masked ones; the DS-MAE reference runs its decoder and regressor on every token (+ class)."""
    N, P = (cfg["img_size"] // cfg["patch_size"]) ** 2, cfg["patch_size"] ** 2 * 3
    D, depth, Dd, depth_d = MODELS[cfg["model"]]["embed_dim"], MODELS[cfg["model"]]["depth"], cfg["decoder_dim"], \
        cfg["decoder_depth"]
    encoder = lambda n: 2 * N * P * D + depth * block_flops(n, D)
    if name in ("timm-mae", "lightly-mae"):
        keep = int(N * (1 - MASK_RATIO))
        head = N + 1 if name == "timm-mae" else N - keep
        return 3 * (encoder(keep + 1) + 2 * (keep + 1) * D * Dd + depth_d * block_flops(N + 1, Dd)
                    + 2 * head * Dd * P)
    decoder = 2 * (N + 1) * D * Dd + depth_d * block_flops(N + 1, Dd) + 2 * (N + 1) * Dd * P
    return 3 * (encoder(N + 1) + decoder + 2 * block_flops(N + 1, D)) + encoder(N + 1)


# ----------------------------------------------------------------------------- the machine

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device, dtype, shapes=(), squares=None, seconds=0.4):
    """What this machine's matmuls can do, at the thread count the runs use: the best rate (each shape's median
    time) over large squares and `shapes`, (M, K, N) products as the model's linear layers run them (F.linear,
    with a bias). One square alone understated it: fp32 came out at 76-155 GFLOP/s from run to run on the 2-core
    machine, below what the peers' linear layers reached. The best of several is a ceiling nothing here exceeds."""
    squares = squares or ((4096, 8192, 16384) if device.type == "cuda" else (1024, 2048, 3072))
    best = 0.0
    for m, k, n in [(s, s, s) for s in squares] + list(shapes):
        a, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
        bias = torch.randn(n, device=device, dtype=dtype)
        for _ in range(2):
            F.linear(a, w, bias)
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            synchronize(device)
            t = time.perf_counter()
            F.linear(a, w, bias)
            synchronize(device)
            times.append(time.perf_counter() - t)
        best = max(best, 2 * m * k * n / statistics.median(times))
    return best


def linear_shapes(cfg):
    """(M, K, N) of the encoder's linear layers at this configuration, every patch a token (DS-MAE's student and
    teacher): q/k/v, the MLP's two layers, the attention's projection."""
    d, tokens = MODELS[cfg["model"]]["embed_dim"], (cfg["img_size"] // cfg["patch_size"]) ** 2 + 1
    m = cfg["batch_size"] * tokens
    return [(m, d, 3 * d), (m, d, 4 * d), (m, 4 * d, d), (m, d, d)]


def cpu_times():
    """(wall s, this process's CPU s, all CPUs' busy s): to tell how much else ran meanwhile."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:8]]
    own = os.times()
    return time.perf_counter(), own.user + own.system, (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def held_bytes(model, opt):
    """Memory a model holds between steps: weights, buffers (the EMA teacher's too), optimiser state."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def rss_mib(field="VmRSS"):
    """This process's resident memory now (VmRSS) or at its peak (VmHWM). Not getrusage's ru_maxrss:
    a child process inherits its parent's peak there."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_memory_mib(device, before):
    """CUDA: the allocator's peak, CPU: the process's peak resident set, each minus what the process
    held before the model was built (`before`, MiB): weights, optimiser state, activations."""
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else rss_mib("VmHWM")
    return peak - before


# ----------------------------------------------------------------------------- what is timed

def build(method, cfg, device):
    """Our MAE or DS-MAE with pretrain.py's defaults."""
    torch.manual_seed(0)
    enc = ViT(img_size=cfg["img_size"], patch_size=cfg["patch_size"], **MODELS[cfg["model"]])
    if method == "mae":
        model = MAE(enc, decoder_dim=cfg["decoder_dim"], decoder_depth=cfg["decoder_depth"],
                    mask_ratio=MASK_RATIO)
    else:
        model = DSMAE(enc, decoder_dim=cfg["decoder_dim"], decoder_depth=cfg["decoder_depth"],
                      noise_ratio=NOISE_RATIO, lam=LAM)
    return model.to(device).train()


def our_step(method, cfg, device, precision, compile_model, log_every):
    """pretrain.py's step for our model: returns (step(x), model, optimiser). The only host
    synchronisation is reading the summed losses every log_every steps."""
    model = build(method, cfg, device)
    fwd = torch.compile(model) if compile_model else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    # fused AdamW, as pretrain.py (on the CPU too: measured +8-19% steps there against the for-each one)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    sums, count = torch.zeros(3, device=device), [0]
    zero = torch.zeros((), device=device)

    def step(x):
        with amp:
            loss, parts = fwd(x)
        loss.backward()
        sums.add_(torch.stack([loss.detach(), parts.get("loss_y", zero), parts.get("loss_z", zero)]).float())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if method == "dsmae":
            model.update_teacher(0.99)
        count[0] += 1
        if count[0] % log_every == 0:
            assert math.isfinite(sums[0].item()), "non-finite loss"
    return step, model, opt


def data_feed(cfg, device, n_images=1024):
    """pretrain.py's input pipeline: uint8 images on the device, a seeded permutation per epoch, the
    RNG seeded per step, random resized crop + flip + normalisation on the device. Returns next_batch()."""
    ds = data.synthetic_shapes("train", cfg["img_size"], seed=0, n=max(n_images, 4 * cfg["batch_size"]))
    images = ds.x.to(device)
    state = dict(epoch=0, step=0, batches=iter(()))

    def next_batch():
        state["step"] += 1
        torch.manual_seed(state["step"])
        idx = next(state["batches"], None)
        if idx is None:                                  # new epoch
            state["epoch"] += 1
            state["batches"] = data.epoch_batches(len(images), cfg["batch_size"], state["epoch"], seed=0)
            idx = next(state["batches"])
        x = images[idx.to(device, non_blocking=True)]
        return data.augment(x, cfg["img_size"], ds.mean, ds.std)
    return next_batch


def peer_step(name, cfg, device, precision="fp32"):
    """One training step of a peer as its own reference loop runs it, in fp32 (its default) or under
    bf16 autocast (the one line a user would add): (step(x), model, optimiser)."""
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    torch.manual_seed(0)
    model = PEER_CLASSES[name](cfg).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and not n.endswith("token")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith("token"))]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.05), dict(params=no_decay, weight_decay=0.0)],
                            lr=1.5e-4, betas=(0.9, 0.95))

    def step(x):
        with amp:
            loss = model(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(model, "ema_update"):
            model.ema_update()
        loss.item()                                      # MAE's engine_pretrain reads it every step
    return step, model, opt


def make_runners(args, cfg, device):
    """name -> dict(step: a step on the fixed batch (or fed by the data path), flops: per image,
    precision, held: (model, optimiser)); ours at each precision asked for, then the peers."""
    precisions = ["bf16" if bf16_is_fast(device) else "fp32"] if args.precision == "auto" else \
        args.precision.split(",")
    methods = args.methods.split(",") + (list(PEERS) if args.peers else [])
    x = torch.randn(cfg["batch_size"], 3, cfg["img_size"], cfg["img_size"], device=device)
    runners, feed = {}, None
    for method in dict.fromkeys(methods):
        if method in PEERS:                          # both settings a user of the peer could pick
            both = ("fp32", "bf16") if bf16_is_fast(device) else ("fp32",)
            for precision in precisions if args.memory_child else both:
                step, model, opt = peer_step(method, cfg, device, precision)
                runners[f"{method} {precision}"] = dict(step=lambda s=step: s(x), flops=peer_train_flops(method, cfg),
                                                        precision=precision, peer=method, held=(model, opt))
            continue
        assert method in OURS, f"unknown method {method}; choose from {OURS + PEERS}"
        for precision in precisions:
            name = f"{method} {precision}" + (" compiled" if args.compile else "")
            step, model, opt = our_step(method, cfg, device, precision, args.compile, args.log_every)
            runners[name] = dict(step=lambda s=step: s(x), flops=train_flops(model), precision=precision,
                                 held=(model, opt))
            if args.data_path:
                feed = feed or data_feed(cfg, device)
                runners[name + " +data"] = dict(step=lambda s=step: s(feed()), flops=train_flops(model),
                                                precision=precision, synthetic=name, held=(model, opt))
    return runners


# ----------------------------------------------------------------------------- memory, one process per method

def memory_child(args, cfg, device):
    """(child process) Build one method, take warm-up steps, print its peak memory as JSON."""
    # first a step of the tiny configuration, uncompiled: what torch (and timm, lightly) load lazily,
    # ~160 MB on a CPU, is then loaded before the baseline
    for r in make_runners(argparse.Namespace(**{**vars(args), "compile": False}), CONFIGS["tiny"], device).values():
        r["step"]()
    del r
    gc.collect()
    before = rss_mib()
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
    runner = next(iter(make_runners(args, cfg, device).values()))
    for _ in range(max(args.warmup, 2)):
        runner["step"]()
    synchronize(device)
    print(json.dumps(dict(peak_mib=peak_memory_mib(device, before))))


def measure_memory(args, cfg, names):
    """Peak memory of each runner in a fresh process, and of MAE at the batch whose visible
    tokens equal DS-MAE's (batch / (1 - mask ratio)): the same number of tokens through the encoder."""
    names = [name for name in names if "+data" not in name]
    B, N = cfg["batch_size"], (cfg["img_size"] // cfg["patch_size"]) ** 2
    jobs = [(name, B) for name in names] + [(n, round(B / (1 - MASK_RATIO))) for n in names if n.startswith("mae ")]
    out = {}
    for name, batch in jobs:
        method, precision = name.split()[:2]
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", "--config", args.config,
               "--device", args.device, "--methods", method, "--precision", precision,
               "--batch-size", str(batch), "--reuse-memory" if args.reuse_memory else "--no-reuse-memory"] + \
            (["--compile"] if args.compile and method in OURS else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
        if res.returncode or not lines:
            raise RuntimeError(f"memory child {name} failed:\n{res.stderr[-2000:]}")
        tokens = N + 1 if "dsmae" in method else N - round(MASK_RATIO * N) + 1     # through the encoder
        out[name if batch == B else f"{name} @ batch {batch}"] = dict(
            batch=batch, encoder_tokens=batch * tokens, peak_mib=json.loads(lines[-1])["peak_mib"])
    return out


# ----------------------------------------------------------------------------- data memory under torchrun

def memory_of_this_process():
    """MiB: peak resident set (VmHWM), and now: resident set and its proportional share (Pss: a page
    mapped by k processes counts 1/k in each, so the Pss of all ranks sums to the machine's use)."""
    pss = next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("Pss:")) / 1024
    return dict(peak_rss=rss_mib("VmHWM"), rss=rss_mib(), pss=pss)


def data_memory_child(args):
    """(a torchrun rank) Load the split as pretrain.py does (shared) or a private copy per rank, read
    every byte, and report this rank's memory to rank 0, which prints all of them as JSON."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    base = memory_of_this_process()
    if args.data_memory_child == "shared":
        ds = data.load_split(args, args.split, args.img_size)
    else:
        ds = data.build_dataset(args.dataset, args.split, data_dir=args.data_dir, img_size=args.img_size,
                                seed=args.seed, num_workers=1, **data.data_options(args))
    checksum = sum(int(ds.x[i:i + 1024].sum(dtype=torch.int64)) for i in range(0, len(ds), 1024))  # reads every byte
    mem = {k: round(v - base[k], 1) for k, v in memory_of_this_process().items()}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, dict(mem, checksum=checksum, data_mib=round(ds.x.numel() / 2 ** 20, 1)))
    if dist.get_rank() == 0:
        print(json.dumps(rows))
    dist.destroy_process_group()


def measure_data_memory(args):
    """Per rank, above what the process held before loading: peak RSS, RSS and PSS in MiB; and
    the machine's total (sum of PSS). One torchrun per (mode, N)."""
    results = []
    for n in args.data_memory:
        for mode in ("private", "shared"):
            i = sys.argv.index("--data-memory")                # the same flags, less --data-memory N,...
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   os.path.abspath(__file__), "--data-memory-child", mode, *sys.argv[1:i], *sys.argv[i + 2:]]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            lines = [l for l in res.stdout.splitlines() if l.startswith("[")]
            if res.returncode or not lines:
                raise SystemExit(f"error: the {n}-process {mode} run failed:\n{res.stderr[-2000:]}")
            rows = json.loads(lines[-1])
            assert len({r["checksum"] for r in rows}) == 1, "ranks saw different data"
            results.append(dict(processes=n, mode=mode, data_mib=rows[0]["data_mib"], peak_rss_rank0=rows[0]["peak_rss"],
                                peak_rss_others=max([r["peak_rss"] for r in rows[1:]], default=None),
                                rss_now=max(r["rss"] for r in rows), pss_per_rank=round(max(r["pss"] for r in rows), 1),
                                machine_total=round(sum(r["pss"] for r in rows), 1)))
            print(json.dumps(results[-1]))
    print("| processes | copy | data MiB | peak RSS rank 0 | peak RSS other ranks | RSS after | PSS per rank | "
          "machine total (sum of PSS) |\n" + "| --- " * 8 + "|")
    for r in results:
        print(f"| {r['processes']} | {r['mode']} | {r['data_mib']} | {r['peak_rss_rank0']} | {r['peak_rss_others'] or '-'} "
              f"| {r['rss_now']} | {r['pss_per_rank']} | {r['machine_total']} |")
    return results


# ----------------------------------------------------------------------------- main

def main(args):
    device = torch.device(args.device)
    if args.reuse_memory:
        reuse_freed_memory(device)
    cfg = dict(CONFIGS[args.config])
    if args.batch_size:
        cfg["batch_size"] = args.batch_size
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True      # as pretrain.py
    if args.memory_child:
        return memory_child(args, cfg, device)
    if args.data_memory_child:
        return data_memory_child(args)
    if args.data_memory:
        return measure_data_memory(args)
    runners = make_runners(args, cfg, device)
    ceilings = {p: matmul_ceiling(device, torch.bfloat16 if p == "bf16" else torch.float32, linear_shapes(cfg))
                for p in sorted({r["precision"] for r in runners.values()})}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"{args.config}: {cfg} | {device} ({where}, {torch.get_num_threads()} threads) | torch {torch.__version__}")
    print("measured matmul ceilings: " + ", ".join(f"{p} {c / 1e9:.0f} GFLOP/s" for p, c in ceilings.items()), flush=True)

    for name, r in runners.items():              # warm-up; the first step includes any compilation
        synchronize(device)
        t = time.perf_counter()
        for _ in range(args.warmup):
            r["step"]()
        synchronize(device)
        r["warmup_s"], r["times"] = time.perf_counter() - t, []
    start = cpu_times()
    for _ in range(args.rounds):                 # interleaved: drift hits every method alike
        for r in runners.values():
            synchronize(device)
            if device.type == "cuda":            # this method's peak: what it holds + what its steps add
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                r["step"]()
            synchronize(device)
            r["times"].append((time.perf_counter() - t) / args.steps)
            if device.type == "cuda":
                r["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before + held_bytes(*r["held"])) / 2 ** 20

    (wall, own, busy), end = start, cpu_times()
    other_load = (end[2] - busy - (end[1] - own)) / (end[0] - wall) / os.cpu_count()
    rows = []
    rate = lambda r: cfg["batch_size"] / statistics.median(r["times"])
    best = {}                                    # each peer at its faster setting, fp32 or bf16 autocast
    for r in runners.values():
        if "peer" in r:
            best[r["peer"]] = max(best.get(r["peer"], 0.0), rate(r))
    for name, r in runners.items():
        if not r["times"]:
            continue
        ips = rate(r)
        row = dict(name=name, precision=r["precision"], img_per_s=ips, gflop_per_img=r["flops"] / 1e9,
                   gflop_per_s=r["flops"] * ips / 1e9, of_ceiling=r["flops"] * ips / ceilings[r["precision"]],
                   warmup_s=r["warmup_s"], step_s=r["times"])
        if "peak_mib" in r:
            row["peak_mib"] = r["peak_mib"]
        if "synthetic" in r:
            row["of_synthetic"] = ips / rate(runners[r["synthetic"]])
        for peer, peer_ips in best.items():   # ours against the same method's peers at their best; peers: none
            if "peer" not in r and "synthetic" not in r and peer.endswith("dsmae") == name.startswith("dsmae"):
                row[f"x {peer}"] = ips / peer_ips
        rows.append(row)
    result = dict(config=args.config, cfg=cfg, device=f"{device} ({where})", torch=torch.__version__,
                  threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"), compile=args.compile,
                  other_cpu_load=other_load,
                  ceilings_gflop_per_s={p: c / 1e9 for p, c in ceilings.items()}, rows=rows)
    if args.memory:
        result["memory"] = measure_memory(args, cfg, list(runners))
        for row in rows:
            row["peak_mib"] = result["memory"].get(row["name"], {}).get("peak_mib", float("nan"))
    if args.profile:
        result["profile"] = {name: profile_step(r, args.steps) for name, r in runners.items() if "peer" not in r}
    table = format_table(result)
    print(table, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table + "\n")
    return result


# (group, pieces of torch.profiler op names); the first group that matches takes the op's self time
PROFILE_GROUPS = (("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "convolution")),
                  ("attention softmax (or fused attention)", ("softmax", "scaled_dot_product", "flash_attention")),
                  ("LayerNorm", ("layer_norm",)), ("GELU", ("gelu",)),
                  ("copies and dtype casts", ("aten::copy_", "aten::_to_copy", "aten::clone")),
                  ("optimiser (fused AdamW)", ("adamw", "Optimizer")), ("EMA teacher update", ("lerp", "foreach_copy")),
                  ("masks, noise, gathers", ("gather", "scatter", "sort", "index", "normal_", "uniform_", "where")),
                  ("other elementwise and reductions", ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::sum",
                                                        "aten::mean", "aten::cat", "aten::pow", "aten::var", "aten::fill_",
                                                        "aten::zero_", "aten::neg", "aten::rsub", "aten::sqrt")))


def profile_step(runner, steps):
    """ms per step of each PROFILE_GROUPS group over `steps` steps (self time, so nothing counts twice);
    "the rest" is allocation, views, autograd and dispatch bookkeeping."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner["step"]()
    groups = dict.fromkeys([g for g, _ in PROFILE_GROUPS] + ["the rest"], 0.0)
    for e in prof.key_averages():
        g = next((g for g, keys in PROFILE_GROUPS if any(k in e.key for k in keys)), "the rest")
        groups[g] += e.self_cpu_time_total / steps / 1e3
    return groups


def format_table(result):
    ratio_keys = sorted({k for r in result["rows"] for k in r if k.startswith("x ") or k == "of_synthetic"})
    lines = [f"{result['config']} {result['cfg']} on {result['device']}, torch {result['torch']}, "
             f"{result['threads']} threads, {result['date']}; other processes used {result['other_cpu_load']:.0%} "
             f"of the CPUs meanwhile; ceilings "
             + ", ".join(f"{p} {c:.0f} GFLOP/s" for p, c in result["ceilings_gflop_per_s"].items()), "",
             "| method | img/s | GFLOP/img | GFLOP/s | of ceiling | first steps s | peak MiB | "
             + " | ".join(ratio_keys) + " |", "|---" * (7 + len(ratio_keys)) + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['img_per_s']:.1f} | {r['gflop_per_img']:.3f} | {r['gflop_per_s']:.0f} | "
                     f"{r['of_ceiling']:.2f} | {r['warmup_s']:.1f} | {r.get('peak_mib', float('nan')):.0f} | "
                     + " | ".join(f"{r[k]:.2f}" if k in r else "" for k in ratio_keys) + " |")
    if "profile" in result:
        names = list(result["profile"])
        lines += ["", "| where a step's time goes (torch.profiler, ms/step and share) | " + " | ".join(names) + " |",
                  "|---" * (1 + len(names)) + "|"]
        for g in result["profile"][names[0]]:
            lines.append(f"| {g} | " + " | ".join(f"{p[g]:.1f} ({p[g] / sum(p.values()):.0%})"
                                                for p in result["profile"].values()) + " |")
    if "memory" in result:
        lines += ["", "| memory (fresh process each) | batch | encoder tokens/step | peak MiB |", "|---|---|---|---|"]
        lines += [f"| {k} | {m['batch']} | {m['encoder_tokens']} | {m['peak_mib']:.0f} |" for k, m in result["memory"].items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- peers (timm, lightly)
# Imported only when asked for, so that bench.py runs without them.

def timm_blocks(n, dim, heads):
    from functools import partial

    from timm.models.vision_transformer import Block
    return nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
                         for _ in range(n))


class PeerEncoder(nn.Module):
    """models_mae.py's encoder half: timm PatchEmbed, class token, fixed sin-cos positions, timm blocks."""

    def __init__(self, cfg):
        super().__init__()
        from timm.layers import PatchEmbed
        spec, p = MODELS[cfg["model"]], cfg["patch_size"]
        self.p, self.grid = p, cfg["img_size"] // p
        self.patch_embed = PatchEmbed(cfg["img_size"], p, 3, spec["embed_dim"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec["embed_dim"]))
        self.pos_embed = nn.Parameter(sincos_pos_embed(spec["embed_dim"], self.grid, self.grid), requires_grad=False)
        self.blocks = timm_blocks(spec["depth"], spec["embed_dim"], spec["num_heads"])
        self.norm = nn.LayerNorm(spec["embed_dim"], eps=1e-6)
        nn.init.normal_(self.cls_token, std=0.02)
        init_weights(self)               # the official MAE's: xavier-uniform (patch projection as one linear)

    def forward(self, x, keep=None):
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class PeerDecoder(nn.Module):
    """models_mae.py's decoder: embed, (mask tokens,) positions, timm blocks, norm, pixel head, on every token."""

    def __init__(self, cfg):
        super().__init__()
        D, Dd, grid = MODELS[cfg["model"]]["embed_dim"], cfg["decoder_dim"], cfg["img_size"] // cfg["patch_size"]
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(Dd, grid, grid), requires_grad=False)
        self.decoder_blocks = timm_blocks(cfg["decoder_depth"], Dd, Dd // 32)
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, cfg["patch_size"] ** 2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        init_weights(self)

    def forward(self, x, restore=None):
        x = self.decoder_embed(x)
        if restore is not None:                          # unshuffle, mask tokens in the gaps
            B, n, C = x.shape
            seq = torch.cat([x[:, 1:], self.mask_token.expand(B, restore.shape[1] + 1 - n, C)], dim=1)
            x = torch.cat([x[:, :1], torch.gather(seq, 1, restore.unsqueeze(-1).expand(-1, -1, C))], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


class TimmMAE(nn.Module):
    """facebookresearch/mae models_mae.py on timm blocks: argsort masking, loss on the masked patches."""

    def __init__(self, cfg):
        super().__init__()
        self.encoder, self.decoder = PeerEncoder(cfg), PeerDecoder(cfg)

    def forward(self, imgs):
        B, N = imgs.shape[0], self.encoder.grid ** 2
        n_keep = int(N * (1 - MASK_RATIO))
        order = torch.argsort(torch.rand(B, N, device=imgs.device), dim=1)
        restore = torch.argsort(order, dim=1)
        mask = torch.ones(B, N, device=imgs.device)
        mask[:, :n_keep] = 0
        mask = torch.gather(mask, 1, restore)
        pred = self.decoder(self.encoder(imgs, order[:, :n_keep]), restore)
        per_patch = ((pred - patchify(imgs, self.encoder.p)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()


class LightlyMAE(nn.Module):
    """lightly's MAE example: a timm VisionTransformer in MaskedVisionTransformerTIMM, the decoder
    module, a linear pixel head on the masked tokens, MSE."""

    def __init__(self, cfg):
        super().__init__()
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
        from timm.models.vision_transformer import VisionTransformer
        spec, p = MODELS[cfg["model"]], cfg["patch_size"]
        vit = VisionTransformer(img_size=cfg["img_size"], patch_size=p, num_classes=0, **spec)
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.p, self.seq_len = p, self.backbone.sequence_length
        self.decoder_embed = nn.Linear(spec["embed_dim"], cfg["decoder_dim"])
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=cfg["decoder_dim"],
            depth=cfg["decoder_depth"],
            num_heads=cfg["decoder_dim"] // 32)
        self.decoder_pred = nn.Linear(cfg["decoder_dim"], p * p * 3)

    def forward(self, imgs):
        from lightly.models import utils
        B = imgs.shape[0]
        idx_keep, idx_mask = utils.random_token_mask((B, self.seq_len), MASK_RATIO, device=imgs.device)
        x = self.decoder_embed(self.backbone.encode(imgs, idx_keep=idx_keep))
        full = utils.repeat_token(self.decoder.mask_token, (B, self.seq_len))
        full = utils.set_at_index(full, idx_keep, x.type_as(full))
        pred = self.decoder_pred(utils.get_at_index(self.decoder(full), idx_mask))
        target = utils.get_at_index(utils.patchify(imgs, self.p), idx_mask - 1)
        return F.mse_loss(pred, target)


class TimmDSMAE(nn.Module):
    """A straightforward DS-MAE: the student on every (noised) patch, decoder and regressor on every
    token with the losses masked to the noised patches, an EMA teacher updated in a Python loop."""

    def __init__(self, cfg):
        super().__init__()
        D, heads = MODELS[cfg["model"]]["embed_dim"], MODELS[cfg["model"]]["num_heads"]
        self.student, self.decoder = PeerEncoder(cfg), PeerDecoder(cfg)
        self.regressor = timm_blocks(2, D, heads)
        self.regressor_norm = nn.LayerNorm(D, eps=1e-6)
        init_weights(self.regressor)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def forward(self, imgs):
        B, p, grid = imgs.shape[0], self.student.p, self.student.grid
        n_noise = int(round(NOISE_RATIO * grid * grid))
        order = torch.argsort(torch.rand(B, grid * grid, device=imgs.device), dim=1)
        m = torch.zeros(B, grid * grid, device=imgs.device).scatter_(1, order[:, :n_noise], 1.0)
        pix = m.view(B, 1, grid, grid).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
        z = self.student(imgs + torch.randn_like(imgs) * pix)
        loss_y = ((self.decoder(z) - patchify(imgs, p)) ** 2).mean(dim=-1)
        r = z
        for blk in self.regressor:
            r = blk(r)
        r = self.regressor_norm(r)[:, 1:]
        with torch.no_grad():
            t = self.teacher(imgs)[:, 1:]
        loss_z = 1 - F.cosine_similarity(r, t, dim=-1)
        return (LAM * (loss_y * m).sum() + (1 - LAM) * (loss_z * m).sum()) / m.sum()

    @torch.no_grad()
    def ema_update(self, momentum=0.99):
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(momentum).add_(s, alpha=1 - momentum)


PEER_CLASSES = {"timm-mae": TimmMAE, "lightly-mae": LightlyMAE, "timm-dsmae": TimmDSMAE}


if __name__ == "__main__":
    main(get_args())
