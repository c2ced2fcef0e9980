"""`python -m convert`: a Hugging Face checkpoint -> a tensor-parallel TensorRT-LLM checkpoint.

The output directory is self-contained for serving: the TRT-LLM component folders, `tokenizer/`,
`languages.json` (mBART) and `conversion.json` (provenance + sha256 of every rank file). It is
written into a temporary sibling and renamed into place at the end, so a failed run leaves
nothing behind. User errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from convert.checkpoint import write_component
from convert.cli import one_line, run_cli
from convert.errors import ConvertError
from convert.registry import DTYPES, Loader, get_loader, supported_architectures

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def project_version() -> str:
    try:
        return metadata.version("mt-trtllm")
    except metadata.PackageNotFoundError:
        pyproject = PROJECT_ROOT / "pyproject.toml"
        found = pyproject.is_file() and re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
        return found.group(1) if found else "unknown"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _quiet_transformers() -> None:
    """Keep transformers' / the hub's load reports, retries and progress bars off stderr, where our
    one-line errors go."""
    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()


def resolve_source(model: str) -> str:
    """A local directory (made absolute) or a hub id left for transformers to resolve."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConvertError(f"model directory {model} not found")
    return model


def load_hf(source: str, tp_size: int) -> tuple[Loader, Any, Any]:
    """(loader, HF model in float32, tokenizer), validating architecture and TP size before the weights."""
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(source)
    except Exception as err:
        raise ConvertError(f"cannot read a Hugging Face config from {source}: {one_line(err)}") from None
    loader = get_loader((hf_config.architectures or [None])[0])
    loader.check_tp(hf_config, tp_size)
    try:
        model, info = getattr(transformers, loader.hf_class).from_pretrained(
            source, dtype=torch.float32, output_loading_info=True, **loader.hf_kwargs
        )
    except Exception as err:
        raise ConvertError(f"cannot load weights from {source}: {one_line(err)}") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
    if missing:
        shown = ", ".join(str(k) for k in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ConvertError(f"{len(missing)} weight(s) missing or mis-shaped in {source}: {shown}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise ConvertError(f"cannot load the tokenizer of {source}: {one_line(err)}") from None
    return loader, model.eval(), tokenizer


def _new_dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def convert_checkpoint(
    model: str, output: Path | str, tp_size: int = 1, dtype: str = "float16", overwrite: bool = False,
    progress: bool = True,
) -> Path:  # fmt: skip
    """Convert `model` (local HF dir or hub id) into `output`; returns the output path.

    Raises ConvertError (with nothing written) on any user-fixable problem.
    """
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if tp_size < 1:
        raise ConvertError(f"--tp-size must be >= 1, got {tp_size}")
    out = Path(output).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ConvertError(f"output {out} already exists; pass --overwrite to replace it")
    source = resolve_source(model)
    loader, hf_model, tokenizer = load_hf(source, tp_size)
    with torch.no_grad():
        components = loader.convert(hf_model.config, hf_model.state_dict(), DTYPES[dtype])
    revision = getattr(hf_model.config, "_commit_hash", None)
    del hf_model

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(_new_dir_mode())
        total = sum(len(c.tensors) for c in components.values()) * tp_size
        files: dict[str, str] = {}
        with tqdm(total=total, unit="tensor", desc=f"writing TP={tp_size}", disable=not progress) as bar:
            for name, comp in components.items():
                for path in write_component(tmp / name, comp.config, comp.tensors, tp_size, bar.update):
                    files[path.relative_to(tmp).as_posix()] = sha256(path)
        tokenizer.save_pretrained(tmp / "tokenizer")
        loader.write_extras(tmp, tokenizer, components)
        record = {
            "source": model,
            "source_path": source if Path(source).is_dir() else None,
            "source_revision": revision,
            "architecture": loader.architecture,
            "trtllm_architecture": {n or ".": c.config["architecture"] for n, c in components.items()},
            "dtype": dtype,
            "tp_size": tp_size,
            "project_version": project_version(),
            "transformers_version": _version("transformers"),
            "torch_version": torch.__version__,
            "sha256": files,
        }
        (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` (--overwrite) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:  # put the previous output back
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"convert: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m convert",
        description=(
            "Convert a Hugging Face checkpoint into a tensor-parallel TensorRT-LLM checkpoint "
            "(config.json + rank{r}.safetensors per component) plus tokenizer/, languages.json and "
            "conversion.json, ready for trtllm-build or the PyTorch runtime. "
            f"Supported architectures: {', '.join(supported_architectures())}."
        ),
        epilog="Example: python -m convert --model facebook/mbart-large-50-many-to-many-mmt "
        "--output out/mbart50-tp2 --tp-size 2 --dtype float16",
    )
    parser.add_argument("--model", required=True, help="local Hugging Face model directory or hub id")
    parser.add_argument(
        "--output", required=True, help="output directory (must not exist unless --overwrite)"
    )
    parser.add_argument(
        "--tp-size", type=int, default=1, help="tensor-parallel size; must divide the attention heads"
    )
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=list(DTYPES),
        help="dtype of the written weights (default float16)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()

    def work() -> None:
        print(convert_checkpoint(args.model, args.output, args.tp_size, args.dtype, args.overwrite,
                                 progress=not args.quiet))  # fmt: skip

    return run_cli("convert", work, (ConvertError,))


if __name__ == "__main__":
    sys.exit(main())
