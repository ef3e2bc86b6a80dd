"""Preempted, nothing lost (issue 28). Every training stage, signalled at a random step, finishes that step, writes
its checkpoint there, says one line and exits with 128 + the signal; the same command again ends bit-identical to a
run that was never stopped. pretrain.py is signalled from outside as a scheduler would (a real SIGTERM to a running
process, and under torchrun to one rank only); the other stages in this process, the signal sent by os.kill from
inside their optimiser step, at a step drawn at random."""
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import curriculum
import finetune
import linprobe
import pretrain
import segment
from conftest import ROOT, TINY_PRETRAIN, separable_npz

LINE = "stopped after step {} and saved {}; run the same command again to resume (exit status {})"


def same(a, b, path=""):
    """Every tensor in two checkpoints equal, bit for bit (nested dicts and lists walked)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}/{i}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    elif path.split("/")[-1] not in ("args", "seconds", "resume", "output_dir"):
        assert a == b or (a != a and b != b), (path, a, b)


def signal_at(monkeypatch, k, signum=signal.SIGTERM):
    """Send signum to this process from inside the k-th optimiser step (zero_grad is called once per step)."""
    calls, real = [0], torch.optim.Optimizer.zero_grad

    def zero_grad(self, *a, **kw):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signum)
        return real(self, *a, **kw)
    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", zero_grad)
    return calls


def interrupted_then_resumed(run, monkeypatch, capsys, k, signum=signal.SIGTERM):
    """run() stopped by a signal in step k: exit status 128 + signum, one line naming what was saved; then run()
    again to the end. Returns the saved file and the step the line named."""
    calls = signal_at(monkeypatch, k, signum)
    with pytest.raises(SystemExit) as stop:
        run()
    lines = [line for line in capsys.readouterr().out.splitlines() if "stopped after" in line]
    assert stop.value.code == 128 + signum and len(lines) == 1, (stop.value.code, lines)
    assert lines[0].startswith(signal.Signals(signum).name + ": ") and f"(exit status {128 + signum})" in lines[0]
    monkeypatch.undo()
    run()
    return lines[0], calls[0]


def test_pretrain_sigterm_from_outside_then_rerun_is_bit_identical(tmp_path):
    args = TINY_PRETRAIN + ["--max-steps", "300", "--knn-samples", "20", "--save-every", "60", "--log-every", "5"]
    cmd = lambda out: [sys.executable, os.path.join(ROOT, "pretrain.py"), *args, "--output-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")      # lines as they are printed
    subprocess.run(cmd(tmp_path / "ref"), check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    proc = subprocess.Popen(cmd(tmp_path / "b"), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    for line in proc.stdout:                                  # the loop starts after the k-NN at initialisation
        if line.startswith("k-NN at initialisation"):
            break
    time.sleep(random.uniform(0.2, 1.5))
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143 and time.time() - t < 30, (proc.returncode, out[-500:])
    said = [line for line in out.splitlines() if "stopped after step" in line]
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert said == ["SIGTERM: " + LINE.format(ckpt["step"], tmp_path / "b" / "ckpt.pt", 143)], out[-500:]
    assert 0 < ckpt["step"] < 300                               # saved at the step it was in, not an epoch's end
    subprocess.run(cmd(tmp_path / "b"), check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    a, b = torch.load(tmp_path / "ref" / "ckpt.pt", weights_only=True), torch.load(tmp_path / "b" / "ckpt.pt",
                                                                                     weights_only=True)
    assert a["step"] == b["step"] == 300
    same(a["model"], b["model"])
    same(a["opt"], b["opt"])


def rank_pids(launcher):
    """{rank: pid} of the worker processes torchrun started (read from their environment)."""
    found = {}
    for pid in os.listdir("/proc"):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher:
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                found[int(rank[0][5:])] = int(pid)
    return found


def test_torchrun_signal_to_one_rank_stops_both_at_one_step_then_resumes_bit_identical(tmp_path):
    args = TINY_PRETRAIN + ["--max-steps", "200", "--knn-samples", "20", "--save-every", "60", "--log-every", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")

    def torchrun(out, **kw):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master-port", str(port), os.path.join(ROOT, "pretrain.py"), *args, "--output-dir",
                                 str(out)], env=env, cwd=ROOT, text=True, **kw)
    ref = torchrun(tmp_path / "ref", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = torchrun(tmp_path / "b", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if line.startswith("k-NN at initialisation"):
            break
    time.sleep(random.uniform(0.2, 1.0))
    ranks = rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGTERM)                         # the scheduler reached one rank only
    out, _ = proc.communicate(timeout=120)                    # and none is left waiting in a collective
    assert ref.wait(timeout=300) == 0 and proc.returncode != 0, out[-2000:]
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    said = [line for line in out.splitlines() if "stopped after step" in line]
    assert said == ["SIGTERM: " + LINE.format(ckpt["step"], tmp_path / "b" / "ckpt.pt", 143)], out[-2000:]
    assert 0 < ckpt["step"] < 200
    assert torchrun(tmp_path / "b", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=300) == 0
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("ref", "b"))
    assert a["step"] == b["step"] == 200
    same(a["model"], b["model"])


def test_a_signal_landing_while_the_ranks_compare_answers_is_kept_for_the_next_step(monkeypatch):
    """The race the torchrun test above caught one run in two: the rank waits in the all-reduce of its answer (0),
    the signal lands there, and writing back the ranks' answer must not erase it."""
    import models

    def all_reduce(flag, op, group):                          # the other rank answered 0; the signal arrives now
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(models.dist, "all_reduce", all_reduce)
    with models.Preemption() as stop:
        stop.group = "two ranks"
        assert [stop(), stop()] == [False, True] and stop.signum == signal.SIGTERM


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_finetune_each_signal(tmp_path, monkeypatch, capsys, signum):
    path = separable_npz(tmp_path / "sep.npz", n_per_class=24)
    argv = lambda out: ["--dataset", "npz", "--data-dir", path, "--model", "vit_nano", "--img-size", "16", "--patch-size",
                        "4", "--batch-size", "8", "--epochs", "3", "--warmup-epochs", "1", "--device", "cpu",
                        "--save-every", "60", "--output-dir", str(out)]
    finetune.main(finetune.get_args(argv(tmp_path / "ref")))
    k = random.randint(2, 25)                                  # 10 steps an epoch: mid-epoch, or at its end
    line, _ = interrupted_then_resumed(lambda: finetune.main(finetune.get_args(argv(tmp_path / "b"))), monkeypatch,
                                       capsys, k, signum)
    assert str(tmp_path / "b" / "ckpt.pt") in line
    for f in ("ckpt.pt", "best.pt"):
        same(*(torch.load(tmp_path / d / f, weights_only=True) for d in ("ref", "b")))


def test_linprobe(tmp_path, monkeypatch, capsys):
    pre = tmp_path / "pre"
    pretrain.main(pretrain.get_args(TINY_PRETRAIN + ["--max-steps", "2", "--knn-samples", "20", "--output-dir",
                                                     str(pre)]))
    argv = lambda out: ["--checkpoint", str(pre / "ckpt.pt"), "--epochs", "5", "--batch-size", "256", "--device", "cpu",
                        "--augment", "--output-dir", str(out)]
    ref = linprobe.main(linprobe.get_args(argv(tmp_path / "ref")))
    line, _ = interrupted_then_resumed(lambda: linprobe.main(linprobe.get_args(argv(tmp_path / "b"))), monkeypatch,
                                       capsys, random.randint(2, 90))
    assert ".running.pt" in line and not [f for f in os.listdir(tmp_path / "b") if f.endswith(".running.pt")]
    a, b = (torch.load(tmp_path / d / "probe.pt", weights_only=True) for d in ("ref", "b"))
    same(a["probe"], b["probe"])
    assert b["results"]["linear_top1"] == ref["linear_top1"]


def test_linprobe_with_another_seed_starts_its_own_probe(tmp_path, monkeypatch, capsys):
    """A stopped probe is resumed only by the same command: another --seed (its own shuffles and crops) starts
    afresh and leaves the stopped one to be resumed later."""
    pre = tmp_path / "pre"
    pretrain.main(pretrain.get_args(TINY_PRETRAIN + ["--max-steps", "2", "--knn-samples", "20", "--output-dir",
                                                     str(pre)]))
    argv = lambda seed: ["--checkpoint", str(pre / "ckpt.pt"), "--epochs", "3", "--batch-size", "256", "--device",
                         "cpu", "--augment", "--seed", str(seed), "--output-dir", str(tmp_path / "b")]
    signal_at(monkeypatch, 5)
    with pytest.raises(SystemExit):
        linprobe.main(linprobe.get_args(argv(0)))
    monkeypatch.undo()
    stopped = [f for f in os.listdir(tmp_path / "b") if f.endswith(".running.pt")]
    capsys.readouterr()
    linprobe.main(linprobe.get_args(argv(1)))
    assert "resumed from" not in capsys.readouterr().out
    assert [f for f in os.listdir(tmp_path / "b") if f.endswith(".running.pt")] == stopped
    linprobe.main(linprobe.get_args(argv(0)))
    assert f"resumed from {tmp_path / 'b' / stopped[0]} at step 5" in capsys.readouterr().out


def test_segment(tmp_path, monkeypatch, capsys):
    from test_segment import radiograph
    from PIL import Image
    for sub in ("png", "masks"):
        os.makedirs(tmp_path / sub)
    for k in range(12):
        img, mask = radiograph(30, 40, k)
        Image.fromarray(img).save(tmp_path / "png" / f"im{k:02d}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / f"im{k:02d}.png")
    argv = lambda out: ["train", "--data-dir", str(tmp_path / "png"), "--masks", str(tmp_path / "masks"),
                        "--img-size", "32", "--width", "4", "--depth", "2", "--batch-size", "2", "--epochs", "3",
                        "--val-count", "2", "--device", "cpu", "--precision", "fp32", "--opacity", "0.5",
                        "--output-dir", str(out)]
    segment.main(segment.get_args(argv(tmp_path / "ref")))
    interrupted_then_resumed(lambda: segment.main(segment.get_args(argv(tmp_path / "b"))), monkeypatch, capsys,
                             random.randint(2, 14))
    for f in ("ckpt.pt", "best.pt"):
        a, b = (torch.load(tmp_path / d / f, weights_only=True) for d in ("ref", "b"))
        same(a["model"], b["model"])
        same(a["opt"], b["opt"])


def test_curriculum_in_a_trial_and_in_the_continuation(tmp_path, monkeypatch, capsys):
    path = separable_npz(tmp_path / "sep.npz", n_per_class=24)
    argv = lambda out: curriculum.get_args([
        "--dataset", "npz", "--data-dir", path, "--output-dir", str(out), "--device", "cpu", "--backbone", "vit_nano",
        "--img-size", "16", "--patch-size", "4", "--stages", "rotation", "--epochs", "3", "--search-epochs", "1",
        "--cls-epochs", "2", "--cls-search-epochs", "1", "--batch-size", "16", "--cls-batch-size", "16",
        "--lr-grid", "0.01,0.05", "--val-fraction", "0.25"])
    curriculum.main(argv(tmp_path / "ref"))
    # 4 steps an epoch: the second trial of rotation (steps 5-8), then its continuation (steps 9-16)
    for k in (random.randint(5, 8), random.randint(10, 16)):
        out = tmp_path / f"b{k}"
        line, _ = interrupted_then_resumed(lambda: curriculum.main(argv(out)), monkeypatch, capsys, k)
        assert "running.pt" in line or "trial_lr" in line or "final.pt" in line, line
        for stage in ("rotation", "rotation-classify"):
            a, b = (torch.load(d / stage / "final.pt", weights_only=True) for d in (tmp_path / "ref", out))
            same(a["model"], b["model"])
            assert a["score"] == b["score"] and a["trials"] == b["trials"]
