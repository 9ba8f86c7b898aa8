"""The PyTorch eager row of `m3lite bench`: converters.model over the model directory's weights.

m3lite never imports torch, so `m3lite bench` runs this row in its own process with
`python -m m3bench.torch_row --worker SPEC.json`; timing, medians and output are m3bench.bench's own.
"""
import sys

import torch

from converters.model import from_stacked
from m3bench.bench import greedy_runs, worker_main
from m3lite.modelfile import ModelFiles
from m3lite.threads import default_threads


def row(spec: dict) -> dict:
    """Greedy prefill + decode timings (m3bench.bench.greedy_runs) of the PyTorch model, with its KV cache."""
    torch.set_num_threads(default_threads())
    files = ModelFiles.open(spec["model"])
    model = from_stacked(files.config, files.weights).eval()
    state: dict = {}

    @torch.inference_mode()
    def prefill(ids):
        logits, state["kv"] = model(torch.tensor([ids]), return_kv=True)
        return logits[0, -1].numpy()

    @torch.inference_mode()
    def step(tok):
        logits, state["kv"] = model(torch.tensor([[tok]]), past_kv=state["kv"], return_kv=True)
        return logits[0, -1].numpy()

    return greedy_runs(spec, prefill, step)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], row=row))
