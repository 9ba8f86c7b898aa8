"""The two-stage Memory3 trainer (warmup -> continual train with memory -> SFT), single process or torchrun.

    python -m converters.train --stage warmup --preset default --out runs/warmup --steps 2000
    python -m converters.train --stage memory --model runs/warmup --out runs/memory --steps 1000
    python -m converters.train --stage sft --model runs/memory --out runs/sft --steps 300 --export models/m3
    python -m converters.train --resume --out runs/memory            # continue an interrupted run exactly
    python -m converters.train export runs/sft --out models/m3       # a run's checkpoint as a model directory
    python -m converters.train export runs/sft --out models/m3 --dtype float16   # ... stored as float16
    torchrun --nproc_per_node 2 -m converters.train --stage warmup ...  # data parallel (gloo CPU, NCCL CUDA)

Stages:
  warmup  plain language modelling on packed sequences (BOS + text + EOS), no memory.
  memory  the same sequences in retrieval_interval-token chunks; each chunk attends to the memories of the
          reference retrieved for it plus those of the previous retrieval_top_k - 1 chunks, encoded in the
          forward pass (gradients reach the memory layers through the memories' keys and values). References
          come from the training articles (BM25 at data-preparation time), those that leak into the sequence
          (LCS > 90% of the reference within a window of twice its length) are never used.
  sft     qa_prompt(question) + " " + answer + EOS with the memories of the question's top retrieval_top_k
          references; the loss covers the answer tokens and EOS only.

A run directory holds run.json (the settings), tokenizer.model, checkpoint.pt (weights, optimizer, step; loaded
with weights_only=True), loss.csv, eval.csv, loss.png and train.log.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from m3lite.config import PRESETS, ModelConfig
from m3lite.errors import BadArgument, M3Error
from m3lite.modelfile import CONFIG_FILE, FLOAT_DTYPES, ModelFiles, atomic_write_bytes

from . import data as D
from .model import Transformer, encode_memory, forward_with_memory_parallel, from_stacked
from m3lite.plot import loss_chart
from .tokenizer import PAD

STAGES = ("warmup", "memory", "sft")  # the pipeline of models trained here; "distill" adapts imported ones
CKPT, RUN_JSON, TOKENIZER = "checkpoint.pt", "run.json", "tokenizer.model"
LOSS_CSV, EVAL_CSV, LOSS_PNG, LOG = "loss.csv", "eval.csv", "loss.png", "train.log"
CKPT_FORMAT, CKPT_VERSION = "m3lite-train", 1
STAGE_LR = {"warmup": 2e-3, "memory": 1e-3, "sft": 3e-4}
EVAL_SEED = 1234  # which held-out items the evaluation uses (fixed across runs and stages)

# Settings that shape the loss curve: a resumed run takes them from run.json and refuses different values.
RUN_FIELDS = ("stage", "steps", "batch", "seq_len", "lr", "min_lr", "warmup_steps", "schedule", "decay_frac",
              "weight_decay", "grad_clip", "seed", "corpus", "max_docs", "dict_max_chars", "eval_every",
              "eval_seqs")
# Settings a resumed run may change.
SESSION_FIELDS = ("stop_at", "save_every", "log_every", "export", "export_dtype", "device", "bf16", "data_dir")


class TrainError(M3Error):
    """A training run cannot start or continue as asked."""


# ------------------------------------------------------------------------------------------- arguments


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m converters.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Also: python -m converters.train export RUN_DIR --out DIR "
                                       "[--dtype float32|float16]")
    a = p.add_argument
    a("--stage", choices=STAGES + ("distill",),
      help="warmup (plain LM), memory (continual train with memory), sft, distill (a LoRA memory adapter for an "
           "imported model: converters/distill.py)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="start from a model directory or a run directory (its checkpoint)")
    src.add_argument("--preset", choices=list(PRESETS), help="start from a fresh random model of this shape")
    a("--tokenizer", help="with --preset: this sentencepiece model (default: one trained on the corpus at hand "
                          "minus the held-out articles, cached)")
    a("--out", required=True, help="the run directory (created; holds checkpoints and logs)")
    a("--steps", type=int, help="optimizer steps (default 1000)")
    a("--batch", type=int, help="global batch in sequences, split across processes (default 16)")
    a("--seq-len", type=int, help="tokens per training sequence (default 256)")
    a("--lr", type=float, help="peak learning rate (default: warmup 2e-3, memory 1e-3, sft 3e-4)")
    a("--min-lr", type=float, help="final learning rate (default lr/10)")
    a("--warmup-steps", type=int, help="linear warmup steps (default min(100, steps/10))")
    a("--schedule", choices=("cosine", "wsd"), help="cosine decay, or warmup-stable-decay (default cosine)")
    a("--decay-frac", type=float, help="wsd: the final fraction of steps that decays (default 0.2)")
    a("--weight-decay", type=float, help="AdamW weight decay of the matrices (default 0.1)")
    a("--grad-clip", type=float, help="clip the global gradient norm to this (default 1.0; 0: off)")
    a("--bf16", choices=("auto", "on", "off"), help="bf16 autocast, fp32 master weights (default auto: on for "
                                                    "CUDA with bf16, and for CPUs with native bf16 matmul)")
    a("--device", choices=("auto", "cpu", "cuda"), help="default auto: cuda when available")
    a("--seed", type=int, help="seed of the data order and of a fresh model's weights (default 0)")
    a("--corpus", help="comma-separated sources: wiki:LANG, dict (Debian dictionaries when installed), "
                       "files or folders (default wiki:en,dict)")
    a("--max-docs", type=int, help="use only the first N documents of each source (a slice, for tests)")
    a("--dict-max-chars", type=int, help="text taken from the dictionaries (default 4,000,000 characters)")
    a("--data-dir", help="cache of prepared data (default: the user cache's train-data folder)")
    a("--eval-every", type=int, help="evaluate on held-out articles every N steps (default 0: never)")
    a("--eval-seqs", type=int, help="held-out items per evaluation (default 64)")
    a("--save-every", type=int, help="checkpoint every N steps (default 200; always at the end)")
    a("--log-every", type=int, help="progress line every N steps (default 10)")
    a("--stop-at", type=int, help="save and stop after this step (the schedule still spans --steps); "
                                  "continue later with --resume")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--export", help="after training, write the model as an m3lite model directory here")
    a("--export-dtype", choices=FLOAT_DTYPES, help="how --export stores the weights: float16 halves the files, "
                                                   "the math stays float32 (default float32)")
    from .distill import add_arguments

    add_arguments(p)
    return p


DEFAULTS = dict(steps=1000, batch=16, seq_len=256, schedule="cosine", decay_frac=0.2, weight_decay=0.1,
                grad_clip=1.0, bf16="auto", device="auto", seed=0, max_docs=None,
                dict_max_chars=4_000_000, eval_every=0, eval_seqs=64, save_every=200, log_every=10, stop_at=None,
                export=None, export_dtype="float32", data_dir=None)


def _resolve(args: argparse.Namespace, saved: dict | None) -> dict:
    """The run's settings: saved ones (resume) or defaults, with what the command line gave on top."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "out")}
    if isinstance(given.get("corpus"), str):
        given["corpus"] = [c.strip() for c in given["corpus"].split(",") if c.strip()]
    if saved is not None:
        for k in RUN_FIELDS:
            if k in given and given[k] != saved.get(k):
                raise TrainError(f"--{k.replace('_', '-')} {given[k]} differs from this run's {saved.get(k)}; "
                                 f"a resumed run keeps its settings (start a new run in another --out)")
        s = dict(saved)
        for k in SESSION_FIELDS:  # per session: from this command line, else the run's (never its stop/export)
            if k in ("stop_at", "export", "export_dtype"):
                s[k] = given.get(k, DEFAULTS[k])
            else:
                s[k] = given.get(k, saved.get(k, DEFAULTS[k]))
        return s
    if "stage" not in given:
        raise TrainError("--stage is required (warmup, memory or sft)")
    if "model" not in given and "preset" not in given:
        raise TrainError("give --model DIR (a model or run directory) or --preset NAME")
    if "tokenizer" in given and "preset" not in given:
        raise TrainError("--tokenizer goes with --preset: a model or run directory brings its own")
    s = dict(DEFAULTS, corpus=list(D.DEFAULT_CORPUS))
    s.update(given)
    if s["steps"] <= 0 or s["batch"] <= 0 or s["seq_len"] <= 1:
        raise TrainError("--steps, --batch and --seq-len must be positive (seq-len at least 2)")
    if s["save_every"] <= 0 or s["log_every"] <= 0 or s["eval_every"] < 0:
        raise TrainError("--save-every and --log-every must be positive, --eval-every at least 0")
    s.setdefault("lr", STAGE_LR[s["stage"]])
    s.setdefault("min_lr", s["lr"] / 10)
    s.setdefault("warmup_steps", min(100, s["steps"] // 10))
    return s


def lr_at(step: int, s: dict) -> float:
    """Learning rate of 1-based step `step`: linear warmup, then cosine to min_lr, or constant then a linear
    decay to min_lr over the last decay_frac of the steps (WSD)."""
    lr, lo, total, warm = s["lr"], s["min_lr"], s["steps"], s["warmup_steps"]
    if warm and step <= warm:
        return lr * step / warm
    if s["schedule"] == "wsd":
        start = max(warm, total - int(round(s["decay_frac"] * total)))
        if step <= start:
            return lr
        return lr + (lo - lr) * (step - start) / max(1, total - start)
    progress = (step - warm) / max(1, total - warm)
    return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------- processes


@dataclass
class Proc:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def _start(device: str) -> Proc:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Proc(rank, world, dev)


def sync_grads(params: list[torch.Tensor], proc: Proc) -> None:
    """Sum the gradients over the processes (one all-reduce of them all, flattened)."""
    if proc.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    off = 0
    for p, g in zip(params, grads):
        p.grad = flat[off:off + g.numel()].view_as(p)
        off += g.numel()


def optimizer_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], proc: Proc, grad_clip: float) -> None:
    """Sum the gradients over the processes, clip their global norm (0: off), step, and clear them."""
    sync_grads(params, proc)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def use_bf16(mode: str, device: torch.device) -> bool:
    if mode in ("on", "off"):
        return mode == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # oneDNN's own test: AVX-512 (or newer) cores, where bf16 matmul beats fp32; emulated bf16 is slower
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Log:
    """Progress lines to stdout and RUN_DIR/train.log (the main process only)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / LOG
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


# ------------------------------------------------------------------------------------------- model


def _empty_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg, seed=None)
    return model.to_empty(device="cpu")


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a bad file may fail in many ways; the user needs one line
        raise TrainError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise TrainError(f"{path} is not an m3lite training checkpoint")
    if state.get("version") != CKPT_VERSION:
        raise TrainError(f"{path} has checkpoint version {state.get('version')}; this trainer reads {CKPT_VERSION}")
    return state


def model_from_run(run_dir: Path) -> tuple[Transformer, Path, dict]:
    """The model of a run directory's checkpoint, its tokenizer, and the checkpoint."""
    state = load_checkpoint(run_dir / CKPT)
    model = _empty_model(ModelConfig.from_json(state["config"]))
    model.load_state_dict(state["model"])
    return model, run_dir / TOKENIZER, state


def initial_model(s: dict, log: Log) -> tuple[Transformer, Path]:
    """A new run's starting model and tokenizer: a run's checkpoint, a model directory, or a fresh preset."""
    if s.get("model"):
        src = Path(s["model"])
        if (src / CKPT).is_file():
            model, tok, _ = model_from_run(src)
            return model, tok
        if not (src / CONFIG_FILE).is_file():
            raise TrainError(f"{src} is neither a model directory ({CONFIG_FILE}) nor a run directory ({CKPT})")
        files = ModelFiles.open(src)
        return from_stacked(files.config, files.weights), files.tokenizer_path
    cfg = ModelConfig.preset(s["preset"])
    if s.get("tokenizer"):
        tok = Path(s["tokenizer"])
        from m3lite.tokenizer import Tokenizer

        n = Tokenizer(tok).vocab_size
        if n != cfg.vocab_size:
            raise TrainError(f"tokenizer {tok} has {n} pieces; preset {cfg.name} needs {cfg.vocab_size}")
    else:
        tok = D.training_tokenizer(cfg.vocab_size, progress=log)
    return Transformer(cfg, seed=s["seed"]), tok


def _optimizer(model: Transformer, s: dict) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]},
                              {"params": other, "weight_decay": 0.0}], lr=s["lr"], betas=(0.9, 0.95), eps=1e-8)


# ------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    inputs: torch.Tensor  # [b, T] int64
    targets: torch.Tensor  # [b, T] int64, -1: no loss
    chunk_refs: list[list[list[int]]] | None  # [chunk][sequence] -> reference rows, or None (no memory)


def make_batch(stage: str, d: D.StageData, idx: np.ndarray, cfg: ModelConfig, device: torch.device) -> Batch:
    a = d.arrays
    if stage in ("warmup", "memory"):
        seqs = torch.from_numpy(a["sequences"][idx].astype(np.int64))
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        refs = None
        if stage == "memory":
            got = a["retrieved"][idx]  # [b, n_chunks]
            window = cfg.retrieval_top_k
            refs = [[list(dict.fromkeys(int(r) for r in got[b, max(0, c - window + 1):c + 1][::-1] if r >= 0))
                     for b in range(len(idx))] for c in range(got.shape[1])]
        return Batch(inputs.to(device), targets.to(device), refs)
    samples = [d.sample(int(i)) for i in idx]
    T = max(len(x) for x in samples) - 1
    inputs = np.full((len(idx), T), PAD, np.int64)
    targets = np.full((len(idx), T), -1, np.int64)
    for b, (i, x) in enumerate(zip(idx, samples)):
        start = int(a["qa_start"][i])
        inputs[b, :len(x) - 1] = x[:-1]
        targets[b, start - 1:len(x) - 1] = x[start:]  # predict the answer and EOS, nothing of the prompt
    per_sample = [[int(r) for r in a["qa_refs"][i] if r >= 0] for i in idx]
    n_chunks = -(-T // cfg.retrieval_interval)
    return Batch(torch.from_numpy(inputs).to(device), torch.from_numpy(targets).to(device),
                 [per_sample] * n_chunks)


def loss_tokens(stage: str, d: D.StageData, idx: np.ndarray, seq_len: int) -> tuple[int, int]:
    """(tokens that carry loss, input tokens) of the items idx, computed from the data alone so that every
    process knows the global batch's counts without communicating."""
    if stage != "sft":
        return len(idx) * seq_len, len(idx) * seq_len
    lengths = np.diff(d.arrays["qa_offsets"])[idx]
    return int((lengths - d.arrays["qa_start"][idx]).sum()), int((lengths - 1).sum())


def batch_memories(model: Transformer, refs: D.ReferenceSet, chunk_refs, device: torch.device):
    """Encode every reference the batch uses once (in the forward pass, with gradients) and hand each chunk and
    sequence its own memories, as forward_with_memory_parallel takes them."""
    rows = sorted({r for chunk in chunk_refs for seq in chunk for r in seq})
    if not rows:
        return None
    tokens, lengths = refs.padded(rows)
    mem = encode_memory(model, torch.from_numpy(tokens).to(device), torch.from_numpy(lengths).to(device))
    where = {r: j for j, r in enumerate(rows)}
    return [[mem[[where[r] for r in seq]] if seq else None for seq in chunk] for chunk in chunk_refs]


def loss_sum(model: Transformer, stage: str, batch: Batch, refs: D.ReferenceSet | None,
             device: torch.device) -> torch.Tensor:
    """Summed cross-entropy over the batch's loss tokens (fp32 whatever the autocast dtype)."""
    if stage == "warmup":
        logits = model(batch.inputs)
    else:
        memories = batch_memories(model, refs, batch.chunk_refs, device)
        logits = forward_with_memory_parallel(model, batch.inputs, memories)
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=-1, reduction="sum")


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model, stage, d: D.StageData, refs, s: dict, proc: Proc, cfg: ModelConfig, bf16: bool) -> float:
    """Mean loss over a fixed set of held-out items (the same for every evaluation), split across processes."""
    n = min(s["eval_seqs"], len(d))
    order = np.random.Generator(np.random.PCG64(EVAL_SEED)).permutation(len(d))[:n]
    mine = order[proc.rank::proc.world]
    per = max(1, s["batch"] // proc.world)
    total, count = 0.0, 0
    for i in range(0, len(mine), per):
        idx = mine[i:i + per]
        with _autocast(proc.device, bf16):
            total += float(loss_sum(model, stage, make_batch(stage, d, idx, cfg, proc.device), refs, proc.device))
        count += loss_tokens(stage, d, idx, s["seq_len"])[0]
    total, count = proc.sum([total, float(count)])
    return total / max(count, 1.0)


# ------------------------------------------------------------------------------------------- files


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class CsvLog:
    def __init__(self, path: Path, fields: tuple[str, ...], keep_until: int | None):
        """Open `path` for appending; rows after step `keep_until` (written after the checkpoint a run resumes
        from) are dropped, so the log continues exactly where the checkpoint is."""
        self.path, self.fields = path, fields
        rows = _rows(path) if keep_until is not None else []
        rows = [r for r in rows if int(r["step"]) <= (keep_until or 0)]
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    def add(self, row: dict) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)


def write_chart(run_dir: Path) -> None:
    loss = _rows(run_dir / LOSS_CSV)
    ev = _rows(run_dir / EVAL_CSV)
    series = [([float(r["step"]) for r in loss], [float(r["loss"]) for r in loss]),
              ([float(r["step"]) for r in ev], [float(r["eval_loss"]) for r in ev])]
    atomic_write_bytes(run_dir / LOSS_PNG, loss_chart(series))


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------------- training


def train(args: argparse.Namespace) -> int:
    run_dir = Path(args.out)
    if args.stage == "distill" or (args.resume and args.stage is None and (run_dir / RUN_JSON).is_file() and
                                   json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8")).get("stage")
                                   == "distill"):
        from . import distill

        return distill.run(args, sys.modules[__name__])
    saved = None
    if args.resume:
        if not (run_dir / RUN_JSON).is_file() or not (run_dir / CKPT).is_file():
            raise TrainError(f"nothing to resume in {run_dir}: it has no {RUN_JSON} and {CKPT}")
        saved = json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8"))
    elif (run_dir / CKPT).is_file():
        raise TrainError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
    s = _resolve(args, saved)
    proc = _start(s["device"])
    log = Log(run_dir, proc.main)
    if proc.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    proc.barrier()

    stage = s["stage"]
    if saved is None:
        # the main process first: it may train (and cache) the tokenizer the others then find
        if proc.main:
            model, tok_src = initial_model(s, log)
        proc.barrier()
        if not proc.main:
            model, tok_src = initial_model(s, log)
        if proc.main:
            if Path(tok_src).resolve() != (run_dir / TOKENIZER).resolve():
                shutil.copyfile(tok_src, run_dir / TOKENIZER)
            s["config"] = model.cfg.to_dict()
            atomic_write_bytes(run_dir / RUN_JSON, json.dumps(s, indent=1, sort_keys=True).encode())
        proc.barrier()
        state = None
    else:
        model, _, state = model_from_run(run_dir)
    cfg = model.cfg
    if s["seq_len"] > cfg.max_seq_len:
        raise TrainError(f"--seq-len {s['seq_len']} exceeds the model's max_seq_len {cfg.max_seq_len}")
    model.to(proc.device)
    bf16 = use_bf16(s["bf16"], proc.device)

    spec = D.DataSpec(tokenizer=str(run_dir / TOKENIZER), seq_len=s["seq_len"], corpus=tuple(s["corpus"]),
                      max_docs=s["max_docs"], dict_max_chars=s["dict_max_chars"],
                      reference_max_tokens=cfg.reference_max_tokens, chunk=cfg.retrieval_interval,
                      top_k=cfg.retrieval_top_k)

    def load(split: str) -> D.StageData:
        # the main process prepares (and caches) the data; the others read the cache
        if proc.main:
            d = D.load_stage(stage, spec, split, s["data_dir"], progress=log)
        proc.barrier()
        return d if proc.main else D.load_stage(stage, spec, split, s["data_dir"])

    data = load("train")
    refs = data.refs if stage != "warmup" else None
    held = load("heldout") if s["eval_every"] else None
    held_refs = held.refs if held is not None and stage != "warmup" else None
    if len(data) == 0:
        raise TrainError("the training data is empty: use more documents or a shorter --seq-len")

    opt = _optimizer(model, s)
    step, tokens, elapsed = 0, 0, 0.0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step, tokens, elapsed = int(state["step"]), int(state["tokens"]), float(state["elapsed"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["samples"] != step * s["batch"]:
            raise TrainError(f"checkpoint data position {state['samples']} does not match step {step}")
    loss_log = eval_log = None
    if proc.main:
        loss_log = CsvLog(run_dir / LOSS_CSV, ("step", "tokens", "loss", "lr", "seconds", "stage"),
                          step if state is not None else None)
        eval_log = CsvLog(run_dir / EVAL_CSV, ("step", "tokens", "eval_loss", "stage"),
                          step if state is not None else None)
    log(f"{stage}: {cfg.name} model, {model.n_params():,} parameters, {len(data):,} training items, "
        f"{proc.world} process(es) on {proc.device}, bf16 {'on' if bf16 else 'off'}, "
        f"{'resuming at step ' + str(step) if step else 'from step 0'} of {s['steps']}")

    def save() -> None:
        if proc.main:
            _save_checkpoint(run_dir / CKPT, {
                "format": CKPT_FORMAT, "version": CKPT_VERSION, "stage": stage, "step": step,
                "samples": step * s["batch"], "tokens": tokens, "elapsed": elapsed, "config": cfg.to_json(),
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": {"torch": torch.get_rng_state()}})
            write_chart(run_dir)
        proc.barrier()

    params = list(model.parameters())
    t_session = time.perf_counter()
    t_mark, tok_mark, step_mark = t_session, tokens, step
    elapsed0 = elapsed
    stop = min(s["steps"], s["stop_at"]) if s.get("stop_at") else s["steps"]
    model.train()
    while step < stop:
        lr = lr_at(step + 1, s)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = D.batch_indices(len(data), step, s["batch"], s["seed"], proc.rank, proc.world)
        everyone = D.batch_indices(len(data), step, s["batch"], s["seed"])
        n_loss, n_tok = loss_tokens(stage, data, everyone, s["seq_len"])
        batch = make_batch(stage, data, idx, cfg, proc.device)
        with _autocast(proc.device, bf16):
            total = loss_sum(model, stage, batch, refs, proc.device)
        # sum over this process's tokens / the global batch's tokens; summing the gradients over the processes
        # then gives exactly the single-process gradient of the global mean
        (total / n_loss).backward()
        optimizer_step(opt, params, proc, s["grad_clip"])
        step += 1
        tokens += n_tok
        loss = proc.sum([float(total.detach())])[0] / n_loss
        elapsed = elapsed0 + time.perf_counter() - t_session
        if not math.isfinite(loss):
            raise TrainError(f"the loss is {loss} at step {step}; lower --lr or check the data")
        if proc.main:
            loss_log.add({"step": step, "tokens": tokens, "loss": f"{loss:.7f}", "lr": f"{lr:.6g}",
                          "seconds": f"{elapsed:.2f}", "stage": stage})
        if step % s["log_every"] == 0 or step == stop:
            now = time.perf_counter()
            rate = (tokens - tok_mark) / max(now - t_mark, 1e-9)
            per_step = (now - t_mark) / max(step - step_mark, 1)
            log(f"{stage} step {step}/{s['steps']} loss {loss:.4f} lr {lr:.2e} {rate:,.0f} tok/s "
                f"ETA {_eta(per_step * (s['steps'] - step))}")
            t_mark, tok_mark, step_mark = now, tokens, step
        if held is not None and (step % s["eval_every"] == 0 or step == s["steps"]):
            model.eval()
            ev = evaluate(model, stage, held, held_refs, s, proc, cfg, bf16)
            model.train()
            log(f"{stage} step {step} held-out loss {ev:.4f}")
            if proc.main:
                eval_log.add({"step": step, "tokens": tokens, "eval_loss": f"{ev:.7f}", "stage": stage})
        if step % s["save_every"] == 0 and step != stop:
            save()
    save()
    if step < s["steps"]:
        log(f"stopped at step {step} of {s['steps']}; continue with --resume --out {run_dir}")
    elif s.get("export") and proc.main:
        fp = export_model(model, run_dir / TOKENIZER, s["export"], dtype=s.get("export_dtype") or "float32")
        log(f"exported to {s['export']} (fingerprint {fp})")
    proc.barrier()
    return 0


def export_model(model: Transformer, tokenizer: Path, out: str | os.PathLike, dtype: str = "float32") -> str:
    from .export_onnx import export

    cpu = _empty_model(model.cfg)
    cpu.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return export(cpu, tokenizer, out, dtype=dtype)


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.train export",
                                description="Write a run's checkpoint as an m3lite model directory.")
    p.add_argument("run_dir", help="a training run directory")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--dtype", default="float32", choices=FLOAT_DTYPES,
                   help="how the weights are stored: float16 halves the files, the math stays float32 "
                        "(default float32)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / CKPT).is_file():
        raise TrainError(f"{run_dir} has no {CKPT}: not a training run, or it has not saved yet")
    model, tok, state = model_from_run(run_dir)
    fp = export_model(model, tok, args.out, dtype=args.dtype)
    print(f"{args.out}: {model.cfg.name} model ({args.dtype}) from {run_dir} step {state['step']}, "
          f"fingerprint {fp}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["export"]:
            return export_main(argv[1:])
        return train(_parser().parse_args(argv))
    except (M3Error, BadArgument) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
