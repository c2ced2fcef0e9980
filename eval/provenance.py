"""What a score was computed from: checkpoint hash, quantization mode, data hashes, git revision.

Recorded next to every number so that a regression can be traced to the change that caused it.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

from convert.__main__ import sha256 as sha256_file
from eval.data import PROJECT_ROOT

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def sha256_lines(lines: list[str]) -> str:
    """Hash of text lines as they would be written one per line (hypothesis files)."""
    return hashlib.sha256("".join(line + "\n" for line in lines).encode("utf-8")).hexdigest()


def _recorded_digests(ckpt_dir: Path) -> dict[str, str]:
    """relative path -> sha256 of the files `conversion.json` lists (empty when it lists none)."""
    try:
        doc = json.loads((ckpt_dir / "conversion.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    digests = doc.get("sha256") if isinstance(doc, dict) else None
    if not isinstance(digests, dict):
        return {}
    return {str(k): str(v).lower() for k, v in digests.items() if _SHA256_RE.match(str(v).lower())}


def checkpoint_hash(ckpt_dir: Path) -> dict:
    """One sha256 over every file of a converted checkpoint (`relpath=sha256` lines, sorted).

    Rank files listed in `conversion.json` are taken at their recorded digest instead of
    rereading gigabytes; the rest (configs, tokenizer, languages.json) is hashed directly.
    `conversion.json` itself is left out: it holds paths and versions, not the model. Either way
    identical files give the identical hash.
    """
    ckpt_dir = Path(ckpt_dir)
    recorded = _recorded_digests(ckpt_dir)
    lines, reused = [], 0
    for path in sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != "conversion.json"):
        rel = path.relative_to(ckpt_dir).as_posix()
        reused += rel in recorded
        lines.append(f"{rel}={recorded.get(rel) or sha256_file(path)}\n")
    method = f"files ({reused} rank digests from conversion.json)" if reused else "files"
    digest = hashlib.sha256("".join(lines).encode()).hexdigest() if lines else None
    return {"sha256": digest, "method": method}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def quantization(ckpt_dir: Path) -> dict:
    """Quantization and dtype as the checkpoint's decoder config states them (TRT-LLM layout)."""
    ckpt_dir = Path(ckpt_dir)
    cfg = _read_json(ckpt_dir / "decoder" / "config.json") or _read_json(ckpt_dir / "config.json")
    quant = cfg.get("quantization") or {}
    return {
        "quant_algo": quant.get("quant_algo"),
        "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
        "dtype": cfg.get("dtype"),
        "tp_size": (cfg.get("mapping") or {}).get("tp_size"),
    }


def quant_label(quant_algo: str | None, dtype: str | None) -> str:
    """Short human label for tables and charts: `int4_awq`, or the dtype when unquantized."""
    if quant_algo:
        return str(quant_algo).lower()
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(str(dtype), str(dtype or "?"))


def git_revision(root: Path = PROJECT_ROOT) -> dict:
    """HEAD commit and whether the tree had uncommitted changes (None outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if rev else None
    return {"revision": rev, "dirty": bool(status) if status is not None else None}
