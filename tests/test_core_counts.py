"""Every pass once: one recipe with its naive twin resolves each model folder once, reads its config.json once,
loads its tokenizer once, and runs detection once on the base model (the driver's pass, reused by the twin).

Counted on the real run, not on stand-ins: the functions that resolve a name, load a tokenizer or run detection are
wrapped (they still run), and an audit hook sees every file opened for reading.
"""
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from se_compress.detect import detect
from se_compress.driver import compress
from se_compress.models.checkpoint import resolve_model

RECIPE = """name: {name}
{device}detect: {{calib: wikitext2, samples: 4, seqlen: 32}}
stages:
  - quantize: {{method: rtn, bits: 4, group_size: 16, symmetric: true, se_policy: [{policy}], output_format: fake-quant}}
evaluate: {{tasks: [books], max_windows: 1, seqlen: 32}}
{baselines}"""


class Counts:
    """Calls of resolve_model (by the folder it returns), AutoTokenizer.from_pretrained (by folder) and detect, and
    reads of config.json (by folder). The real functions run: each is wrapped where the package holds it."""

    def __init__(self, monkeypatch):
        from transformers import AutoTokenizer

        self.on = True
        self.resolved, self.tokenizers, self.config_reads = Counter(), Counter(), Counter()
        self.detections = 0
        sys.addaudithook(self.audit)  # cannot be removed: inert once the test ends

        def on_resolve(result, *a, **k):
            self.resolved[Path(result).resolve()] += 1

        def on_detect(result, *a, **k):
            self.detections += 1

        self._spy(monkeypatch, resolve_model, on_resolve)
        self._spy(monkeypatch, detect, on_detect)
        load = AutoTokenizer.from_pretrained

        def from_pretrained(path, *a, **k):
            self.tokenizers[Path(path).resolve()] += 1
            return load(path, *a, **k)

        monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)

    @staticmethod
    def _spy(monkeypatch, fn, after):
        """Replace `fn` by a wrapper that calls it and then `after(result, ...)`, in every se_compress module holding it."""
        def wrapper(*a, **k):
            result = fn(*a, **k)
            after(result, *a, **k)
            return result

        for name, module in list(sys.modules.items()):
            if name.startswith("se_compress") and module is not None:
                for attr, value in list(vars(module).items()):
                    if value is fn:
                        monkeypatch.setattr(module, attr, wrapper)

    def audit(self, event, args):
        if getattr(self, "on", False) and event == "open" and args[0] is not None and not isinstance(args[0], int):
            path, mode, flags = Path(args[0]), args[1], args[2]
            reading = ("r" in mode and "+" not in mode) if mode else not flags & 3  # os.open: O_WRONLY|O_RDWR
            if path.name == "config.json" and reading and not _hashing_for_ownership():
                self.config_reads[path.resolve().parent] += 1


def _hashing_for_ownership() -> bool:
    """ownership.py hashes each file it records as ours (config.json too): bytes for the marker, not a config read."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_filename.endswith(os.path.join("se_compress", "ownership.py")):
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("model_type", ["qwen3_moe"])
@pytest.mark.skipif(torch.cuda.is_available(), reason="the twin's `device: cuda` must be absent to show --device wins")
def test_a_recipe_with_its_twin_opens_each_model_once_and_the_twin_keeps_the_device(model_type, tiny_model, tmp_path,
                                                                                      monkeypatch):
    model = tiny_model(model_type)
    twin = tmp_path / "tiny-naive.yaml"
    # The twin's own recipe asks for CUDA; the run's --device cpu must reach it (issue 18: compare's twin dropped
    # --device). Without CUDA here, a twin that went its own way would fail in one line instead of being built.
    twin.write_text(RECIPE.format(name="tiny-naive", policy="none", baselines="", device="device: cuda\n"))
    recipe = tmp_path / "tiny-se.yaml"
    recipe.write_text(RECIPE.format(name="tiny-se", policy="noclip", baselines=f"baselines: [{twin}]\n", device=""))
    monkeypatch.chdir(tmp_path)  # checkpoints/ (the twin, the caches) under tmp_path
    import se_compress.driver, se_compress.eval.run, se_compress.prune, se_compress.quant  # noqa: F401 (spied on)

    counts = Counts(monkeypatch)
    try:
        out = compress(str(recipe), model=str(model), out=str(tmp_path / "result"), progress=False, device="cpu")
    finally:
        counts.on = False
    twin_dir = tmp_path / "checkpoints" / f"{model.name}-tiny-naive"
    assert (out / "compare.json").exists() and load_file(twin_dir / "model.safetensors")  # both were made and read
    base, result, twin_out = Path(model).resolve(), out.resolve(), twin_dir.resolve()
    assert counts.detections == 1  # the driver's pass on the base model; the twin reuses it
    assert counts.resolved[base] == 1, counts.resolved
    assert counts.config_reads[base] == 1, counts.config_reads
    assert counts.tokenizers[base] == 1, counts.tokenizers
    # the result and the twin are evaluated: each opened once more, as models of their own
    for folder in (twin_out,):
        assert counts.resolved[folder] == 1 and counts.config_reads[folder] == 1 and counts.tokenizers[folder] == 1
    assert max(counts.resolved.values()) == 1 and max(counts.config_reads.values()) == 1, counts.config_reads
    assert max(counts.tokenizers.values()) == 1
    twin_report = json.loads((twin_dir / "compression_report.json").read_text())
    assert twin_report["modules"] and (twin_dir / "eval" / "eval.json").exists()  # made and evaluated on the CPU


MERGE_RECIPE = """name: tiny-merge
detect: {calib: wikitext2, samples: 4, seqlen: 32}
stages:
  - merge: {fraction: 0.5, se_policy: singleton}
evaluate: {tasks: []}
baselines: []
"""


def test_a_merge_recipe_runs_detection_once_and_merges_as_merge_alone(tiny_model, tmp_path, monkeypatch):
    """The merge stage's similarity rides on the driver's detection pass (main ran a second pass in merge)."""
    from se_compress.merge import merge_model

    model = tiny_model("qwen3_moe")
    recipe = tmp_path / "tiny-merge.yaml"
    recipe.write_text(MERGE_RECIPE)
    monkeypatch.chdir(tmp_path)
    counts = Counts(monkeypatch)
    try:
        out = compress(str(recipe), model=str(model), out=str(tmp_path / "merged"), progress=False, device="cpu")
    finally:
        counts.on = False
    assert counts.detections == 1
    alone = merge_model(str(model), tmp_path / "alone", fraction=0.5, se_policy="singleton", calib="wikitext2",
                        samples=4, seqlen=32, progress=False)
    merged, direct = load_file(out / "model.safetensors"), load_file(alone / "model.safetensors")
    assert merged.keys() == direct.keys() and all(torch.equal(merged[k], direct[k]) for k in merged)
