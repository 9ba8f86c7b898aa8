"""Sharded bank builds: the documents are split into N contiguous parts, each part is built into a bank of its
own (in worker processes here, or as Ray tasks on a local Ray or a cluster), then the parts are merged in order
into the target bank. The result is the bank a single process builds from the same sources: the same
references in the same order, the same memories bit for bit, the same search results.

On disk, beside the target bank OUT:

    OUT.parts/plan.json        the split: shard count and each part's document ids and content hashes
    OUT.parts/NNN-of-MMM/      part NNN, an ordinary bank (resumable like any build)
    OUT.parts/NNN-of-MMM.done  written (atomically) when part NNN is complete

A part is merged only when every part is done, so a failed or killed worker's part is never half-merged: its
task is retried (it resumes the part's bank), and a rerun of the command resumes whatever is left: the parts
without a marker, then the merge (which skips documents already in OUT). The parts folder is removed after a
complete merge.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

from .bank import Bank
from .errors import BadArgument, M3Error
from .modelfile import atomic_write_bytes
from .sources import Document

PLAN = "plan.json"
RAY_RETRIES = 3  # attempts after the first for a part whose worker died


def split(docs: Sequence[Document], n: int) -> list[list[Document]]:
    """`docs` in n contiguous parts of about equal text size (deterministic; a part may be empty)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadArgument(f"--shards must be a positive integer, got {n!r}")
    sizes = [len(d.text) + 1 for d in docs]
    total = sum(sizes)
    parts: list[list[Document]] = [[] for _ in range(n)]
    run = 0
    for d, s in zip(docs, sizes):
        k = min(n - 1, (run * n) // max(total, 1))  # the part where the document starts
        parts[k].append(d)
        run += s
    return parts


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _part_name(k: int, n: int) -> str:
    return f"{k:03d}-of-{n:03d}"


def build_part(model_dir: str, part: str, docs: list[dict], quant: str, encode: str,
               threads: int | None = None) -> dict:
    """Build one part (in a worker process or a Ray task): the bank at `part` from documents given as dicts,
    then its done marker. Resumes a part a killed worker left. Returns the part's build statistics."""
    if threads:
        os.environ["M3LITE_THREADS"] = str(threads)
    from .memory import build_or_add
    from .model import Model

    st: dict = {"added": 0}
    if docs:  # a part may be empty, or hold only documents the target has already
        model = Model.load(model_dir)
        st = build_or_add(model, part, [Document(**d) for d in docs], quant=quant, encode=encode,
                          warn=lambda s: None)
    atomic_write_bytes(Path(part + ".done"), json.dumps(st).encode())
    return st


def _plan(out: Path, docs: list[Document], n: int) -> list[list[Document]]:
    """The split of a build started before (its plan.json), or a new one written now."""
    pd = parts_dir(out)
    plan_file = pd / PLAN
    by_hash = {d.sha256: d for d in docs}
    if plan_file.is_file():
        try:
            plan = json.loads(plan_file.read_text())
            planned = [h for p in plan["parts"] for h in p]
            if plan.get("shards") == n and planned == [d.sha256 for d in docs]:  # the same sources, in order
                return [[by_hash[h] for h in p] for p in plan["parts"]]
        except (ValueError, KeyError, TypeError):
            pass
    if pd.exists():  # another split (other sources or shard count), or no plan: start the parts again
        shutil.rmtree(pd)
    parts = split(docs, n)
    pd.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(plan_file, json.dumps({"shards": n, "parts": [[d.sha256 for d in p] for p in parts]}).encode())
    return parts


def build_sharded(model, model_dir: str | os.PathLike, out: str | os.PathLike, sources: Sequence[str | Document],
                  shards: int, quant: str = "int8", encode: str = "all", ray_address: str | None = None,
                  warn: Callable[[str], None] = print, progress: Callable[[int, int, str], None] | None = None,
                  runner: Callable = build_part) -> dict:
    """Build the bank `out` from `sources` in `shards` parts: in worker processes, or, with `ray_address`
    ("local": a Ray started here; else the address of a running cluster), as Ray tasks. `progress(done,
    total, what)` follows the parts, then the merge. Returns the merged bank's statistics."""
    from .memory import collect_documents

    out = Path(out)
    if quant == "pq":
        raise BadArgument("a pq bank is built in one process (its codebooks are trained on its first memories): "
                          "drop --shards")
    docs = collect_documents(sources, warn)
    if not docs:
        raise BadArgument("no documents found in the sources")
    if Bank.exists(out):  # a merge that was stopped: what it copied is not built again
        b = Bank.open(out, fingerprint=model.fingerprint)
        if b.lazy != (encode == "lazy") or b.quant != quant:
            raise M3Error(f"the bank at {out} was built with other settings; use another --out")
        present = b.live_hashes()
    else:
        present = set()
    parts = _plan(out, docs, shards)
    pd = parts_dir(out)
    paths = [str(pd / _part_name(k, shards)) for k in range(shards)]
    todo = [k for k in range(shards) if not Path(paths[k] + ".done").is_file()]
    jobs = {k: [dict(id=d.id, title=d.title, text=d.text, source=d.source) for d in parts[k]
                if d.sha256 not in present] for k in todo}
    done = shards - len(todo)
    if progress:
        progress(done, shards, "building parts")
    if ray_address:
        _run_ray(ray_address, runner, str(model_dir), paths, jobs, quant, encode, progress, done, shards)
    else:
        _run_local(runner, str(model_dir), paths, jobs, quant, encode, progress, done, shards)
    # every part is complete: merge them in order
    srcs = [Bank.open(p, fingerprint=model.fingerprint) for p in paths if Bank.exists(p)]
    if not Bank.exists(out):
        if not srcs:
            raise BadArgument("no documents found in the sources")
        first = srcs[0]
        Bank.create(out, first.fingerprint, first.shape, quant=first.quant, embed_dim=first.embed_dim,
                    meta=first.manifest.get("meta", {}), lazy=first.lazy)
    bank = Bank.open(out, fingerprint=model.fingerprint)
    total_refs = sum(b.count for b in srcs)
    merged = bank.merge(srcs, progress=(lambda st: progress(st["references"], total_refs, "merging parts"))
                        if progress else None)
    shutil.rmtree(pd, ignore_errors=True)
    return dict(merged, bank=str(out), count=bank.count, shards=shards, lazy=bank.lazy,
                memories=bank.encoded_count)


def _run_local(runner, model_dir, paths, jobs, quant, encode, progress, done, shards) -> None:
    """The parts in worker processes, as many at once as there are cores (each on its share of them)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if not jobs:
        return
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(runner, model_dir, paths[k], docs, quant, encode, threads): k for k, docs in jobs.items()}
        for f in as_completed(futs):
            try:
                f.result()
            except M3Error:
                raise
            except Exception as e:  # a worker that died (killed, out of memory): the part resumes on a rerun
                raise M3Error(f"part {futs[f]} of the build failed ({type(e).__name__}: {e}); run the same "
                              f"command again to resume") from None
            done += 1
            if progress:
                progress(done, shards, "building parts")


def _run_ray(address, runner, model_dir, paths, jobs, quant, encode, progress, done, shards) -> None:
    """The parts as Ray tasks, retried (resuming the part) when a worker dies."""
    try:
        import ray
    except ImportError:
        raise M3Error("--ray needs Ray: pip install 'm3lite[ray]'") from None
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as e:
            raise M3Error(f"cannot start or reach Ray at {address!r}: {str(e).splitlines()[0] if str(e) else e!r}") \
                from None
    task = ray.remote(num_cpus=1, max_retries=RAY_RETRIES)(runner)
    pending = {task.remote(model_dir, paths[k], docs, quant, encode, 1): k for k, docs in jobs.items()}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        k = pending.pop(ready[0])
        try:
            ray.get(ready[0])
        except Exception as e:
            for r in pending:
                ray.cancel(r)
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise M3Error(f"part {k} of the build failed on Ray after {RAY_RETRIES + 1} attempts ({first}); run "
                          f"the same command again to resume") from None
        done += 1
        if progress:
            progress(done, shards, "building parts")
