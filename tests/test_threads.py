"""--threads sets torch's CPU threads for the whole command; without it torch's default (all physical cores, or
OMP_NUM_THREADS, which torchrun sets per rank) and any count a caller chose in-process stand."""
import torch

from se_compress.cli import _set_threads, build_parser


def test_threads_option_sets_torch_threads_and_its_absence_changes_nothing():
    before = torch.get_num_threads()
    try:
        assert build_parser().parse_args(["quantize", "--threads", "1"]).threads == 1
        assert build_parser().parse_args(["detect"]).threads is None
        torch.set_num_threads(2)
        _set_threads(1)
        assert torch.get_num_threads() == 1
        _set_threads(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
