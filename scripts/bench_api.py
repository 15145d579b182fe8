"""HTTP overhead: the API under a bounded load on loopback vs the in-process Engine call.

    python scripts/bench_api.py [--photos 10000] [--requests 400] [--clients 4]

A 10k-photo index whose vectors come from a tiny random-weight DINOv2 (hidden 32)
run on noise photos; `dinosearch serve` in a subprocess; the load from a second
process (threads with keep-alive connections, a bounded number of requests and a
time limit). Search by id (global) and by upload (global: the server decodes and
embeds the photo). The same calls are timed in-process through search.Engine in
this run, and the ratio is the cost of HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOAD = r'''
import http.client, json, sys, threading, time, uuid
port, path, n, clients, body_file, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], float(sys.argv[6])
body = open(body_file, "rb").read() if body_file != "-" else None
lat, errors, lock = [], [0], threading.Lock()
count = iter(range(n))
deadline = time.time() + limit
def worker():
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
    boundary = uuid.uuid4().hex
    while time.time() < deadline:
        with lock:
            if next(count, None) is None:
                return
        t = time.perf_counter()
        try:
            if body is None:
                c.request("GET", path)
            else:
                data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
                        f"Content-Type: image/jpeg\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
                c.request("POST", path, body=data, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            r = c.getresponse(); r.read()
            ok = r.status == 200
        except Exception:
            ok = False
            c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
        dt = time.perf_counter() - t
        with lock:
            lat.append(dt)
            errors[0] += not ok
t0 = time.perf_counter()
ts = [threading.Thread(target=worker) for _ in range(clients)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"lat": lat, "errors": errors[0], "seconds": time.perf_counter() - t0}))
'''


def build_index(idx: Path, photos: int) -> Path:
    from indexer.embedder import Embedder, EmbedderConfig
    from indexer.manifest import Manifest
    from indexer.testing import save_random_model
    from indexer.writer import Writer

    model = save_random_model(idx.parent / "tiny-model", "tiny")
    e = Embedder(EmbedderConfig(model=str(model), device="cpu"))
    rng = np.random.default_rng(0)
    with Writer(idx, Manifest.for_embedder(e)) as w:
        for s in range(0, photos, 250):
            n = min(250, photos - s)
            px = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
            out = e.embed(px)
            rows = [(w.allocate_id(), f"/bench/noise{s + i:06d}.jpg", 0, 0, None, 224, 224) for i in range(n)]
            w.add(rows, out.cls, out.patches)
        w.commit()
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(server: subprocess.Popen, port: int, timeout: float = 60) -> None:
    """Return once the server subprocess accepts connections on the port; exit with its stderr if it dies."""
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.2)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=400, help="requests per route")
    ap.add_argument("--clients", type=int, default=4, help="concurrent connections of the load process")
    ap.add_argument("--seconds", type=float, default=60, help="time limit per route")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-api")
    a = ap.parse_args()

    import shutil

    from PIL import Image

    from search import Engine

    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    idx = a.out / "idx"
    t = time.perf_counter()
    model = build_index(idx, a.photos)
    print(f"index: {a.photos} photos (tiny random model on noise photos) in {time.perf_counter() - t:.0f}s", flush=True)
    query = a.out / "query.jpg"
    src = sorted((REPO / "data" / "caltech101-sample" / "images").glob("*.jpg"))[0]
    Image.open(src).convert("RGB").resize((640, 480)).save(query, quality=90)
    body = query.read_bytes()

    engine = Engine(idx)
    inproc = {}
    for name, q in (("by id", 17), ("by upload", body)):
        engine.similar(q, 10)
        ts = []
        for _ in range(100):
            t = time.perf_counter()
            engine.similar(q, 10)
            ts.append(time.perf_counter() - t)
        inproc[name] = ts
    del engine

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    server = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", str(idx), "--port", str(port), "--model", str(model),
                               "--device", "cpu"], cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        wait_for_server(server, port)
        print(f"server: dinosearch serve on 127.0.0.1:{port}; load: {a.clients} keep-alive clients in a second process, "
              f"{a.requests} requests per route", flush=True)
        print(f"{'route':<12} {'HTTP p50':>9} {'p99':>8} {'req/s':>7} {'errors':>6} {'in-process p50':>15} {'p99':>7} {'HTTP/in-process p50':>20}")
        for name, path, payload in (("by id", "/photos/17/similar?k=10", "-"), ("by upload", "/search?k=10", str(query))):
            p = subprocess.run([sys.executable, "-c", LOAD, str(port), path, str(a.requests), str(a.clients), payload, str(a.seconds)],
                               capture_output=True, text=True, timeout=a.seconds + 60)
            r = json.loads(p.stdout)
            ip = inproc[name]
            print(f"{name:<12} {pct(r['lat'], 50):>8.1f}ms {pct(r['lat'], 99):>6.1f}ms {len(r['lat']) / r['seconds']:>7.0f} "
                  f"{r['errors']:>6} {pct(ip, 50):>13.2f}ms {pct(ip, 99):>5.1f}ms {pct(r['lat'], 50) / pct(ip, 50):>19.1f}x", flush=True)
    finally:
        server.terminate()
        server.wait(10)
    print("note: with 4 concurrent clients on 2 cores, HTTP latency includes queueing behind the other clients' requests;"
          " req/s is the figure to compare with 1000 / in-process p50.")


if __name__ == "__main__":
    main()
