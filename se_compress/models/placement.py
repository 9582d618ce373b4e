"""Where tensors live: the one place that decides device and dtype for every stage.

A `Placement` answers four questions, and stages ask it instead of calling `.to(...)` themselves:

- compute_device / compute_dtype: where a decoder layer runs, and in what precision (bf16 on a GPU, fp32 on
  the CPU, where bf16 matmuls are slow and fp32 keeps the historical numbers);
- stats_dtype: statistics, Hessians and GPTQ solves are always fp32 (no float64 on the GPU hot path: fp32
  with GPTQ's damping is what the reference implementation and GPTQModel use);
- where the calibration activations wait between layers: on the compute device when they fit in its free
  memory, otherwise in pinned host memory, moved to the device one batch at a time (`hold` / `fetch`);
- how many equal-sized work items (experts of a batched GPTQ solve) fit at once (`chunk`).

The CLI's `--device` (and a recipe's `device` key) set the placement for a whole command with `use_device`;
library code reads it with `current()`. `auto` (the default) means CUDA when available, else the CPU. A device
that does not exist here is one line (SECompressError), never a traceback. On the CPU every method below runs
the same code the GPU runs; moves are no-ops there.
"""
import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

from ..errors import SECompressError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
CPU_WORK_BUDGET = 1 << 30     # bytes a batched solve may use on the CPU (no free-memory query is meaningful there)
DEVICE_WORK_SHARE = 0.6       # share of the free GPU memory a batched solve may use
ACTIVATION_SHARE = 0.4        # share of the free GPU memory the calibration activations may take


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch.device that exists on this machine (else SECompressError)."""
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec[5:] if spec.startswith("cuda:") else "0"
        if not index.isdigit():
            raise SECompressError(f"--device '{spec}' is not a device: use {DEVICE_CHOICES}")
        if not torch.cuda.is_available():
            raise SECompressError(f"--device {spec}: no CUDA GPU is usable here (torch {torch.__version__}, "
                                  f"CUDA build: {torch.version.cuda or 'none'}): use --device cpu or auto")
        if int(index) >= torch.cuda.device_count():
            raise SECompressError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                  f"numbered from 0: pick one of them")
        return torch.device("cuda", int(index))
    raise SECompressError(f"--device '{spec}' is not supported: use {DEVICE_CHOICES}")


@dataclass
class Placement:
    """Device and dtype policy of one run. `activations` forces where activations wait: 'auto' | 'device' | 'host'."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compute_dtype: torch.dtype | None = None
    stats_dtype: torch.dtype = torch.float32
    activations: str = "auto"
    work_budget: int | None = None  # bytes for batched solves; None: from free device memory (CPU: CPU_WORK_BUDGET)

    def __post_init__(self):
        if self.compute_dtype is None:
            self.compute_dtype = torch.bfloat16 if self.is_cuda else torch.float32
        self._activations_on_device = self.activations != "host"

    @classmethod
    def for_device(cls, spec="auto", **kw) -> "Placement":
        return cls(resolve_device(spec), **kw)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> dict:
        return {"device": str(self.device), "compute_dtype": str(self.compute_dtype).split(".")[-1],
                "stats_dtype": str(self.stats_dtype).split(".")[-1],
                "activations": "device" if self._activations_on_device else "host (pinned)" if self.is_cuda else "host"}

    # ----- weights and activations -----
    def weight(self, tensor: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
        """A checkpoint tensor as the compute device holds it (floating tensors in compute_dtype unless keep_dtype)."""
        dtype = self.compute_dtype if tensor.is_floating_point() and not keep_dtype else None
        return tensor.to(device=self.device, dtype=dtype, non_blocking=False)

    def to_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor moved onto the compute device (dtype unchanged): inputs, token ids, masks."""
        return tensor.to(self.device, non_blocking=tensor.is_pinned() if tensor.device.type == "cpu" else False)

    def plan_activations(self, nbytes: int) -> bool:
        """Decide, once per run, whether `nbytes` of calibration activations stay on the device; returns that."""
        if self.activations in ("device", "host"):
            self._activations_on_device = self.activations == "device"
        elif self.is_cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            self._activations_on_device = nbytes <= ACTIVATION_SHARE * free
        else:
            self._activations_on_device = True  # the CPU is both host and device
        return self._activations_on_device

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        """Where an activation waits for the next layer: the device if planned so, else (pinned) host memory."""
        if self._activations_on_device or not self.is_cuda:
            return tensor.to(self.device)
        return tensor.to("cpu").pin_memory()

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Small results (statistics, codes, scales) leave the device here."""
        return tensor.to("cpu")

    # ----- memory -----
    def free_bytes(self) -> int:
        if self.work_budget is not None:
            return int(self.work_budget)
        if self.is_cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(DEVICE_WORK_SHARE * free)
        return CPU_WORK_BUDGET

    def chunk(self, count: int, bytes_per_item: int, fixed_bytes: int = 0) -> int:
        """How many of `count` equal work items fit in the work budget at once (at least 1)."""
        room = self.free_bytes() - fixed_bytes
        return max(1, min(count, room // max(1, bytes_per_item)))

    def reset_peak(self) -> None:
        if self.is_cuda:
            torch.cuda.init()  # the allocator's statistics exist only once CUDA is up ("Invalid device argument")
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.is_cuda else None


_CURRENT: contextvars.ContextVar[Placement | None] = contextvars.ContextVar("se_compress_placement", default=None)


def current() -> Placement:
    """The placement of the running command (set by use_device); 'auto' when none was set."""
    placement = _CURRENT.get()
    if placement is None:
        placement = Placement.for_device("auto")
        _CURRENT.set(placement)
    return placement


@contextlib.contextmanager
def use_device(spec: "str | torch.device | Placement | None" = "auto", **kw):
    """Run the body with a placement for `spec` (a device string or a ready Placement)."""
    placement = spec if isinstance(spec, Placement) else Placement.for_device(spec, **kw)
    token = _CURRENT.set(placement)
    try:
        yield placement
    finally:
        _CURRENT.reset(token)


def host_placement() -> Placement:
    """fp32 on the CPU: for passes that edit and write weights without running them (prune, merge surgery)."""
    return Placement(torch.device("cpu"), torch.float32)
