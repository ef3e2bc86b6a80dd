"""bench.py: the analytic FLOP count against a hand count and against torch's FLOP counter, a tiny
end-to-end run, and the fast paths (explicit bf16 attention on a CPU, torch.compile) against fp32
eager on a fixed batch."""
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bench
import models


def linear(n, i, o):
    return 2 * n * i * o                                       # FLOPs of (n, i) @ (i, o)


def block(n, d):
    """One block written out matmul by matmul: qkv, q k^T, attn v, projection, fc1, fc2."""
    return linear(n, d, 3 * d) + 2 * n * n * d + 2 * n * n * d + linear(n, d, d) + linear(n, d, 4 * d) + linear(n, 4 * d, d)


def test_flops_match_a_hand_count_on_the_tiny_config():
    cfg = bench.CONFIGS["tiny"]                                 # 16 px, patch 4: 16 patches of 48 pixels
    N, P, D, Dd = 16, 48, 32, 32                                # vit_nano width 32, 2 blocks; decoder 32 wide
    embed = linear(N, P, D)
    # MAE: 4 visible patches (+ class token) through the encoder; the decoder on all 16 (+ class)
    mae = embed + 2 * block(5, D) + linear(5, D, Dd) + 4 * block(17, Dd) + linear(17, Dd, P)
    assert bench.train_flops(bench.build("mae", cfg, torch.device("cpu"))) == 3 * mae
    # DS-MAE: 14 noised patches (round(0.9 * 16)) go to the decoder and the 2-block regressor; the
    # student and the teacher see all 16 (+ class); the teacher runs forward only
    student = embed + 2 * block(17, D)
    dsmae = 3 * (student + linear(14, D, Dd) + 4 * block(14, Dd) + linear(14, Dd, P) + 2 * block(14, D)) + student
    assert bench.train_flops(bench.build("dsmae", cfg, torch.device("cpu"))) == dsmae
    # the peers: the official MAE's head predicts every token, lightly's only the 12 masked ones
    assert bench.peer_train_flops("timm-mae", cfg) == 3 * mae
    assert bench.peer_train_flops("lightly-mae", cfg) == 3 * (mae - linear(17, Dd, P) + linear(12, Dd, P))
    ref = student + linear(17, D, Dd) + 4 * block(17, Dd) + linear(17, Dd, P) + 2 * block(17, D)
    assert bench.peer_train_flops("timm-dsmae", cfg) == 3 * ref + student


@pytest.mark.parametrize("method", ["mae", "dsmae"])
def test_flops_match_what_torch_counts_in_a_training_step(method):
    """torch's FlopCounterMode over forward + backward (bf16 on a CPU: explicit attention matmuls,
    which it counts). The backward of each matmul costs 2x its forward, except the patch projection,
    whose input (the images) needs no gradient: the analytic count is higher by exactly that."""
    cfg = bench.CONFIGS["tiny"]
    model = bench.build(method, cfg, torch.device("cpu"))
    x = torch.randn(4, 3, 16, 16)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model(x)
        loss.backward()
    assert counter.get_total_flops() == 4 * (bench.train_flops(model) - 2 * 16 * 48 * 32)


def test_bench_runs_end_to_end_on_the_tiny_config(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "matmul_ceiling", functools.partial(bench.matmul_ceiling, squares=(256,), seconds=0.01))
    out = tmp_path / "bench.json"
    result = bench.main(bench.get_args(["--config", "tiny", "--precision", "bf16,fp32", "--data-path", "--warmup", "1",
                                        "--steps", "1", "--rounds", "2", "--log-every", "1", "--out", str(out)]))
    names = [r["name"] for r in result["rows"]]
    assert names == ["mae bf16", "mae bf16 +data", "mae fp32", "mae fp32 +data",
                     "dsmae bf16", "dsmae bf16 +data", "dsmae fp32", "dsmae fp32 +data"]
    for r in result["rows"]:
        assert r["img_per_s"] > 0 and 0 < r["of_ceiling"] and len(r["step_s"]) == 2
        assert ("of_synthetic" in r) == r["name"].endswith("+data")
    assert json.loads(out.read_text())["rows"][0]["gflop_per_img"] == pytest.approx(result["rows"][0]["gflop_per_img"])
    assert "| dsmae bf16 |" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_gpu_script_runs_on_a_cpu_and_keeps_numbers_when_compiling_fails(tmp_path):
    """bench_gpu.sh, the script prepared for a lent GPU, end to end on the tiny configuration and a 200-image
    npz: a compiled run that fails (here: an unknown flag in its place) leaves the uncompiled numbers, and the
    learning part then pretrains uncompiled, for epochs taken from the uncompiled rate, and probes three encoders."""
    rng = np.random.default_rng(0)
    npz = tmp_path / "small.npz"
    np.savez(npz, x=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), y=np.repeat(np.arange(10), 20),
             class_names=np.array([f"c{i}" for i in range(10)]))
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")   # the script's `python`: ours
    env = dict(os.environ, PATH=path, DEVICE="cpu", CONFIGS="tiny:8", COMPILE="--no-such-flag", LIMIT_EAGER="300",
               LEARN_S="2", CIFAR_NPZ=str(npz), LEARN_MODEL="--model vit_nano --patch-size 8")
    res = subprocess.run(["bash", "bench_gpu.sh", str(tmp_path / "out")], cwd=os.path.dirname(bench.__file__), env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert "tiny compiled: failed" in res.stdout and not (out / "speed_tiny_compiled.json").exists()
    rows = json.loads((out / "speed_tiny_eager.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["mae bf16", "mae bf16 +data", "dsmae bf16", "dsmae bf16 +data"]
    assert "--no-compile" in res.stdout                        # the learning part knew the compiler had failed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["speed"]) == {"tiny_eager"} and set(summary["learning"]) == {"random", "mae", "dsmae"}
    for enc in ("mae", "dsmae"):
        assert summary["learning"][enc]["epochs"] >= 1 and 0 <= summary["learning"][enc]["knn_top1"] <= 100
    assert "| dsmae |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_bench_memory_runs_each_method_in_a_fresh_process():
    result = bench.main(bench.get_args(["--config", "tiny", "--precision", "bf16", "--warmup", "1", "--steps", "1",
                                        "--rounds", "1", "--memory"]))
    mem = result["memory"]
    assert set(mem) == {"mae bf16", "dsmae bf16", "mae bf16 @ batch 32"}
    # the same patch tokens through the encoder: 32 images x 4 visible = 8 x 16 (+ one class token per image)
    assert mem["mae bf16 @ batch 32"]["encoder_tokens"] - 32 == mem["dsmae bf16"]["encoder_tokens"] - 8
    assert all(m["peak_mib"] > 0 for m in mem.values())


def test_explicit_bf16_attention_matches_fused_fp32():
    """The CPU bf16 path of models.attention (explicit matmuls) against the fused kernel in fp32,
    output and input gradients, at bf16's precision (8 bits of mantissa: ~0.4% per rounding)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 3, 65, 64) for _ in range(3))
    g = torch.randn(4, 3, 65, 64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in)
    ref.backward(g)
    bf_in = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = models.attention(*bf_in)
    out.backward(g.bfloat16())
    assert out.dtype == torch.bfloat16
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert rel(out, ref) < 1e-2
    for a, b in zip(bf_in, ref_in):
        assert rel(a.grad, b.grad) < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mae", "dsmae"])
def test_compiled_bf16_step_computes_the_fp32_eager_loss(method, monkeypatch):
    """torch.compile (inductor) with bf16 autocast, on a fixed batch, against fp32 eager: the loss
    within 1e-2 relative (bf16), with the same masks (inductor draws uniform numbers as eager does
    with fallback_random). The DS-MAE noise is a fixed tensor: inductor's bf16 graph draws the
    Gaussian noise differently from eager even with fallback_random (torch 2.14)."""
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    model = bench.build(method, bench.CONFIGS["tiny"], torch.device("cpu"))
    x = torch.randn(8, 3, 16, 16)
    if method == "dsmae":
        eps = torch.randn_like(x)
        monkeypatch.setattr(model, "add_noise", lambda imgs, idx: torch.where(
            models.patch_mask_to_pixels(idx, 4, 4, 8, imgs.device).bool(), imgs + eps, imgs))
    torch.manual_seed(1)
    ref, ref_parts = model(x)
    compiled = torch.compile(model)
    torch.manual_seed(1)
    with inductor_config.patch(fallback_random=True), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = compiled(x)
        loss.backward()                                         # the compiled backward runs too
    assert torch.equal(parts["idx"], ref_parts["idx"]) and torch.equal(parts["input"], ref_parts["input"])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
