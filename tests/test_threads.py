"""--threads sets torch's CPU threads for the whole command; without it, OMP_NUM_THREADS (torchrun sets it per
rank) is left alone, else every core this process may use is taken."""
import os

import torch

from se_compress.cli import _set_threads, build_parser


def test_threads_option_default_and_omp_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert build_parser().parse_args(["quantize", "--threads", "1"]).threads == 1
        assert build_parser().parse_args(["detect"]).threads is None
        _set_threads(1)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        _set_threads(None)
        assert torch.get_num_threads() == 1  # the environment's choice stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        _set_threads(None)
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)
