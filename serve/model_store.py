"""Turn `--model` into a converted checkpoint directory the server can load.

- a converted checkpoint (`encoder/config.json` + `languages.json`): used as is;
- a local Hugging Face directory or a hub id: converted once into
  `<cache_dir>/<slug>-<dtype>-tp<N>` (with a progress bar) and reused afterwards;
- `tiny`: a tiny random mBART built locally (convert.tiny), then converted; output is noise.

`plan()` is quick and decides everything that can fail for the user (missing path, no hub
access) so the server fails at once with one message; `ModelPlan.materialize()` does the slow
part (download, conversion) and runs in the server's loading thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TINY = "tiny"
HUB_PROBE_TIMEOUT_S = 5.0
# Weights in formats the converter never reads.
_SKIP_PATTERNS = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "tf_model*", "flax_model*", "rust_model*", "onnx/*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelUnavailable(RuntimeError):
    """The model cannot be found or fetched; the message says what to pass instead."""


def alternatives() -> str:
    return (
        "pass MODEL=<path to a Hugging Face model dir or a converted checkpoint> "
        "(make serve MODEL=..., --model or MT_MODEL), or MODEL=tiny for a tiny random model "
        "built locally (meaningless translations, for smoke tests)"
    )


def is_converted(path: Path) -> bool:
    """A directory the server can load directly (converter output or a built engine dir)."""
    return (
        (path / "languages.json").is_file()
        and (path / "tokenizer").is_dir()
        and ((path / "encoder" / "config.json").is_file())
    )


def slug(model: str) -> str:
    """Cache-directory name of a model: hub ids keep their name, local dirs add a path hash."""
    path = Path(model).expanduser()
    if path.is_dir():
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
        return f"{_safe(path.resolve().name)}-{digest}"
    return _safe(model.replace("/", "--"))


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "model"


@dataclass
class ModelPlan:
    """Where the checkpoint will be, and how to get it there if it is not yet."""

    model_id: str
    ckpt_dir: Path
    source: str | None = None  # HF dir or hub id to convert from; None when ckpt_dir is ready
    dtype: str = "float32"
    tp_size: int = 1
    tiny: bool = False
    download: bool = False  # source is a hub id that is not in the local HF cache

    def materialize(self, progress: bool = True) -> Path:
        """Build the checkpoint if needed (slow: download and conversion); returns its directory."""
        if is_converted(self.ckpt_dir):
            return self.ckpt_dir
        source = self.source
        if self.tiny:
            source = str(_build_tiny(self.ckpt_dir.parent / "tiny-hf"))
        elif self.download:
            source = _download(str(source))
        if source is None:
            raise ModelUnavailable(
                f"{self.ckpt_dir} is not a complete converted checkpoint; {alternatives()}"
            )
        return _convert(source, self.ckpt_dir, self.tp_size, self.dtype, progress)


def plan(model: str, cache_dir: Path, dtype: str = "float32", tp_size: int = 1) -> ModelPlan:
    """Decide how to obtain `model`; raises ModelUnavailable at once when it cannot be had."""
    cache_dir = Path(cache_dir).expanduser()
    if model == TINY:
        return ModelPlan("tiny-random-mbart", cache_dir / f"tiny-{dtype}-tp{tp_size}", dtype=dtype, tp_size=tp_size,
                         tiny=True)  # fmt: skip
    path = Path(model).expanduser()
    if path.is_dir():
        if is_converted(path):
            return ModelPlan(path.resolve().name, path.resolve(), dtype=dtype, tp_size=tp_size)
        if (path / "config.json").is_file():
            target = cache_dir / f"{slug(model)}-{dtype}-tp{tp_size}"
            return ModelPlan(path.resolve().name, target, str(path.resolve()), dtype, tp_size)
        raise ModelUnavailable(
            f"{path} is neither a converted checkpoint (encoder/config.json + languages.json) nor a "
            f"Hugging Face model (config.json); {alternatives()}"
        )
    if path.exists() or not _HUB_ID.match(model):
        raise ModelUnavailable(f"model {model!r} not found; {alternatives()}")
    target = cache_dir / f"{slug(model)}-{dtype}-tp{tp_size}"
    if is_converted(target):
        return ModelPlan(model, target, dtype=dtype, tp_size=tp_size)
    local = _hub_cached(model)
    if local is not None:
        return ModelPlan(model, target, local, dtype, tp_size)
    _probe_hub(model)
    return ModelPlan(model, target, model, dtype, tp_size, download=True)


def _hub_cached(repo_id: str) -> str | None:
    """The local snapshot of `repo_id` in the Hugging Face cache, without touching the network."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, local_files_only=True, ignore_patterns=_SKIP_PATTERNS)
    except Exception:
        return None
    return str(path) if (Path(path) / "config.json").is_file() else None


def _probe_hub(repo_id: str) -> None:
    """One short metadata request, so that no hub access fails in seconds instead of hanging."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        raise ModelUnavailable(
            f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {alternatives()}"
        )
    from huggingface_hub import model_info

    try:
        model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ModelUnavailable(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({reason}); {alternatives()}"
        ) from None


def _download(repo_id: str) -> str:
    from huggingface_hub import model_info, snapshot_download

    files = [s.rfilename for s in (model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S).siblings or [])]
    skip = list(_SKIP_PATTERNS)
    if any(f.endswith(".safetensors") for f in files):
        skip.append("*.bin")  # the same weights twice; safetensors is enough
    log.info("downloading %s from the Hugging Face hub", repo_id)
    return str(snapshot_download(repo_id, ignore_patterns=skip))


def _build_tiny(hf_dir: Path) -> Path:
    from convert.tiny import build_tiny_mbart

    if (hf_dir / "config.json").is_file():
        return hf_dir
    try:
        return build_tiny_mbart(hf_dir)
    except FileNotFoundError as err:
        raise ModelUnavailable(f"cannot build the tiny model: {err} (set MT_DATA_ROOT)") from None


def _convert(source: str, out: Path, tp_size: int, dtype: str, progress: bool) -> Path:
    from convert.__main__ import convert_checkpoint
    from convert.errors import ConvertError

    log.info("converting %s -> %s (dtype %s, TP %d); done once, then reused", source, out, dtype, tp_size)
    try:
        return convert_checkpoint(source, out, tp_size, dtype, progress=progress)
    except ConvertError as err:
        if is_converted(out):  # another server converted it meanwhile
            return out
        raise ModelUnavailable(f"cannot convert {source}: {err}; {alternatives()}") from None
