"""Bounded load on loopback while an index job adds photos: errors must be 0, new photos must appear.

    python scripts/load_test.py [--clients 32] [--seconds 60]

The server (`dinosearch serve`, architecture-exact dinov2-small with random
weights, so the job costs what it would) starts on an index of
48 sample photos; a job then adds the other 192 sample photos while 32 clients in
a second process search by id for 60 s (a bounded number of requests). Prints
requests/s, p50/p99 latency and errors, then checks that searches see the new
photos once the job has committed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_api import LOAD, free_port, wait_for_server  # noqa: E402

TOKEN = "load-test-token-0123456789abcdef"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--requests", type=int, default=100_000, help="upper bound on requests")
    ap.add_argument("--arch", default="small", help="random-weight model size: small (real dinov2-small cost) or tiny")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "load-test")
    a = ap.parse_args()

    from indexer.testing import save_random_model

    shutil.rmtree(a.out, ignore_errors=True)
    first, later = a.out / "first", a.out / "later"
    first.mkdir(parents=True)
    later.mkdir()
    photos = sorted((REPO / "data" / "caltech101-sample" / "images").glob("*.jpg"))
    for i, p in enumerate(photos):
        shutil.copy(p, (first if i % 5 == 0 else later) / p.name)
    model = save_random_model(a.out / a.arch, a.arch)
    idx = a.out / "idx"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DINOSEARCH_TOKEN": TOKEN}
    subprocess.run([sys.executable, "-m", "api.cli", "index", str(first), "--index", str(idx), "--model", str(model), "-q"],
                   check=True, cwd=REPO, env=env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", str(idx), "--port", str(port), "--device", "cpu"],
                              cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        wait_for_server(server, port)
        load = subprocess.Popen([sys.executable, "-c", LOAD, str(port), "/photos/1/similar?k=10", str(a.requests), str(a.clients),
                                 "-", str(a.seconds)], stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        req = urllib.request.Request(f"{base}/index/jobs", data=json.dumps({"folder": str(later)}).encode(), method="POST",
                                     headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
        job = json.load(urllib.request.urlopen(req))
        t_job = time.time()
        while (j := json.load(urllib.request.urlopen(f"{base}/index/jobs/{job['id']}")))["state"] not in ("done", "failed"):
            time.sleep(0.5)
        job_seconds = time.time() - t_job
        r = json.loads(load.communicate(timeout=a.seconds + 120)[0])
        lat = np.asarray(r["lat"]) * 1000
        stats = json.load(urllib.request.urlopen(f"{base}/stats"))
        q = later / sorted(os.listdir(later))[7]
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n\r\n").encode() + \
            q.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        hit = json.load(urllib.request.urlopen(urllib.request.Request(
            f"{base}/search?k=1", data=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})))
        found = hit["results"][0]["path"] == q.name
        print(f"{a.clients} clients x {r['seconds']:.0f} s on /photos/1/similar while a job indexed {j['indexed']} photos "
              f"in {job_seconds:.0f} s ({j['state']}):")
        print(f"  {len(lat)} requests, {len(lat) / r['seconds']:.0f} req/s, p50 {np.percentile(lat, 50):.1f} ms, "
              f"p99 {np.percentile(lat, 99):.1f} ms, errors {r['errors']}")
        print(f"  after the job: {stats['photos_indexed']} photos indexed; a new photo is found by upload: {found}")
        ok = r["errors"] == 0 and j["state"] == "done" and found and stats["photos_indexed"] == len(photos)
        print("PASS" if ok else "FAIL")
        sys.exit(0 if ok else 1)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
