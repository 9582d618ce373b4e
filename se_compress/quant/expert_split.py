"""Expert-parallel GPTQ: which rank solves which expert of a layer, and the exchange of the codes afterwards.

Rank r solves the routed experts x with x % N == r (LayerQuantizer._solve_batched on its share, batched as in one
process), then each rank broadcasts its codes and scales, and every rank writes the same dequantized weights into its
copy of the layer, so all ranks compute the same next-layer inputs. Rank 0 puts the report records back in the
one-process order and alone writes the checkpoint and the reports. One process: every expert is its own, nothing is
exchanged.
"""
import torch

from .. import distributed as dist
from .hessian import expert_weights
from .rtn import Quantized


class ExpertSplit:
    """Who solves which expert of one layer, and the exchange afterwards (see the module docstring).

    `begin(x)` opens a job (the per-expert work of the loop: kept experts, RTN, fallbacks) and says whether this
    rank runs it; `solve` runs this rank's share of a batched GPTQ. The records a job adds to the engine's report lists are set aside and merged back on
    rank 0 in job order, so the report is the one-process report. `finish()` broadcasts the codes."""

    def __init__(self, quantizer, experts, inter: int):
        self.lq, self.experts, self.inter = quantizer, experts, inter
        self.on = dist.active()
        self.seq = -1
        self.jobs: dict[int, list[list]] = {}
        self.marks = None
        if self.on:
            dist.kill_hook(quantizer.i)

    def _lists(self):
        e = self.lq.e
        return [e.modules, e.super_weights, e.warnings, e.notes]

    def _close(self):
        if self.marks is not None:
            self.jobs[self.seq] = [lst[m:] for lst, m in zip(self._lists(), self.marks)]
            for lst, m in zip(self._lists(), self.marks):
                del lst[m:]
            self.marks = None

    def _open(self, owner: int) -> bool:
        if not self.on:
            return True
        self._close()
        self.seq += 1
        if owner != dist.rank():
            return False
        self.marks = [len(lst) for lst in self._lists()]
        return True

    def begin(self, x: int) -> bool:
        return self._open(x % dist.world())

    def solve(self, which: str, jobs: list[dict]) -> None:
        """The batched GPTQ of one matrix kind (LayerQuantizer._solve_batched) on this rank's experts; each job's
        records are set aside under the place the job has in the one-process order (grouped by (bits, shared
        Hessian) in order of first appearance, then by expert), so rank 0 can put the report back in that order."""
        if not self.on:
            self.lq._solve_batched(which, jobs, self.inter)
            return
        self._close()
        kinds = {}
        for job in jobs:
            kinds.setdefault((job["bits"], job["shared"]), len(kinds))
        ordered = sorted(jobs, key=lambda j: (kinds[(j["bits"], j["shared"])], j["x"]))
        seq_of = {job["name"]: self.seq + 1 + k for k, job in enumerate(ordered)}
        self.seq += len(ordered)
        mine = [job for job in jobs if job["x"] % dist.world() == dist.rank()]
        marks = [len(lst) for lst in self._lists()]
        self.lq._solve_batched(which, mine, self.inter)
        first = seq_of[mine[0]["name"]] if mine else None
        for slot, (lst, m) in enumerate(zip(self._lists(), marks)):
            for entry in lst[m:]:
                seq = seq_of.get(_job_name(entry), first)
                self.jobs.setdefault(seq, [[], [], [], []])[slot].append(entry)
            del lst[m:]

    def finish(self) -> None:
        if not self.on:
            return
        self._close()
        solved = self.lq.solved
        mine = sorted(solved)
        meta = [(x, which, solved[(x, which)].spec, tuple(solved[(x, which)].q.shape),
                 tuple(solved[(x, which)].scale.shape), solved[(x, which)].scale.dtype,
                 solved[(x, which)].zero is not None) for x, which in mine]
        everyone = dist.all_gather_objects((meta, {} if dist.is_main() else self.jobs))
        where = expert_weights(self.experts, 0)[0].device
        for owner, (units, _) in enumerate(everyone):
            sizes = [_unit_bytes(u) for u in units]
            if not units:
                continue
            if owner == dist.rank():
                buf = torch.cat([_pack(solved[(u[0], u[1])]) for u in units])
            else:
                buf = torch.empty(sum(sizes), dtype=torch.uint8, device=where)
            buf = dist.broadcast_bytes(buf, owner)
            if owner == dist.rank():
                continue
            offset = 0
            for u, size in zip(units, sizes):
                x, which, spec, qshape, sshape, sdtype, has_zero = u
                qt = _unpack(buf[offset: offset + size], spec, qshape, sshape, sdtype, has_zero)
                offset += size
                gate_up, down = expert_weights(self.experts, x)
                W = gate_up if which == "gate_up" else down
                W.copy_(qt.dequantize().float())
                if dist.is_main():
                    self.lq._store(x, which, qt, self.inter)
        if dist.is_main():
            jobs = dict(self.jobs)
            for _, other in everyone[1:]:
                jobs.update(other)
            for seq in sorted(jobs):
                for lst, part in zip(self._lists(), jobs[seq]):
                    lst.extend(part)


def _job_name(entry) -> str | None:
    """The matrix a report entry is about: a module record, a super weight, or a warning 'NAME: reason'."""
    if isinstance(entry, dict):
        return entry.get("name", entry.get("module"))
    return entry.split(":", 1)[0] if isinstance(entry, str) else None


def _unit_bytes(u) -> int:
    _, _, _, qshape, sshape, sdtype, has_zero = u
    q = qshape[0] * qshape[1]
    s = sshape[0] * sshape[1]
    return q + s * torch.empty(0, dtype=sdtype).element_size() + (s if has_zero else 0)


def _pack(qt) -> torch.Tensor:
    parts = [qt.q, qt.scale] + ([qt.zero] if qt.zero is not None else [])
    return torch.cat([p.contiguous().reshape(-1).view(torch.uint8) for p in parts])


def _unpack(buf, spec, qshape, sshape, sdtype, has_zero):
    nq = qshape[0] * qshape[1]
    ns = sshape[0] * sshape[1] * torch.empty(0, dtype=sdtype).element_size()
    q = buf[:nq].clone().view(torch.int8).reshape(qshape)
    scale = buf[nq: nq + ns].clone().view(sdtype).reshape(sshape)
    zero = buf[nq + ns:].clone().view(torch.int8).reshape(sshape) if has_zero else None
    return Quantized(q, scale, zero, spec)
