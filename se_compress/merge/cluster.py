"""How similar experts are (their outputs on the same calibration tokens) and how they are grouped (HC-SMoE's
idea: hierarchical clustering with average linkage)."""
import numpy as np
import torch

from ..detect.stats import expert_forward


class OutputGram:
    """A `layer_hook` for the statistics pass: per MoE layer, the Gram matrix of the experts' outputs.

    On every calibration batch a seeded sample of `tokens_per_batch` tokens of the MoE block's input x is run
    through every routed expert e (all of them, whatever the router says), giving y_e(x) [n, H] before the routing
    weight. G[a, b] += sum over the sample of <y_a(x), y_b(x)>, and S[e] += sum over the sample of y_e(x).
    Two similarities follow: of the flattened outputs, G[a, b] / sqrt(G[a, a] G[b, b]); of the mean outputs
    (HC-SMoE's feature), the cosine of S[a] and S[b]. Only G [E, E] and S [E, H] are kept per layer.
    """

    def __init__(self, adapter, config, tokens_per_batch: int = 64, seed: int = 0):
        self.adapter, self.config = adapter, config
        self.tokens_per_batch, self.seed = tokens_per_batch, seed
        self.grams: dict[int, torch.Tensor] = {}
        self.sums: dict[int, torch.Tensor] = {}  # summed output per expert (HC-SMoE's feature: the mean output)
        self.tokens: dict[int, int] = {}
        self._handle = None

    def __call__(self, layer_idx: int, layer) -> None:
        self.close()
        if not self.adapter.is_moe_layer(self.config, layer_idx):
            return
        moe = self.adapter.moe_block(layer)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + layer_idx)

        @torch.no_grad()
        def see_input(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, self.config.hidden_size)
            pick = torch.randperm(x.shape[0], generator=generator)[: self.tokens_per_batch]
            x = x[pick]
            num_experts = module.experts.down_proj.shape[0]
            outputs = torch.stack([expert_forward(module.experts, e, x) for e in range(num_experts)])  # [E, n, H]
            flat = outputs.reshape(num_experts, -1).double()
            self.grams[layer_idx] = self.grams.get(layer_idx, 0) + (flat @ flat.T).cpu()  # [E, E]: small, on the host
            self.sums[layer_idx] = self.sums.get(layer_idx, 0) + outputs.double().sum(1).cpu()  # [E, H]
            self.tokens[layer_idx] = self.tokens.get(layer_idx, 0) + len(pick)

        self._handle = moe.register_forward_pre_hook(see_input, with_kwargs=True)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def cosine_distance(self, layer_idx: int, feature: str = "outputs") -> np.ndarray:
        """1 - cosine similarity of the experts' outputs [E, E]; an expert whose output is all 0 is at distance 1.
        feature "outputs": the flattened outputs on the same tokens; "mean": the mean output vectors."""
        gram = self.grams[layer_idx] if feature == "outputs" else self.sums[layer_idx] @ self.sums[layer_idx].T
        norms = gram.diagonal().clamp(min=0).sqrt()
        cosine = gram / (norms[:, None] * norms[None, :]).clamp(min=1e-300)
        return (1.0 - cosine.clamp(-1, 1)).numpy()


def average_linkage(distance: np.ndarray, clusters_wanted: int, max_size: int | None = None) -> list[list[int]]:
    """Agglomerative clustering, average linkage (UPGMA): while there are too many clusters, join the two whose
    members are closest on average. Returns the clusters (sorted lists of indices), ordered by first member.

    Average linkage is updated in place with the Lance-Williams rule:
      d(A u B, C) = (|A| d(A, C) + |B| d(B, C)) / (|A| + |B|).
    Ties go to the first pair in row-major order, so the result is deterministic.
    """
    n = distance.shape[0]
    d = distance.astype(np.float64).copy()
    np.fill_diagonal(d, np.inf)
    members = {i: [i] for i in range(n)}
    while len(members) > clusters_wanted:
        active = sorted(members)
        sub = d[np.ix_(active, active)]
        if max_size:  # no cluster above max_size members, unless nothing else is left to join
            sizes = np.array([len(members[a]) for a in active])
            capped = np.where(sizes[:, None] + sizes[None, :] > max_size, np.inf, sub)
            sub = capped if np.isfinite(capped).any() else sub
        a_pos, b_pos = np.unravel_index(np.argmin(sub), sub.shape)
        a, b = sorted((active[a_pos], active[b_pos]))
        size_a, size_b = len(members[a]), len(members[b])
        d[a, :] = (size_a * d[a, :] + size_b * d[b, :]) / (size_a + size_b)
        d[:, a] = d[a, :]
        d[a, a] = np.inf
        d[b, :] = d[:, b] = np.inf
        members[a] = sorted(members[a] + members.pop(b))
    return sorted(members.values())
