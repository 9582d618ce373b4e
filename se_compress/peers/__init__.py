"""Peer tools beside ours: llm-compressor and GPTQModel, each in its own virtual environment, on exactly our
calibration tokens; their outputs are then evaluated by our evaluator (compare), like our own checkpoints.

Why venvs: llm-compressor 0.14.0.1 pins transformers 5.17 and compressed-tensors 0.19, GPTQModel 7.6.0 brings its
own kernels and numpy; our pins (transformers 5.23, compressed-tensors 0.20) must never move. Each venv sees the
system torch (--system-site-packages, so no second torch is downloaded) and installs the peer's pinned version on
top; the runner scripts beside this file are run by the venv's python and never import se_compress.

A run: our calibration token ids ([N, L], the quantize stage's calib/samples/seqlen/seed) saved to a file, the
runner started as a child process, its wall time and peak RSS measured by this process (os.wait4's rusage of the
child), its checkpoint written under a hidden temporary name and renamed into place last with `peer.json` (what
ran, versions, seconds, peak RSS) beside it. The run folder's name is a hash of the inputs (tool, bits, group size,
SE recipe, token ids, model fingerprint): the same inputs reuse the finished run.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SECompressError

REPO = Path(__file__).resolve().parent.parent.parent
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Peer:
    name: str
    package: str                      # pip requirement, pinned to what was measured here
    script: str                       # runner beside this file
    env: dict = field(default_factory=dict)

    @property
    def venv(self) -> Path:
        return REPO / "build" / f"{self.name}-venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def installed(self) -> Path:
        return self.venv / "se_compress-installed"


PEERS = {
    "llmcompressor": Peer("llmcompressor", "llmcompressor==0.14.0.1", "llmcompressor_run.py"),
    "gptqmodel": Peer("gptqmodel", "gptqmodel==7.6.0", "gptqmodel_run.py", {"GPTQMODEL_CPU_WORKERS": "2"}),
}
SETUP_HINT = "run `make peers` (or `se-compress compare --setup-peers`) to create it"


def peer(name: str) -> Peer:
    if name not in PEERS:
        raise SECompressError(f"unknown peer '{name}': use one of {', '.join(PEERS)}")
    return PEERS[name]


def check_installed(name: str) -> Peer:
    """The peer, or one line saying how to set it up."""
    p = peer(name)
    if not p.installed.exists():
        raise SECompressError(f"peer '{name}' is not set up ({p.package} lives in its own venv {p.venv}): {SETUP_HINT}")
    return p


def check_peers(*recipes) -> None:
    """Every peer stage of `recipes` can run (its venv is set up), or one line saying how to set it up."""
    for recipe in recipes:
        for stage in recipe.stages:
            if stage.kind == "peer":
                check_installed(stage.options.tool)


def setup_peer(name: str, echo=print) -> Path:
    """Create the peer's venv and install its pinned package (once); the venv's python. The marker file is written
    last, so an interrupted setup is redone, never taken for a finished one."""
    p = peer(name)
    if p.installed.exists():
        return p.python
    echo(f"[peers] creating {p.venv} and installing {p.package} (a few minutes)")
    shutil.rmtree(p.venv, ignore_errors=True)
    for cmd in ([sys.executable, "-m", "venv", "--system-site-packages", str(p.venv)],
                [str(p.python), "-m", "pip", "install", "-q", p.package]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **p.env})
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SECompressError(f"setting up peer '{name}' failed at `{' '.join(cmd[-3:])}`: {last[:300]}")
    p.installed.write_text(p.package + "\n")
    return p.python


def calibration_ids(model_path: Path, calib: str, samples: int, seqlen: int, seed: int):
    """Exactly the token ids our quantize stage calibrates on ([samples, seqlen] int64)."""
    from ..data.calibration import build_calibration
    from ..detect import load_tokenizer

    return build_calibration(load_tokenizer(model_path), calib, samples, seqlen, seed).input_ids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


def run_key(name: str, bits: int, group_size: int, ids, model_fingerprint: str, recipe_text: str | None) -> str:
    digest = hashlib.sha1(ids.numpy().tobytes() + model_fingerprint.encode() + (recipe_text or "").encode())
    return f"{name}-w{bits}g{group_size}{'-se' if recipe_text else ''}-{digest.hexdigest()[:12]}"


def run_peer(name: str, model_path: Path, ids, bits: int, group_size: int, out: Path, recipe: Path | None = None,
             threads: int | None = None, echo=print) -> dict:
    """Quantize `model_path` with the peer on `ids` into `out` (a finished run there is reused); peer.json's dict."""
    p = check_installed(name)
    out, model_path = Path(out).resolve(), Path(model_path).resolve()
    recipe = Path(recipe).resolve() if recipe else None
    if (out / "peer.json").exists():
        echo(f"[peers] {name}: reusing {out}")
        return json.loads((out / "peer.json").read_text())
    import torch

    partial = out.with_name("." + out.name + ".partial")
    owner = partial / "pid"
    if owner.exists() and _alive(int(owner.read_text() or 0)):
        raise SECompressError(f"peer '{name}' is already running this exact run (process {owner.read_text()}, "
                              f"{partial}): wait for it, it will be reused")
    shutil.rmtree(partial, ignore_errors=True)  # a killed run's leftovers
    partial.mkdir(parents=True)
    owner.write_text(str(os.getpid()))
    torch.save(ids, partial / "calib_ids.pt")
    cmd = [str(p.python), str(HERE / p.script), "--model", str(model_path), "--calib-ids", str(partial / "calib_ids.pt"),
           "--bits", str(bits), "--group-size", str(group_size), "--out", str(partial / "model"),
           "--result", str(partial / "runner.json")] + (["--recipe", str(recipe)] if recipe else [])
    env = {**os.environ, **p.env, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the runner sees the venv's packages, never our tree
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    echo(f"[peers] {name} W{bits} g{group_size}{' with ' + str(recipe) if recipe else ''}: {ids.shape[0]} x "
         f"{ids.shape[1]} calibration tokens; log in {partial / 'run.log'}")
    start = time.time()
    with open(partial / "run.log", "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=partial)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.time() - start
    runner = json.loads((partial / "runner.json").read_text()) if (partial / "runner.json").exists() else {}
    if not runner.get("ok"):
        where = f"{runner.get('stage')}: {runner.get('error')}" if runner else f"exit status {status >> 8}"
        raise SECompressError(f"peer '{name}' failed ({where[:300]}); its log: {partial / 'run.log'}")
    result = {"kind": "se_compress.peer", "tool": name, "package": p.package, "bits": bits, "group_size": group_size,
              "recipe": str(recipe) if recipe else None, "calibration": list(ids.shape), "seconds": round(seconds, 1),
              "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "threads": threads, "runner": runner,
              "checkpoint": "model"}
    (partial / "peer.json").write_text(json.dumps(result, indent=2))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return result
