"""Helpers several test files share: tiny command lines, a dataset any classifier learns, and an HTTP server on
127.0.0.1 (the download tests never touch the internet)."""
import http.server
import os
import sys
import threading

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]     # the scripts, models.py / data.py and the tools, from anywhere

# the smallest pretrain.py run that goes through every branch: 2 blocks of width 32, 16 px, 4x4 patches
TINY_PRETRAIN = ["--dataset", "synthetic", "--model", "vit_nano", "--img-size", "16", "--patch-size", "4",
                 "--batch-size", "8", "--decoder-dim", "32", "--decoder-depth", "1", "--device", "cpu",
                 "--no-compile", "--knn-samples", "100", "--epochs", "2", "--warmup-epochs", "0.01", "--blr", "0.03"]


def separable_npz(path, n_per_class=40, size=16, seed=0, channels=3, noise=25):
    """Four classes that differ in colour (grey level with one channel), written as this project's
    npz (x (N, H, W, C) uint8, y, class_names): any working classifier gets them all right."""
    rng = np.random.default_rng(seed)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]], dtype=np.int16)
    if channels == 1:
        colours = np.array([[20], [90], [160], [235]], dtype=np.int16)
    y = np.repeat(np.arange(4), n_per_class)
    x = colours[y][:, None, None, :] + rng.integers(-noise, noise + 1, (len(y), size, size, channels))
    np.savez(path, x=x.clip(0, 255).astype(np.uint8), y=y, class_names=np.array(["r", "g", "b", "y"]))
    return str(path)


# an HTTP server on 127.0.0.1: the downloads' tests (data.py's, tools/lung_eval.py's) never touch the internet

class Handler(http.server.SimpleHTTPRequestHandler):
    """Files under the served folder; /drop/<path> sends the full length in its header, then half the bytes."""

    def do_GET(self):
        if self.path.startswith("/drop/"):
            body = open(os.path.join(self.directory, self.path[6:]), "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.connection.close()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """(base URL, served folder) of an HTTP server on 127.0.0.1 for this test."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Handler(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
