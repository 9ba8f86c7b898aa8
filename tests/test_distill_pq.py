"""Quantization-aware distillation (`--stage distill --memory-quant pq`, converters/pq_torch.py): the torch fake
quantization is m3lite.pq's decode(encode(x)) with an identity gradient, its k-means codebooks are reproducible
and fit, and a pq distillation run trains and resumes exactly (codebooks included)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters import train as T  # noqa: E402
from converters.distill import ADAPTER, CKPT_FORMAT, Items, base_model, kl_sum, resolve  # noqa: E402
from converters.lora import add_lora, lora_modules  # noqa: E402
from converters.model import Memory, encode_memory  # noqa: E402
from converters.pq_torch import fake_quant, fake_quant_memory, kmeans, quantize, train_codebooks  # noqa: E402
from m3lite import pq  # noqa: E402
from m3lite.adapter import read_adapter  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _memories(seed, B=6, Lm=2, H=3, T_=5, hd=16):
    g = np.random.default_rng(seed)
    k = g.standard_normal((B, Lm, H, T_, hd)).astype(np.float32)
    v = (0.5 * g.standard_normal((B, Lm, H, T_, hd)) + 0.2).astype(np.float32)
    cnt = g.integers(1, T_ + 1, (B, Lm, H)).astype(np.int64)
    return k, v, cnt


@pytest.mark.parametrize("device", DEVICES)
def test_fake_quant_is_pq_decode_of_encode(device):
    k, v, cnt = _memories(0)
    cb = pq.train(*_memories(1, B=40))  # codebooks of other vectors: real assignments
    for kv, x in ((0, k), (1, v)):
        want = pq.decode(pq.encode(x, cb, kv), cb, kv)
        got = quantize(torch.from_numpy(x).to(device), torch.from_numpy(cb).to(device), kv)
        assert got.dtype == torch.float32 and got.shape == x.shape
        np.testing.assert_array_equal(got.cpu().numpy(), want)
    # through a Memory: only the valid slots change, the others stay zero
    valid = np.arange(k.shape[3]) < cnt[..., None]
    mem = Memory(torch.from_numpy(k * valid[..., None]).to(device), torch.from_numpy(v * valid[..., None]).to(device),
                 torch.zeros(cnt.shape + (k.shape[3],), dtype=torch.long, device=device),
                 torch.from_numpy(cnt).to(device))
    q = fake_quant_memory(mem, torch.from_numpy(cb).to(device))
    for kv, x, got in ((0, k, q.keys), (1, v, q.values)):
        want = np.where(valid[..., None], pq.decode(pq.encode(x, cb, kv), cb, kv), 0.0)
        np.testing.assert_array_equal(got.cpu().numpy(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_straight_through_gradient_is_the_identity(device):
    k, _, cnt = _memories(2)
    cb = torch.from_numpy(pq.train(*_memories(3, B=40))).to(device)
    x = torch.from_numpy(k).to(device).requires_grad_(True)
    valid = torch.from_numpy(np.arange(k.shape[3]) < cnt[..., None]).to(device)
    y = fake_quant(x, cb, 0, valid)
    assert not torch.equal(y, x)  # it did quantize
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)
    # the forward value is exactly the reconstruction on valid slots and x elsewhere
    want = torch.where(valid[..., None], quantize(x, cb, 0), x)
    assert torch.equal(y.detach(), want.detach())
    # under bf16 autocast too: the nearest centroids are found in float32
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        assert torch.equal(quantize(x, cb, 0), quantize(x.detach(), cb, 0))


def _rel(x, q):
    return float(torch.linalg.vector_norm(x - q) / torch.linalg.vector_norm(x))


@pytest.mark.parametrize("device", DEVICES)
def test_kmeans_codebooks_are_reproducible_and_fit(device):
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(600, 2, 2, 16, generator=g).to(device)
    values = (torch.randn(600, 2, 2, 16, generator=g) * 0.3 + 1.0).to(device)
    a = train_codebooks(keys, values, torch.Generator().manual_seed(1))
    b = train_codebooks(keys, values, torch.Generator().manual_seed(1))
    assert a.shape == (2, 2, 2, 4, pq.CENTROIDS, pq.SUB_DIM) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, train_codebooks(keys, values, torch.Generator().manual_seed(2)))
    x = {0: keys[:, :, :, None], 1: values[:, :, :, None]}  # [N, Lm, H, 1, hd]
    random_cb = torch.randn(a.shape, generator=torch.Generator().manual_seed(3)).to(device)
    ref = pq.train(keys.cpu().numpy()[:, :, :, None], values.cpu().numpy()[:, :, :, None],
                   np.ones((600, 2, 2), np.int64))
    for kv in (0, 1):
        err = _rel(x[kv], quantize(x[kv], a, kv))
        assert err < 0.6 * _rel(x[kv], quantize(x[kv], random_cb, kv))
        # as good as m3lite.pq's own k-means (the same rules, other draws)
        ref_err = _rel(x[kv].cpu(), quantize(x[kv].cpu(), torch.from_numpy(ref), kv))
        assert err < 1.05 * ref_err
    # fewer points than centroids: every point is a centroid
    few = torch.randn(3, 10, 4, generator=g).to(device)
    c = kmeans(few, generator=torch.Generator().manual_seed(0))
    assert c.shape == (3, pq.CENTROIDS, 4)
    for m in range(3):
        assert (few[m][:, None] - c[m][None]).abs().sum(-1).min(-1).values.max() == 0


def test_settings():
    """--memory-quant is a run setting: stored, kept on resume, none for runs that predate it."""
    def args(**kw):
        base = dict(stage="distill", model="M", data="D", resume=False, out="R")
        return argparse.Namespace(**{**base, **kw})

    s = resolve(args(), None, T)
    assert (s["memory_quant"], s["pq_refresh"], s["pq_refs"]) == ("none", 100, pq.TRAIN_REFS)
    s = resolve(args(memory_quant="pq", pq_refresh=5, pq_refs=64), None, T)
    assert (s["memory_quant"], s["pq_refresh"], s["pq_refs"]) == ("pq", 5, 64)
    with pytest.raises(T.TrainError, match="go with --memory-quant pq"):
        resolve(args(pq_refresh=5), None, T)
    with pytest.raises(T.TrainError, match="positive"):
        resolve(args(memory_quant="pq", pq_refresh=0), None, T)
    old = {k: v for k, v in resolve(args(), None, T).items() if k not in ("memory_quant", "pq_refresh", "pq_refs")}
    assert resolve(args(model=None, data=None), old, T)["memory_quant"] == "none"
    with pytest.raises(T.TrainError, match="keeps its settings"):
        resolve(args(model=None, data=None, memory_quant="pq"), old, T)


# ---- a short pq distillation run on the tiny random model of test_distill.py (its fixtures and helper) ----

pytest.importorskip("tokenizers")
import test_distill  # noqa: E402
from test_distill import _train  # noqa: E402

imported, distill_data = test_distill.imported, test_distill.distill_data  # its fixtures, found here by name


# codebooks from 3 of the data's 8 references (12 vectors each): the other references' memories are far from
# every centroid, so the quantization matters here (with every reference each vector would be a centroid)
PQ_RUN = ("--memory-quant", "pq", "--pq-refresh", "2", "--pq-refs", "3", "--steps", "4", "--eval-every", "2",
          "--save-every", "2", "--device", "cpu")


def test_pq_distillation_trains_and_resumes_exactly(imported, distill_data, tmp_path):
    assert _train(imported, distill_data, tmp_path / "a", *PQ_RUN) == 0
    a = tmp_path / "a"
    assert json.loads((a / T.RUN_JSON).read_text())["memory_quant"] == "pq"
    meta = read_adapter(a / ADAPTER).meta
    assert meta["training"]["memory_quant"] == "pq" and meta["training"]["pq_refresh"] == 2
    log = (a / T.LOG).read_text()
    assert all(f"distill step {s} pq codebooks" in log for s in (0, 2, 4))
    losses = [float(r["loss"]) for r in T._rows(a / T.LOSS_CSV)]
    evals = [float(r["eval_loss"]) for r in T._rows(a / T.EVAL_CSV)]
    assert len(losses) == 4 and all(np.isfinite(losses)) and len(evals) == 3
    assert evals[-1] < evals[0]  # it trains, reading pq memories
    state = torch.load(a / T.CKPT, map_location="cpu", weights_only=True)
    assert state["format"] == CKPT_FORMAT and state["pq_codebooks"].shape[-2:] == (pq.CENTROIDS, pq.SUB_DIM)
    # the trained student reads other memories through its codebooks (far from most references' vectors)
    model, files, _ = base_model(imported / "m", T)
    items = Items(str(distill_data), files, T)
    add_lora(model, 4, 32.0)
    for kind, layer, m in lora_modules(model):
        m.lora_a.data, m.lora_b.data = (torch.from_numpy(x) for x in read_adapter(a / ADAPTER).pairs[(kind, layer)])
    batch = items.batch(items.train_ids, model, torch.device("cpu"))
    with torch.no_grad():
        mem = encode_memory(model, batch["ref_tokens"], batch["lengths"])
        q = fake_quant_memory(mem, state["pq_codebooks"])
        assert _rel(mem.keys, q.keys) > 0.1 and _rel(mem.values, q.values) > 0.1
        assert kl_sum(model, batch, False, state["pq_codebooks"])[0] != kl_sum(model, batch, False)[0]
    # stopped between two refreshes and resumed: the checkpoint's codebooks, then the same refresh at step 4
    b = tmp_path / "b"
    assert _train(imported, distill_data, b, *PQ_RUN, "--stop-at", "3") == 0
    assert T.main(["--resume", "--out", str(b)]) == 0
    ra, rb = read_adapter(a / ADAPTER), read_adapter(b / ADAPTER)
    for key in ra.pairs:
        np.testing.assert_array_equal(ra.pairs[key][0], rb.pairs[key][0])
        np.testing.assert_array_equal(ra.pairs[key][1], rb.pairs[key][1])
    assert [r["loss"] for r in T._rows(b / T.LOSS_CSV)] == [r["loss"] for r in T._rows(a / T.LOSS_CSV)]
    assert torch.equal(torch.load(b / T.CKPT, map_location="cpu", weights_only=True)["pq_codebooks"],
                       state["pq_codebooks"])
    # the quantization is a run setting
    assert T.main(["--resume", "--out", str(b), "--memory-quant", "none"]) == 2
