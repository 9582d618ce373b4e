"""--device and the Placement: bad devices are one line (exit 2) on every model command and in recipes; the
activations-on-host path gives the same statistics as on-device; the work budget decides chunk sizes."""
import pytest
import torch

from se_compress.cli import main as cli_main
from se_compress.errors import SECompressError
from se_compress.models.placement import Placement, current, resolve_device, use_device

COMMANDS = [["detect"], ["ablate"], ["quantize", "--out", "x"], ["prune", "--out", "x", "--keep", "2"],
            ["merge", "--out", "x", "--keep", "2"], ["eval"], ["compress", "--recipe", "qwen3-int4-naive"],
            ["compare", "--recipes", "qwen3-int4-naive"]]


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_unknown_device_is_one_line(device):
    with pytest.raises(SECompressError, match="--device"):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_line(device):
    with pytest.raises(SECompressError, match="no CUDA GPU"):
        resolve_device(device)


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: a[0])
def test_every_model_command_takes_device_and_refuses_a_bad_one(argv, capsys):
    assert cli_main(argv + ["--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device 'tpu' is not supported" in err[0]


def test_auto_and_cpu_placements():
    cpu = Placement.for_device("cpu")
    assert cpu.compute_dtype == torch.float32 and cpu.stats_dtype == torch.float32
    auto = Placement.for_device("auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with use_device("cpu") as p:
        assert current() is p
    assert Placement(torch.device("cpu"), work_budget=1000).chunk(10, 300) == 3
    assert Placement(torch.device("cpu"), work_budget=10).chunk(10, 300) == 1  # always at least one


def test_recipe_device_key_is_validated(tmp_path):
    from se_compress.driver import compress

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ndevice: tpu\nstages:\n  - quantize: {method: rtn}\n")
    with pytest.raises(SECompressError, match="--device 'tpu'"):
        compress(str(recipe), model="default", out=str(tmp_path / "out"), evaluate=False, progress=False)


def test_activations_on_host_give_the_same_statistics(tiny_model):
    from se_compress.detect import detect

    src = str(tiny_model("qwen3_moe"))
    kw = dict(samples=4, seqlen=32, progress=False)
    with use_device(Placement(torch.device("cpu"), activations="device")):
        a = detect(src, **kw)
    with use_device(Placement(torch.device("cpu"), activations="host")) as p:
        b = detect(src, **kw)
        assert p.describe()["activations"] == "host"
    assert [(s["layer"], s["expert"]) for s in a["super_experts"]] == [(s["layer"], s["expert"]) for s in b["super_experts"]]
    assert [e["max_output"] for e in a["experts"]] == [e["max_output"] for e in b["experts"]]
