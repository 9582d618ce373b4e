"""Per-expert statistics in one pass, through transformers' ExpertsInterface.

transformers 5 fuses a layer's experts into 3-D parameters, so there is no per-expert module to hook.
Instead `recording_experts_forward` is registered as an experts implementation: it runs the layer's grouped
expert forward (models/expert_forward.py, the eager loop's math to fp32 rounding) and, when the experts module
carries a `se_recorder`, records for every expert, over every token routed to it (not only the first token per
batch, the bug of the paper's code), from each expert's output while it is computed (no second pass):
  max |down_proj output| (before the routing weight), with the token and hidden channel where it happens;
  routing count; REAP saliency sum (routing weight x L2 norm of the output); EAN sum (L2 norm of the output).
Shared experts are ordinary MLP modules and are recorded with a forward hook.
"""
import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .. import distributed as dist
from ..models.expert_forward import expert_down, expert_intermediate, routed_experts_forward

IMPLEMENTATION = "se_compress_record"


def expert_forward(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Output of routed expert `e` for tokens x [n, H], before the routing weight: [n, H]."""
    return expert_down(experts, e, expert_intermediate(experts, e, x))


class ExpertRecorder:
    """The accumulator of one layer's expert statistics: update() per routed batch, reduce() across ranks, then read.

    Slots: the E routed experts, plus one (index E) for the shared expert. Per slot: max |output| with its global
    token and channel, routing count, REAP and EAN sums. `token_base` and `batch` say which calibration batch runs."""

    def __init__(self, num_experts: int, has_shared: bool):
        slots = num_experts + (1 if has_shared else 0)
        self.num_experts = num_experts
        self.max_output = torch.zeros(slots, dtype=torch.float64)
        self.max_token = torch.full((slots,), -1, dtype=torch.long)    # global token index of the max
        self.max_channel = torch.full((slots,), -1, dtype=torch.long)  # hidden channel of the max
        self.count = torch.zeros(slots, dtype=torch.long)
        self.reap_sum = torch.zeros(slots, dtype=torch.float64)
        self.ean_sum = torch.zeros(slots, dtype=torch.float64)
        self.token_base = 0  # global index of the first token of the batch being run
        self.batch = 0       # global index of that batch
        self.parts: dict[int, dict[int, tuple[float, float]]] = {}  # batch -> slot -> its (REAP, EAN) terms

    def begin(self, place) -> None:
        """The runner (models/runner.py): batch `place` is about to run; update() is called from inside the layer."""
        self.token_base, self.batch = place.first_token, place.index

    @torch.no_grad()
    def merge(self, batch: "BatchMaxima", groups, width: int) -> None:
        """Add one forward call's per-expert statistics (routed experts, slots 0..E-1), moved to the host once."""
        E = self.num_experts
        count = torch.tensor(groups.bounds[1:E + 1]) - torch.tensor(groups.bounds[:E])
        seen = count > 0
        max_output, flat_idx, reap, ean = (t.cpu() for t in (batch.max_output, batch.flat_idx, batch.reap, batch.ean))
        better = seen & (max_output.double() > self.max_output[:E])
        if better.any():
            experts = better.nonzero().flatten()
            first_row = torch.tensor(groups.bounds[:E])[experts]
            rows = first_row + flat_idx[experts] // width
            self.max_output[experts] = max_output[experts].double()
            self.max_token[experts] = self.token_base + groups.tokens[rows.to(groups.tokens.device)].cpu()
            self.max_channel[experts] = flat_idx[experts] % width
        self.count[:E] += count
        self.reap_sum[:E] += torch.where(seen, reap.double(), 0.0)
        self.ean_sum[:E] += torch.where(seen, ean.double(), 0.0)
        terms = self.parts.setdefault(self.batch, {})  # for reduce(): re-added in global batch order
        for e in seen.nonzero().flatten().tolist():
            terms[e] = (float(reap[e].double()), float(ean[e].double()))

    @torch.no_grad()
    def update(self, slot: int, output: torch.Tensor, token_idx: torch.Tensor, weight: torch.Tensor) -> None:
        if output.numel() == 0:
            return
        flat_max, flat_idx = output.abs().reshape(-1).max(0)
        if flat_max.item() > self.max_output[slot].item():
            row, channel = divmod(int(flat_idx), output.shape[-1])
            self.max_output[slot] = flat_max.item()
            self.max_token[slot] = self.token_base + int(token_idx[row])
            self.max_channel[slot] = channel
        norms = output.float().norm(dim=-1)
        reap, ean = (weight.float() * norms).sum().item(), norms.sum().item()
        self.count[slot] += output.shape[0]
        self.reap_sum[slot] += reap
        self.ean_sum[slot] += ean
        self.parts.setdefault(self.batch, {})[slot] = (reap, ean)  # one update per slot and batch

    def reduce(self) -> None:
        """Every rank's statistics combined into the one-process values, bit for bit: counts summed; the largest max,
        on a tie the smallest global token (what one process keeps: it replaces a max only by a larger one); the
        REAP/EAN terms re-added in global batch order (float sums in another order differ in the last bits)."""
        if not dist.active():
            return
        self.count = dist.sum_in_rank_order(self.count)
        mine = torch.stack([self.max_output, self.max_token.double(), self.max_channel.double()])
        got = torch.stack([torch.as_tensor(g) for g in dist.all_gather_objects(mine)])
        self.max_output, self.max_token, self.max_channel = argmax_reduce(got[:, 0], got[:, 1].long(), got[:, 2].long())
        parts = {}
        for theirs in dist.all_gather_objects(self.parts):
            parts.update(theirs)
        self.reap_sum, self.ean_sum = torch.zeros_like(self.reap_sum), torch.zeros_like(self.ean_sum)
        for b in sorted(parts):  # the one-process order: 0 + batch 0 + batch 1 + ...
            for slot, (reap, ean) in parts[b].items():
                self.reap_sum[slot] += reap
                self.ean_sum[slot] += ean
        self.parts = parts


def argmax_reduce(values: torch.Tensor, tokens: torch.Tensor, extra: torch.Tensor | None = None):
    """values/tokens [ranks, n]: the largest value; on a tie the smallest token index (-1, never set, first)."""
    best = values.max(0).values
    candidates = torch.where(values == best, tokens.double(), torch.inf)
    winner = candidates.argmin(0)
    idx = torch.arange(values.shape[1])
    return best, tokens[winner, idx], (extra[winner, idx] if extra is not None else None)


class BatchMaxima:
    """Per-expert statistics of one forward call, kept where the outputs are (no host sync per expert); merged
    into the ExpertRecorder once at the end of the call."""

    def __init__(self, num_experts: int, device):
        self.max_output = torch.zeros(num_experts, dtype=torch.float32, device=device)
        self.flat_idx = torch.zeros(num_experts, dtype=torch.long, device=device)  # argmax in the expert's [n, H]
        self.reap = torch.zeros(num_experts, dtype=torch.float32, device=device)
        self.ean = torch.zeros(num_experts, dtype=torch.float32, device=device)

    def __call__(self, e: int, rows: slice, output: torch.Tensor, weight: torch.Tensor) -> None:
        flat_max, flat_idx = output.abs().reshape(-1).max(0)
        self.max_output[e], self.flat_idx[e] = flat_max, flat_idx
        norms = output.float().norm(dim=-1)
        self.reap[e] = (weight.float() * norms).sum()
        self.ean[e] = norms.sum()


def recording_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    recorder = getattr(self, "se_recorder", None)
    batch = BatchMaxima(self.num_experts, hidden_states.device) if recorder is not None else None
    final, groups = routed_experts_forward(self, hidden_states, top_k_index, top_k_weights, on_output=batch)
    if recorder is not None:
        recorder.merge(batch, groups, hidden_states.shape[-1])
    return final


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, recording_experts_forward)


class HiddenRecorder:
    """The accumulator of one decoder layer's output: max |hidden state| per channel over all tokens, where it is, and
    a sample for the median; update() per batch, reduce() across ranks."""

    def __init__(self, hidden_size: int, seq_len: int, sample_per_batch: int = 4096):
        self.max_abs = torch.zeros(hidden_size, dtype=torch.float64)
        self.max_token = torch.full((hidden_size,), -1, dtype=torch.long)
        self.first_token_max = 0.0   # max |h| at position 0 of any sample
        self.other_token_max = 0.0   # max |h| at any later position
        self.samples: list[torch.Tensor] = []
        self.sample_batches: list[int] = []  # the global batch of each sample
        self.seq_len, self.sample_per_batch = seq_len, sample_per_batch
        self.token_base = 0
        self.batch = 0

    def begin(self, place) -> None:
        self.token_base, self.batch = place.first_token, place.index

    def add(self, hidden: torch.Tensor) -> None:
        """The runner (models/runner.py): the layer's output for the batch that just ran."""
        self.update(hidden)

    @torch.no_grad()
    def update(self, hidden: torch.Tensor) -> None:
        batch, seq, width = hidden.shape
        absh = hidden.detach().abs().float()  # reduced where the activations are; only [width] results leave
        channel_max, flat_token = absh.reshape(-1, width).max(0)
        channel_max, flat_token = channel_max.double().cpu(), flat_token.cpu()
        better = channel_max > self.max_abs
        self.max_abs[better] = channel_max[better]
        self.max_token[better] = self.token_base + flat_token[better]
        self.first_token_max = max(self.first_token_max, absh[:, 0].max().item())
        if seq > 1:
            self.other_token_max = max(self.other_token_max, absh[:, 1:].max().item())
        flat = absh.reshape(-1)
        stride = max(1, flat.numel() // self.sample_per_batch)
        # a copy: on the CPU .cpu() returns the strided view itself, which kept the whole batch's |h| alive (one
        # hidden state per token per layer: detect --samples 2000 ran out of memory; issue 21's audit)
        self.samples.append(flat[::stride].to("cpu", copy=True))
        self.sample_batches.append(self.batch)

    def reduce(self) -> None:
        """The one-process values on every rank: maxima as ExpertRecorder's, samples back in global batch order."""
        if not dist.active():
            return
        got = dist.all_gather_objects((self.max_abs, self.max_token, self.first_token_max, self.other_token_max,
                                       self.samples, self.sample_batches))
        self.max_abs, self.max_token, _ = argmax_reduce(torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got]))
        self.first_token_max = max(g[2] for g in got)
        self.other_token_max = max(g[3] for g in got)
        by_batch = {}
        for g in got:
            by_batch.update(zip(g[5], g[4]))
        self.sample_batches = sorted(by_batch)
        self.samples = [by_batch[b] for b in self.sample_batches]

    def median(self) -> float:
        return torch.cat(self.samples).median().item() if self.samples else 0.0


def attach_recorders(adapter, layer, layer_idx: int, config):
    """Give the MoE block of `layer` an ExpertRecorder; returns (recorder, hook handles)."""
    if not adapter.is_moe_layer(config, layer_idx):
        return None, []
    moe = adapter.moe_block(layer)
    shared = adapter.shared_expert(layer)
    recorder = ExpertRecorder(adapter.num_experts(config), shared is not None)
    moe.experts.se_recorder = recorder
    moe.experts.config._experts_implementation = IMPLEMENTATION
    handles = []
    if shared is not None:
        gate = getattr(moe, adapter.shared_gate_attr) if adapter.shared_gate_attr else None
        slot = recorder.num_experts

        def on_shared(module, inputs, output):
            x, y = inputs[0].reshape(-1, inputs[0].shape[-1]), output.reshape(-1, output.shape[-1])
            weight = torch.sigmoid(gate(x)).squeeze(-1) if gate is not None else torch.ones(y.shape[0], device=y.device)
            recorder.update(slot, y, torch.arange(y.shape[0]), weight)

        handles.append(shared.register_forward_hook(on_shared))
    return recorder, handles


def detach_recorders(adapter, layer, handles) -> None:
    for h in handles:
        h.remove()
    moe = getattr(layer, adapter.moe_attr, None)
    if moe is not None and hasattr(getattr(moe, "experts", None), "se_recorder"):
        del moe.experts.se_recorder
