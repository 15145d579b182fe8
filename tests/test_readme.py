"""The README runs as a test: every command line of its ```sh blocks, in order, as a newcomer would type them.

What stands in for what this machine lacks, and nothing more:
- hub ids (facebook/dinov2-small, google/vit-base-patch16-224, facebook/sam-vit-base) resolve from a Hugging Face
  cache (HF_HOME) that holds tiny random-weight models in the hub's own layout: the very loading path of a user whose
  cache has the real weights;
- HOME is a temporary folder whose ~/Photos holds 48 sample photos; query.jpg, photo.jpg, mask.png and
  ./dinov2-base-dir (a tiny model) lie in the working directory; IDX means ~/photos.idx, /shared/photos ~/Photos;
- port 8000 becomes a free port; `make` writes its demo index and models under the temporary folder.
The only commands not run are those in EXEMPT (each with its reason): they need a network, a cluster, or are this
suite. A command whose README comment says it is for a far larger collection must fail in one clear line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE, free_port, sample_photos
from PIL import Image

README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent

EXEMPT = {  # start of a command -> why it is not run here
    "make test": "it is this suite",
    "hf download": "needs the network (the Hugging Face hub)",
    "pip install": "needs the network; `make setup` installed these packages already",
    "dinosearch index /shared/photos --index IDX --ray auto": "needs a running Ray cluster",
    "dinosearch index ~/Photos --index ~/milvus.idx --store milvus://": "needs a Milvus server",
    "dinosearch serve ~/milvus.idx": "needs a Milvus server",
}
TOO_SMALL = {  # commands for collections far larger than the sample: a one-line error, not a traceback
    "--kind IVF65536,PQ48": "IVF65536",
}
ALSO_FINE = {  # curl commands whose job may be over before they run: the clear answer they then get
    "http://127.0.0.1:8000/index/jobs/1": (409, "has already ended"),
}
HUB = {  # hub id -> how its tiny stand-in is made
    "facebook/dinov2-small": "dinov2",
    "google/vit-base-patch16-224": "vit",
    "facebook/sam-vit-base": "sam",
}


def strip_comment(line: str) -> tuple[str, str]:
    """(the command, its shell comment): a # at a word start, outside quotes, begins the comment."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:].strip()
    return line.rstrip(), ""


def readme_commands(text: str) -> list[tuple[int, str, str]]:
    """(line number, command, its comment) of every command in the README's sh blocks, continuations joined."""
    out, block, pending, start = [], False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() == "```sh"
            continue
        if not block or not line.strip():
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        cmd, comment = strip_comment(full)
        if cmd:
            out.append((start, " ".join(cmd.split()), comment))
    return out


def expand_options(cmd: str) -> list[str]:
    """`info IDX [--failed] [--json]` -> the command without the bracketed options, and with all of them."""
    if "[" not in cmd:
        return [cmd]
    return [re.sub(r"\s*\[[^\]]*\]", "", cmd), re.sub(r"\[([^\]]*)\]", r"\1", cmd)]


def substitute(cmd: str, port: int, tiny_dir: Path) -> str:
    cmd = re.sub(r"(?<![\w/.-])IDX(?![\w.])", "~/photos.idx", cmd)
    cmd = cmd.replace("/shared/photos", "~/Photos").replace("--classifier ID_OR_DIR", "--classifier google/vit-base-patch16-224")
    cmd = cmd.replace("--sam-model ID_OR_DIR", "--sam-model facebook/sam-vit-base")
    cmd = cmd.replace("MODEL=models/dinov2-small", f"MODEL={tiny_dir}")  # what `hf download` (exempt) would have put there
    cmd = cmd.replace("8000", str(port))
    if cmd.startswith("dinosearch serve") and "--port" not in cmd:
        cmd += f" --port {port}"
    return cmd


def save_hub_cache(hf_home: Path) -> None:
    """Tiny random-weight models under the hub ids the README names, in the hub cache's layout (refs/main -> snapshot)."""
    from indexer.testing import save_random_classifier, save_random_model, save_random_sam

    for repo, kind in HUB.items():
        base = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
        rev = "0" * 40
        snap = base / "snapshots" / rev
        if kind == "dinov2":
            save_random_model(snap, "tiny")
        elif kind == "vit":
            save_random_classifier(snap, ["golden retriever", "tabby cat", "airliner", "starfish"])
        else:
            save_random_sam(snap, "tiny")
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / "main").write_text(rev)


class Shell:
    """Runs README lines like a person at a terminal: one environment, exports kept, servers left running."""

    def __init__(self, env: dict, cwd: Path, port: int):
        self.env, self.cwd, self.port = env, cwd, port
        self.server: subprocess.Popen | None = None
        self.log: list[str] = []

    def run(self, cmd: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        t = time.perf_counter()
        p = subprocess.run(["bash", "-c", cmd], cwd=cwd or self.cwd, env=env or self.env, capture_output=True, text=True,
                           timeout=timeout)
        self.log.append(f"{time.perf_counter() - t:6.1f} s  {cmd}")
        return p

    def export(self, cmd: str) -> None:
        name = cmd.split()[1].split("=")[0]
        p = self.run(f'{cmd}; printf %s "${name}"')
        assert p.returncode == 0 and p.stdout, p.stderr
        self.env[name] = p.stdout

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url(path), timeout=30) as r:
            return json.loads(r.read())

    def serve(self, cmd: str) -> None:
        self.stop()
        self.server = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=self.cwd, env=self.env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while True:
            if self.server.poll() is not None:
                raise AssertionError(f"`{cmd}` exited: {self.server.communicate()[1]}")
            try:
                assert self.get("/health")
                return
            except OSError:
                assert time.time() < deadline, f"`{cmd}` did not answer /health in 120 s"
                time.sleep(0.3)

    def idle(self) -> None:
        """Wait until the server's index jobs are done, as a person reading the progress would."""
        deadline = time.time() + 300
        while any(j["state"] in ("queued", "running") for j in self.get("/index/jobs")):
            assert time.time() < deadline, "an index job did not finish"
            time.sleep(0.3)

    def watch(self, cmd: str) -> None:
        """`index --watch` never returns by itself: run it until its first run is reported, then Ctrl-C it as a person
        would; it must stop cleanly after that commit."""
        import signal
        import threading

        p = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
        reader.start()
        deadline = time.time() + 300
        try:
            while not any(" indexed" in line for line in lines):
                assert p.poll() is None, f"`{cmd}` exited: {p.stderr.read()}"
                assert time.time() < deadline, f"`{cmd}` did not report its first run in 300 s"
                time.sleep(0.2)
            p.send_signal(signal.SIGINT)
            p.wait(timeout=120)
            err = p.stderr.read()
        finally:
            p.kill()
        reader.join(10)
        assert p.returncode == 0 and lines[-1].strip() == "stopped watching", f"`{cmd}`: {lines}\n{err}"
        assert "Traceback" not in err, err

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(30)
            self.server = None


@pytest.fixture
def newcomer(tmp_path):
    """A home with ~/Photos, a working directory with the README's files, a hub cache of tiny models."""
    home, work, hf = tmp_path / "home", tmp_path / "work", tmp_path / "hf"
    (home / "Photos").mkdir(parents=True)
    for p in sample_photos(2):
        shutil.copy(p, home / "Photos" / p.name)
    work.mkdir()
    query = SAMPLE / "airplanes__image_0001.jpg"
    shutil.copy(query, work / "query.jpg")
    shutil.copy(SAMPLE / "starfish__image_0001.jpg" if (SAMPLE / "starfish__image_0001.jpg").exists() else query, work / "photo.jpg")
    w, h = Image.open(query).size
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    Image.fromarray(mask).save(work / "mask.png")
    save_hub_cache(hf)
    from indexer.testing import save_random_model

    save_random_model(work / "dinov2-base-dir", "tiny", seed=3)
    tiny = save_random_model(tmp_path / "models" / "dinov2-small", "tiny")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DINOSEARCH_TOKEN"))}
    env.update(HOME=str(home), HF_HOME=str(hf), HF_HUB_OFFLINE="1", PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
               DEMO_INDEX=str(tmp_path / "demo-index"), MODELS=str(tmp_path / "models"), PYTHONUNBUFFERED="1")
    return Shell(env, work, free_port()), tiny


def test_every_readme_command_runs(newcomer):
    shell, tiny = newcomer
    commands = readme_commands(README.read_text())
    assert len(commands) > 40  # the parser found the README's blocks
    ran, skipped = 0, []
    try:
        for line, written, _comment in commands:
            if any(written.startswith(e) for e in EXEMPT):
                skipped.append(written)
                continue
            for cmd in expand_options(substitute(written, shell.port, tiny)):
                where = f"README.md:{line}: {written}\n  ran: {cmd}"
                if cmd.startswith("export "):
                    shell.export(cmd)
                elif cmd.startswith("dinosearch serve"):
                    shell.serve(cmd)
                elif cmd.startswith("dinosearch index") and "--watch" in cmd:
                    shell.watch(cmd)
                elif cmd.startswith("curl "):
                    shell.idle()
                    p = shell.run("curl -sS -w '\\n%{http_code}' " + cmd[len("curl "):], timeout=120)
                    body, _, code = p.stdout.rpartition("\n")
                    fine = next((v for k, v in ALSO_FINE.items() if written.endswith(k)), None)
                    if fine and code == str(fine[0]):
                        assert fine[1] in json.loads(body)["detail"], f"{where}\n{body}"
                    else:
                        assert p.returncode == 0 and code.isdigit() and int(code) < 400, f"{where}\n{p.stdout}\n{p.stderr}"
                        json.loads(body)
                elif any(k in cmd for k in TOO_SMALL):
                    p = shell.run(cmd)
                    lines = p.stderr.strip().splitlines()
                    want = next(v for k, v in TOO_SMALL.items() if k in cmd)
                    assert p.returncode == 2 and len(lines) == 1 and want in lines[0], f"{where}\n{p.stderr}"
                else:
                    p = shell.run(cmd, cwd=REPO if cmd.startswith("make ") else None)
                    assert p.returncode == 0, f"{where}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
                    assert "Traceback" not in p.stderr, f"{where}\n{p.stderr}"
                    if "--json" in cmd:
                        json.loads(p.stdout)
                ran += 1
    finally:
        shell.stop()
        print("\n".join(sorted(shell.log, reverse=True)[:12]))  # the slowest, shown with -s
    assert ran > 40
    assert sorted({next(e for e in EXEMPT if s.startswith(e)) for s in skipped}) == sorted(EXEMPT)  # no stale exemption
    # what the commands did, seen from outside: the index holds the photos, the token job and the delete took effect
    info = json.loads(shell.run("dinosearch info ~/photos.idx --json").stdout)
    # (a random-weight SAM keeps no mask at the default thresholds, so objects may be 0: the README's --objects
    # commands are checked to run and record their segmenter, the object search itself by tests/test_objects.py)
    # photo 42, deleted over HTTP, is indexed again by the later runs on ~/Photos (its file is still there)
    assert info["photos_indexed"] == 48 and info["segmenter"] == "facebook/sam-vit-base" and info["classifier"] == "google/vit-base-patch16-224"
    assert (shell.cwd / "parts.png").is_file() and (shell.cwd / "parts" / "parts.json").is_file()
    assert len(list((shell.cwd / "out").glob("*.jpg"))) >= 10


def test_readme_offline_line_is_what_make_demo_prints(tmp_path):
    """With no cached weights and no hub, `make demo` stops with exactly the line the README shows."""
    text = README.read_text()
    shown = re.search(r"```\n(dinosearch: error: cannot load model 'facebook/dinov2-small'.*)\n```", text).group(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "empty-cache"), HF_HUB_OFFLINE="1", DEMO_INDEX=str(tmp_path / "demo-index"))
    p = subprocess.run(["make", "demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and shown in p.stderr.splitlines()


def test_comment_and_continuation_parsing():
    text = "x\n```sh\na b  # c\ncurl -d '{\"a\": \"#b\"}' \\\n     http://h/x   # y\n\n```\n```\nnot: a command\n```\n"
    assert readme_commands(text) == [(3, "a b", "# c"), (4, "curl -d '{\"a\": \"#b\"}' http://h/x", "# y")]
    assert expand_options("dinosearch info I [--failed] [--json]") == ["dinosearch info I", "dinosearch info I --failed --json"]
