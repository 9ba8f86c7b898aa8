"""Memory distillation: teach an imported model to answer from explicit memory as it answers with the text in its
prompt (RAG), by training a LoRA adapter.

    python -m converters.distill_data --model DIR --out DATA                       # questions + teacher answers
    python -m converters.train --stage distill --model DIR --data DATA --out RUN --steps 600
    python -m converters.train --stage distill --resume --out RUN                  # continue exactly
    m3lite import SRC --adapter RUN/adapter.safetensors --out MODEL                # merged, then int8

Teacher: the frozen model reading the reference text in its prompt; its answers and top-k log-probs per answer
token were computed once by `converters.distill_data`. Student: the same model plus LoRA, reading the
references as explicit memory the way the runtime does (`encode_memory` of [marker] + text at positions
0..n-1, the prompt without references at positions reference_max_tokens.., memory attention at the model's
memory layers). Loss: KL(teacher || student) over the answer tokens, the teacher's top-k renormalised.
Only the adapter trains; the memory settings are the model directory's (import it with --memory-layers and
--memory-tokens first). With --memory-grad on (default) gradients also reach the adapter through the memories'
keys and values (the model learns to write memories as well as to read them). With --memory-quant pq the student
reads its memories product-quantized as a `--quant pq` bank stores them (quantization-aware distillation:
converters/pq_torch.py): the valid keys and values are replaced by their nearest-centroid reconstruction, with a
straight-through gradient; the codebooks are trained by k-means on the current student's memories of a fixed
sample of training references at the start and every --pq-refresh steps. --init-adapter FILE starts the LoRA from
an earlier adapter of the same base, rank and memory settings instead of zero (e.g. the shipped one, to adapt it
to pq memories in a few hundred steps rather than from scratch).

A run directory holds run.json, checkpoint.pt (adapter, optimizer, step, the pq codebooks; weights_only),
adapter.safetensors (written with every checkpoint), loss.csv, eval.csv, loss.png and train.log.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from m3lite import pq as PQ
from m3lite.adapter import KINDS
from m3lite.modelfile import ModelFiles, atomic_write_bytes

from . import data as D
from . import distill_data as DD
from .lora import add_lora, lora_modules, save_adapter
from .model import encode_memory, forward_with_memory_parallel, from_stacked
from .pq_torch import fake_quant_memory, relative_error, train_codebooks

CKPT_FORMAT, CKPT_VERSION = "m3lite-distill", 1
ADAPTER = "adapter.safetensors"
RUN_FIELDS = ("model", "data", "steps", "batch", "lr", "min_lr", "warmup_steps", "schedule", "decay_frac",
              "rank", "alpha", "kinds", "memory_grad", "grad_clip", "seed", "eval_every", "eval_items",
              "memory_quant", "pq_refresh", "pq_refs", "init_adapter")
# settings added after runs existed: a run.json without them had these values
LATER_FIELDS = dict(memory_quant="none", pq_refresh=100, pq_refs=PQ.TRAIN_REFS, init_adapter=None)
DEFAULTS = dict(steps=600, batch=4, lr=5e-4, schedule="cosine", decay_frac=0.2, rank=16, alpha=32.0,
                kinds=",".join(KINDS), memory_grad="on", grad_clip=1.0, seed=0, eval_every=50, eval_items=32,
                save_every=50, log_every=10, stop_at=None, device="auto", bf16="auto", retrieval_top_k=None,
                **LATER_FIELDS)
EVAL_EVERY_NTH = 20  # item i with i % 20 == 0 is held out of training for the evaluation loss
PQ_SALT = 0x5051  # keeps the pq draws apart from the data order's (both start from the run's seed)
PQ_ENCODE_BATCH = 32  # references per encode_memory call when the codebooks are trained


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The distill stage's own options on the trainer's parser."""
    a = p.add_argument
    a("--data", help="distill: the folder made by python -m converters.distill_data")
    a("--rank", type=int, help="distill: LoRA rank (default 16)")
    a("--alpha", type=float, help="distill: LoRA alpha; updates are scaled by alpha/rank (default 32)")
    a("--kinds", help="distill: weights that get LoRA, comma-separated (default wq,wk,wv,wo,w1,w3,w2)")
    a("--eval-items", type=int, help="distill: held-out items in each evaluation (default 32)")
    a("--retrieval-top-k", type=int, help="distill: references per retrieval the adapted model should read, "
                                          "written into the adapter (the model takes it at import; default: "
                                          "the model's own)")
    a("--memory-grad", choices=("on", "off"), help="distill: let gradients reach the adapter through the "
                                                   "memories' keys and values (default on)")
    a("--memory-quant", choices=("none", "pq"),
      help="distill: pq trains with the memories product-quantized as a --quant pq bank stores them "
           "(nearest-centroid keys and values, straight-through gradient; default none)")
    a("--pq-refresh", type=int, help="distill, --memory-quant pq: retrain the codebooks on the current student's "
                                     "memories every N steps (default 100)")
    a("--init-adapter", help="distill: start the LoRA from this adapter (.safetensors of an earlier distill run for "
                             "the same base, rank and kinds) instead of zero, e.g. to adapt the shipped memory "
                             "adapter to --memory-quant pq; default: from zero")
    a("--pq-refs", type=int, help=f"distill, --memory-quant pq: training references whose memories train the "
                                  f"codebooks (a fixed sample; default {PQ.TRAIN_REFS}, as a pq bank)")


def resolve(args: argparse.Namespace, saved: dict | None, parent) -> dict:
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "out")}
    if saved is not None:
        saved = {**LATER_FIELDS, **saved}
        for k in RUN_FIELDS:
            if k in given and given[k] != saved.get(k):
                raise parent.TrainError(f"--{k.replace('_', '-')} {given[k]} differs from this run's "
                                        f"{saved.get(k)}; a resumed run keeps its settings")
        s = dict(saved)
        for k in ("stop_at", "save_every", "log_every", "device", "bf16", "retrieval_top_k"):
            s[k] = given.get(k, DEFAULTS[k] if k == "stop_at" else saved.get(k, DEFAULTS[k]))
        return s
    if "model" not in given or "data" not in given:
        raise parent.TrainError("--stage distill needs --model DIR (an m3lite model directory) and --data DATA")
    s = dict(DEFAULTS)
    s.update({k: v for k, v in given.items() if k in set(RUN_FIELDS) | set(DEFAULTS) | {"stage", "export"}})
    if s["steps"] <= 0 or s["batch"] <= 0 or s["rank"] <= 0:
        raise parent.TrainError("--steps, --batch and --rank must be positive")
    kinds = [k.strip() for k in str(s["kinds"]).split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        raise parent.TrainError(f"--kinds must name some of {','.join(KINDS)}")
    s["kinds"] = ",".join(kinds)
    if s["memory_quant"] != "pq" and ("pq_refresh" in given or "pq_refs" in given):
        raise parent.TrainError("--pq-refresh and --pq-refs go with --memory-quant pq")
    if s["pq_refresh"] <= 0 or s["pq_refs"] <= 0:
        raise parent.TrainError("--pq-refresh and --pq-refs must be positive")
    s.setdefault("min_lr", s["lr"] / 10)
    s.setdefault("warmup_steps", min(20, s["steps"] // 10))
    return s


def init_lora(model, path: str, s: dict, parent) -> None:
    """Copy an adapter file's LoRA pairs into the model's fresh LoRA modules: the same base shape, rank, alpha and
    kinds, every pair present (anything else is refused before training starts)."""
    from m3lite.adapter import AdapterError, read_adapter

    try:
        ad = read_adapter(path)
        ad.check(model.cfg)
    except (AdapterError, OSError) as e:
        raise parent.TrainError(f"--init-adapter: {e}") from None
    if int(ad.meta["rank"]) != s["rank"] or float(ad.meta["alpha"]) != float(s["alpha"]):
        raise parent.TrainError(f"--init-adapter {path} has rank {ad.meta['rank']} and alpha {ad.meta['alpha']}; "
                                f"this run has --rank {s['rank']} --alpha {s['alpha']}")
    cfg = model.cfg
    if list(ad.meta["memory_layers"]) != list(cfg.memory_layer_ids) or \
            int(ad.meta["memory_tokens_per_head"]) != int(cfg.memory_tokens_per_head):
        raise parent.TrainError(f"--init-adapter {path} was trained with other memory settings (layers, tokens per "
                                f"head) than {s['model']}")
    mods = {(kind, layer): m for kind, layer, m in lora_modules(model)}
    if set(mods) != set(ad.pairs):
        raise parent.TrainError(f"--init-adapter {path} adapts other weights than --kinds {s['kinds']} of every "
                                f"layer")
    with torch.no_grad():
        for key, m in mods.items():
            a, b = ad.pairs[key]
            m.lora_a.copy_(torch.from_numpy(np.asarray(a, np.float32)))
            m.lora_b.copy_(torch.from_numpy(np.asarray(b, np.float32)))


def base_model(model_dir: str, parent):
    """The imported (or trained-here) model as a float32 reference Transformer, its reference marker set."""
    from m3lite.tokenizer import load_tokenizer

    files = ModelFiles.open(model_dir)
    tok = load_tokenizer(files.tokenizer_path, files.manifest.get("tokenizer"))
    if tok.ref_id < 0:
        raise parent.TrainError(f"{model_dir}: the tokenizer has no reference marker")
    model = from_stacked(files.config, files.weights)
    model.ref_id = tok.ref_id
    name = files.manifest.get("source", {}).get("name") or files.config.name
    return model, files, name


class Items:
    """The prepared items as batches: student tokens, answer positions, teacher top-k and references."""

    def __init__(self, data_dir: str, files: ModelFiles, parent):
        self.meta, self.items, self.offsets, self.top, self.logp = DD.load(data_dir)
        same = self.meta.get("weights_sha256") == files.manifest["weights"]["sha256"] or \
            self.meta.get("fingerprint") == files.fingerprint
        if not same:
            raise parent.TrainError(f"{data_dir} was prepared with another model ({self.meta.get('model')}); its "
                                    f"teacher answers do not fit these weights")
        n = len(self.items)
        self.eval_ids = np.arange(0, n, EVAL_EVERY_NTH)
        self.train_ids = np.setdiff1d(np.arange(n), self.eval_ids)

    def batch(self, ids: np.ndarray, model, device: torch.device):
        cfg = model.cfg
        its = [self.items[int(i)] for i in ids]
        seqs = [it["student"] + it["answer_ids"][:-1] for it in its]
        T = max(len(x) for x in seqs)
        tokens = torch.zeros(len(its), T, dtype=torch.long)
        rows, cols, top, logp = [], [], [], []
        for b, (i, it, x) in enumerate(zip(ids, its, seqs)):
            tokens[b, :len(x)] = torch.tensor(x)
            start = len(it["student"]) - 1
            n = len(it["answer_ids"])
            rows += [b] * n
            cols += list(range(start, start + n))
            a, e = self.offsets[int(i)], self.offsets[int(i) + 1]
            top.append(self.top[a:e])
            logp.append(self.logp[a:e])
        refs = [r for it in its for r in it["refs"]]
        counts = [len(it["refs"]) for it in its]  # 0: a question asked without references (plain model)
        L = max((len(r) for r in refs), default=1)
        ref_tokens = torch.zeros(len(refs), L, dtype=torch.long)
        for j, r in enumerate(refs):
            ref_tokens[j, :len(r)] = torch.tensor(r[:cfg.reference_max_tokens])
        lengths = torch.tensor([min(len(r), cfg.reference_max_tokens) for r in refs])
        return {"tokens": tokens.to(device), "rows": torch.tensor(rows, device=device),
                "cols": torch.tensor(cols, device=device),
                "top": torch.from_numpy(np.concatenate(top).astype(np.int64)).to(device),
                "logp": torch.from_numpy(np.concatenate(logp).astype(np.float32)).to(device),
                "ref_tokens": ref_tokens.to(device), "lengths": lengths.to(device), "counts": counts}


def kl_sum(model, batch: dict, memory_grad: bool, codebooks: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed KL(teacher || student) over the batch's answer tokens, and their number. The student reads each
    item's references as memory; an item without references is the plain model (positions from 0, no memory
    layer prefix), as `ask --mode none` runs it. codebooks (pq codebooks, m3lite.pq's layout): the student reads
    its memories quantized with them (straight-through)."""
    cfg = model.cfg
    counts = batch["counts"]
    with_mem = [b for b, c in enumerate(counts) if c]
    plain = [b for b, c in enumerate(counts) if not c]  # asked without references: the plain model, as `--mode none`
    parts = []
    if with_mem:
        if memory_grad:
            mem = encode_memory(model, batch["ref_tokens"], batch["lengths"])
        else:
            with torch.no_grad():
                mem = encode_memory(model, batch["ref_tokens"], batch["lengths"]).detach()
        if codebooks is not None:
            mem = fake_quant_memory(mem, codebooks)
        per_seq, j = [], 0
        for c in counts:
            if c:
                per_seq.append(mem[list(range(j, j + c))])
            j += c
        T = batch["tokens"].shape[1]
        n_chunks = -(-T // cfg.retrieval_interval)
        parts.append(forward_with_memory_parallel(model, batch["tokens"][with_mem], [per_seq] * n_chunks))
    if plain:
        parts.append(model(batch["tokens"][plain]))
    logits = torch.cat(parts) if len(parts) > 1 else parts[0]
    where = torch.empty(len(counts), dtype=torch.long, device=logits.device)
    where[with_mem + plain] = torch.arange(len(counts), device=logits.device)
    sel = logits[where[batch["rows"]], batch["cols"]].float()  # [N, V]
    student = torch.log_softmax(sel, dim=-1).gather(1, batch["top"])
    teacher = torch.log_softmax(batch["logp"], dim=-1)  # the top-k, renormalised
    kl = (teacher.exp() * (teacher - student)).sum()
    return kl, int(sel.shape[0])


def pq_references(data: Items, n: int, seed: int) -> list[list[int]]:
    """The fixed sample of references whose memories train the pq codebooks: n distinct references of the
    training items (all of them when fewer), drawn with the run's seed, in their order of first appearance."""
    seen: dict[tuple, None] = {}
    for i in data.train_ids:
        for r in data.items[int(i)]["refs"]:
            seen.setdefault(tuple(r), None)
    refs = list(seen)
    pick = np.sort(np.random.default_rng([seed, PQ_SALT]).permutation(len(refs))[:n])
    return [list(refs[j]) for j in pick]


@torch.no_grad()
def train_pq(model, refs: list[list[int]], seed: int, step: int, device: torch.device, autocast) \
        -> tuple[torch.Tensor, float, float, int]:
    """Codebooks (m3lite.pq's layout, on `device`) trained by k-means on the current model's memories of `refs`:
    at most m3lite.pq.SAMPLE valid (reference, slot) vectors, drawn, like the k-means starts, from (seed, step)
    only, so a run retraining them at the same step with the same weights gets the same codebooks. Also the
    relative reconstruction errors of the sample's keys and values, and the sample's size."""
    cfg = model.cfg
    K = cfg.memory_tokens_per_head
    lengths = [min(len(r), cfg.reference_max_tokens) for r in refs]
    slots = [(j, t) for j, n in enumerate(lengths) for t in range(min(K, n - 1))]
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, PQ_SALT]).generate_state(1)[0]))
    chosen = torch.arange(len(slots))
    if len(slots) > PQ.SAMPLE:
        chosen = torch.randperm(len(slots), generator=g)[:PQ.SAMPLE].sort().values
    by_ref: dict[int, list[int]] = {}
    for c in chosen.tolist():
        j, t = slots[c]
        by_ref.setdefault(j, []).append(t)
    wanted = sorted(by_ref)
    keys, values = [], []
    for a in range(0, len(wanted), PQ_ENCODE_BATCH):
        rows = wanted[a:a + PQ_ENCODE_BATCH]
        width = max(lengths[j] for j in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for b, j in enumerate(rows):
            tokens[b, :lengths[j]] = torch.tensor(refs[j][:lengths[j]])
        with autocast():
            mem = encode_memory(model, tokens.to(device), torch.tensor([lengths[j] for j in rows], device=device))
        rb = torch.tensor([b for b, j in enumerate(rows) for _ in by_ref[j]], device=device)
        tb = torch.tensor([t for j in rows for t in by_ref[j]], device=device)
        keys.append(mem.keys[rb, :, :, tb].float())  # [n, Lm, H, hd]
        values.append(mem.values[rb, :, :, tb].float())
    Lm, H, hd = len(cfg.memory_layer_ids), cfg.n_kv_heads, cfg.hd
    keys = torch.cat(keys) if keys else torch.zeros(0, Lm, H, hd, device=device)
    values = torch.cat(values) if values else torch.zeros(0, Lm, H, hd, device=device)
    cb = train_codebooks(keys, values, g)
    return cb, relative_error(keys, cb, 0), relative_error(values, cb, 1), len(keys)


def run(args: argparse.Namespace, parent) -> int:
    """The distill stage of `python -m converters.train` (parent: the train module, for its shared pieces)."""
    run_dir = Path(args.out)
    saved = None
    if args.resume:
        if not (run_dir / parent.RUN_JSON).is_file() or not (run_dir / parent.CKPT).is_file():
            raise parent.TrainError(f"nothing to resume in {run_dir}: it has no {parent.RUN_JSON} and {parent.CKPT}")
        saved = json.loads((run_dir / parent.RUN_JSON).read_text(encoding="utf-8"))
    elif (run_dir / parent.CKPT).is_file():
        raise parent.TrainError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
    s = resolve(args, saved, parent)
    proc = parent._start(s["device"])
    log = parent.Log(run_dir, proc.main)
    if proc.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    model, files, base_name = base_model(s["model"], parent)
    data = Items(s["data"], files, parent)
    params = add_lora(model, s["rank"], s["alpha"], s["kinds"].split(","), seed=s["seed"])
    if s["init_adapter"] and saved is None:  # a resumed run has its checkpoint's LoRA
        init_lora(model, s["init_adapter"], s, parent)
    if saved is None and proc.main:
        s["config"] = model.cfg.to_dict()
        s["base_fingerprint"] = files.fingerprint
        atomic_write_bytes(run_dir / parent.RUN_JSON, json.dumps(s, indent=1, sort_keys=True).encode())
    elif saved is not None and saved.get("base_fingerprint") != files.fingerprint:
        raise parent.TrainError(f"{s['model']} changed since this run started (fingerprint); resume needs the same "
                                f"model directory")
    proc.barrier()
    model.to(proc.device)
    bf16 = parent.use_bf16(s["bf16"], proc.device)
    opt = torch.optim.AdamW(params, lr=s["lr"], betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    step, tokens, elapsed = 0, 0, 0.0
    pq_on = s["memory_quant"] == "pq"
    if pq_on:
        PQ.n_codes(model.cfg.hd)  # a head dimension pq can cut, or BadArgument now
    codebooks = None  # with --memory-quant pq: the codebooks the student reads its memories through
    if saved is not None:
        state = torch.load(run_dir / parent.CKPT, map_location="cpu", weights_only=True)
        if state.get("format") != CKPT_FORMAT or state.get("version") != CKPT_VERSION:
            raise parent.TrainError(f"{run_dir / parent.CKPT} is not a distill checkpoint of version {CKPT_VERSION}")
        for (kind, layer, m), (a, b) in zip(lora_modules(model), state["lora"]):
            m.lora_a.data.copy_(a)
            m.lora_b.data.copy_(b)
        opt.load_state_dict(state["optimizer"])
        step, tokens, elapsed = int(state["step"]), int(state["tokens"]), float(state["elapsed"])
        if pq_on:
            # the codebooks are stored with every checkpoint: they were trained on the weights of their refresh
            # step, which a run resumed later than that no longer has, so retraining could not reproduce them
            if "pq_codebooks" not in state:
                raise parent.TrainError(f"{run_dir / parent.CKPT} has no pq codebooks")
            codebooks = state["pq_codebooks"].to(proc.device)
    loss_log = eval_log = None
    if proc.main:
        loss_log = parent.CsvLog(run_dir / parent.LOSS_CSV, ("step", "tokens", "loss", "lr", "seconds", "stage"),
                                 step if saved is not None else None)
        eval_log = parent.CsvLog(run_dir / parent.EVAL_CSV, ("step", "tokens", "eval_loss", "stage"),
                                 step if saved is not None else None)
    memory_grad = s["memory_grad"] == "on"
    n_train = len(data.train_ids)
    log(f"distill: {base_name}, memory layers {model.cfg.memory_layer_ids[:3]}..({len(model.cfg.memory_layer_ids)}), "
        f"{model.cfg.memory_tokens_per_head} tokens/head; LoRA rank {s['rank']} on {s['kinds']}: "
        f"{sum(p.numel() for p in params):,} parameters; {n_train} items ({len(data.eval_ids)} held out), "
        f"batch {s['batch']}, {proc.world} process(es) on {proc.device}, "
        f"{'pq memories (codebooks every ' + str(s['pq_refresh']) + ' steps), ' if pq_on else ''}"
        f"{'resuming at step ' + str(step) if step else 'from step 0'} of {s['steps']}")

    def evaluate() -> float:
        model.eval()
        ids = data.eval_ids[:s["eval_items"]][proc.rank::proc.world]
        tot, cnt = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(ids), s["batch"]):
                with parent._autocast(proc.device, bf16):
                    kl, n = kl_sum(model, data.batch(ids[i:i + s["batch"]], model, proc.device), False, codebooks)
                tot, cnt = tot + float(kl), cnt + n
        model.train()
        tot, cnt = proc.sum([tot, float(cnt)])
        return tot / max(cnt, 1.0)

    pq_refs = pq_references(data, s["pq_refs"], s["seed"]) if pq_on else []

    def refresh_codebooks() -> None:
        """Retrain the codebooks on the current student's memories (every process the same: seeded by (seed,
        step), deterministic; the main process's are broadcast all the same)."""
        nonlocal codebooks
        t0 = time.perf_counter()
        model.eval()
        codebooks, key_err, value_err, n = train_pq(model, pq_refs, s["seed"], step, proc.device,
                                                    lambda: parent._autocast(proc.device, bf16))
        model.train()
        if proc.world > 1:
            parent.dist.broadcast(codebooks, 0)
        log(f"distill step {step} pq codebooks: relative error keys {key_err:.4f} values {value_err:.4f} "
            f"({n} vectors of {len(pq_refs)} references, {time.perf_counter() - t0:.1f} s)")

    def save() -> None:
        if proc.main:
            lora = [(m.lora_a.detach().cpu(), m.lora_b.detach().cpu()) for _, _, m in lora_modules(model)]
            state = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step, "tokens": tokens,
                     "elapsed": elapsed, "lora": lora, "optimizer": opt.state_dict()}
            if codebooks is not None:
                state["pq_codebooks"] = codebooks.detach().cpu()
            parent._save_checkpoint(run_dir / parent.CKPT, state)
            training = {"method": "distillation from RAG (KL on the teacher's answer tokens)", "data": data.meta,
                        "steps": step, "batch": s["batch"], "lr": s["lr"], "kinds": s["kinds"],
                        "memory_grad": s["memory_grad"], "memory_quant": s["memory_quant"],
                        "seconds": round(elapsed, 1)}
            if s.get("init_adapter"):
                training["init_adapter"] = Path(s["init_adapter"]).name
            if pq_on:
                training.update(pq_refresh=s["pq_refresh"], pq_refs=len(pq_refs))
            save_adapter(model, run_dir / ADAPTER, s["rank"], s["alpha"], base_name, training,
                         retrieval_top_k=s.get("retrieval_top_k"))
            parent.write_chart(run_dir)
        proc.barrier()

    stop = min(s["steps"], s["stop_at"]) if s.get("stop_at") else s["steps"]
    t_session = time.perf_counter()
    t_mark, step_mark, elapsed0 = t_session, step, elapsed
    if pq_on and codebooks is None:  # a fresh run (a resumed one has its checkpoint's)
        refresh_codebooks()
    if step == 0 and s["eval_every"]:
        ev = evaluate()
        log(f"distill step 0 held-out KL {ev:.4f}")
        if proc.main:
            eval_log.add({"step": 0, "tokens": 0, "eval_loss": f"{ev:.7f}", "stage": "distill"})
    model.train()
    while step < stop:
        lr = parent.lr_at(step + 1, s)
        for g in opt.param_groups:
            g["lr"] = lr
        pos = D.batch_indices(n_train, step, s["batch"], s["seed"], proc.rank, proc.world)
        everyone = D.batch_indices(n_train, step, s["batch"], s["seed"])
        n_all = sum(len(data.items[int(data.train_ids[i])]["answer_ids"]) for i in everyone)
        batch = data.batch(data.train_ids[pos], model, proc.device)
        with parent._autocast(proc.device, bf16):
            kl, n = kl_sum(model, batch, memory_grad, codebooks)
        (kl / n_all).backward()
        parent.optimizer_step(opt, params, proc, s["grad_clip"])
        step += 1
        tokens += n_all
        loss = proc.sum([float(kl.detach())])[0] / n_all
        elapsed = elapsed0 + time.perf_counter() - t_session
        if not math.isfinite(loss):
            raise parent.TrainError(f"the loss is {loss} at step {step}; lower --lr")
        if proc.main:
            loss_log.add({"step": step, "tokens": tokens, "loss": f"{loss:.7f}", "lr": f"{lr:.6g}",
                          "seconds": f"{elapsed:.2f}", "stage": "distill"})
        if step % s["log_every"] == 0 or step == stop:
            now = time.perf_counter()
            per_step = (now - t_mark) / max(step - step_mark, 1)
            log(f"distill step {step}/{s['steps']} KL {loss:.4f} lr {lr:.2e} {per_step:.2f} s/step "
                f"ETA {parent._eta(per_step * (s['steps'] - step))}")
            t_mark, step_mark = now, step
        if pq_on and (step % s["pq_refresh"] == 0 or step == s["steps"]):
            # after the step, so the evaluation and checkpoint of this step already use (and store) them
            refresh_codebooks()
        if s["eval_every"] and (step % s["eval_every"] == 0 or step == s["steps"]):
            ev = evaluate()
            log(f"distill step {step} held-out KL {ev:.4f}")
            if proc.main:
                eval_log.add({"step": step, "tokens": tokens, "eval_loss": f"{ev:.7f}", "stage": "distill"})
        if step % s["save_every"] == 0 and step != stop:
            save()
    save()
    if step < s["steps"]:
        log(f"stopped at step {step} of {s['steps']}; continue with --stage distill --resume --out {run_dir}")
    else:
        log(f"done: {run_dir / ADAPTER}; merge it with m3lite import SRC --adapter {run_dir / ADAPTER} --out DIR")
    proc.barrier()
    return 0
