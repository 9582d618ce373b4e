"""The streamed runner (models/runner.py) on a real transformers MoE: one round per layer gives the full model's last
hidden state; a collection round (keep_outputs=False) leaves the layer's inputs in place for the next round, the
pass's code between two rounds runs after every batch of the first, and a write-only pass runs no batch. The layer
loop is written once: no module but the runner walks the decoder layers one by one."""
import re

import torch
from transformers import AutoModelForCausalLM

from conftest import REPO
from se_compress.models.checkpoint import Checkpoint
from se_compress.models.runner import Round, stream_layers
from se_compress.models.streaming import StreamedModel


class Counter:
    def __init__(self):
        self.places, self.outputs = [], []

    def begin(self, place):
        self.places.append(place.index)

    def add(self, out):
        self.outputs.append(out.clone())


def test_rounds_keep_or_leave_the_layer_inputs(tiny_model):
    src = tiny_model("qwen3_moe")
    ids = torch.randint(3, 500, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        reference = full.model(ids).last_hidden_state  # includes the final norm

    one = StreamedModel(Checkpoint(src), dtype=torch.float32)
    _, hidden_one = stream_layers(one, ids, 2, lambda i, layer: [Counter()])

    seen = []

    def rounds(i, layer):
        collect, keep = Counter(), Counter()
        yield Round([collect], keep_outputs=False)
        seen.append((i, list(collect.places)))  # runs after every batch of the collection round
        yield Round([keep])
        # the collection round ran the same inputs as the keeping one: equal outputs, nothing moved in between
        assert all(torch.equal(a, b) for a, b in zip(collect.outputs, keep.outputs))

    two = StreamedModel(Checkpoint(src), dtype=torch.float32)
    _, hidden_two = stream_layers(two, ids, 2, rounds_for=rounds)
    assert seen == [(i, [0, 1]) for i in range(len(two.layers))]
    assert all(torch.equal(a, b) for a, b in zip(hidden_one, hidden_two))
    final = torch.cat([one.model.model.norm(h) for h in hidden_one])
    torch.testing.assert_close(final, reference, rtol=1e-5, atol=1e-5)

    written = []
    stream_layers(StreamedModel(Checkpoint(src)), None, 0, rounds_for=lambda i, layer: written.append(i) or ())
    assert written == list(range(len(two.layers)))


def test_the_layer_loop_is_written_once():
    """`load_layer(` is called by the runner alone (eval/run.py's reader loads every layer to keep them all)."""
    callers = {str(f.relative_to(REPO)) for f in (REPO / "se_compress").rglob("*.py")
               if re.search(r"\.load_layer\(", f.read_text())}
    assert callers == {"se_compress/models/runner.py", "se_compress/eval/run.py"}
