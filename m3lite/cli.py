"""The `m3lite` command: thin, parses options, calls the API, prints. Errors are one line and exit 2."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import M3Error

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


MODEL_HELP = "Model directory (config.json, model.onnx, model.onnx.data, tokenizer.model)."


def _model_dir(model: Optional[Path]) -> Path:
    if model is None:
        raise M3Error("no model given: pass --model DIR (make a random one with "
                      "`python -m converters.init --preset tiny --out DIR`)")
    return model


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False))


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The text to continue."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.8, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(40, help="Sample among the K most likely tokens; 0 disables."),
    top_p: float = typer.Option(0.95, help="Nucleus sampling: smallest set with this total probability."),
    repeat_penalty: float = typer.Option(1.1, help="Penalty on tokens seen in the last 64; 1 disables."),
    seed: Optional[int] = typer.Option(None, help="Random seed for reproducible sampling."),
    stop: Optional[list[str]] = typer.Option(None, help="Stop when this text appears (repeatable)."),
    backend: str = typer.Option("numba", help="numba (the m3lite engine) or onnxruntime."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with text, tokens and speeds."),
) -> None:
    """Continue PROMPT with the model, streaming the text as it is produced."""
    from .model import Model

    m = Model.load(_model_dir(model))
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
