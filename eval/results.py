"""Reading run results and baselines back, with their hypotheses and references, hash-checked.

A run directory keeps hypotheses in files next to `results.json`; a baseline is the same
document with the hypotheses embedded, so it alone (plus the shared references, matched by
sha256) lets the gate rescore both sides and run the paired bootstrap.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path

from eval import provenance
from eval.data import data_root, read_lines
from eval.errors import EvalError
from eval.run import RESULTS_JSON

BASELINE_KIND = "mt-eval-baseline"


def read_hypotheses(path: Path) -> list[str]:
    """One hypothesis per line; unlike `read_lines`, empty hypotheses are kept (they are aligned)."""
    text = path.read_text(encoding="utf-8")
    if not text:
        return []
    return text.removesuffix("\n").split("\n")


def load_results(path: str | Path) -> dict:
    """A run (directory or its results.json) or a baseline JSON, every pair's `hypotheses` filled in."""
    path = Path(path)
    json_path = path / RESULTS_JSON if path.is_dir() else path
    if not json_path.is_file():
        raise EvalError(f"no results found at {path} (expected a run directory or a results JSON)")
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise EvalError(f"{json_path} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("pairs"), dict):
        raise EvalError(f"{json_path} is not an eval result (no 'pairs')")
    doc["_path"] = str(json_path)
    for pair, entry in doc["pairs"].items():
        if "hypotheses" not in entry:
            hyp_path = json_path.parent / entry.get("hypotheses_file", "")
            if not hyp_path.is_file():
                raise EvalError(f"{pair}: hypotheses file {hyp_path} is missing")
            entry["hypotheses"] = read_hypotheses(hyp_path)
        if (
            entry.get("hypotheses_sha256")
            and provenance.sha256_lines(entry["hypotheses"]) != entry["hypotheses_sha256"]
        ):
            raise EvalError(f"{pair}: hypotheses in {json_path} do not match their recorded sha256")
        if len(entry["hypotheses"]) != entry.get("sentences"):
            raise EvalError(
                f"{pair}: {len(entry['hypotheses'])} hypotheses but {entry.get('sentences')} sentences"
            )
    return doc


def references(entry: dict, test_set: str | None, pair: str) -> list[str]:
    """The references a pair was scored against, found by recorded path or in the data root.

    The file must still have the recorded sha256, so a reference that changed since the run
    can never be used silently.
    """
    ref = entry["data"]["reference"]
    candidates = [Path(ref["path"])]
    if test_set:
        candidates.append(data_root() / "test" / test_set / Path(ref["path"]).name)
    for candidate in candidates:
        if candidate.is_file() and provenance.sha256_file(candidate) == ref["sha256"]:
            return read_lines(candidate)[: entry["sentences"]]
    raise EvalError(
        f"{pair}: reference file with sha256 {ref['sha256'][:12]}... not found "
        f"(looked at {', '.join(str(c) for c in candidates)}); set MT_DATA_ROOT to the data it was scored on"
    )


def make_baseline(run: dict, previous: dict | None = None) -> dict:
    """The run as a baseline document: hypotheses embedded, provenance of the update recorded."""
    doc = copy.deepcopy({k: v for k, v in run.items() if not k.startswith("_")})
    doc["kind"] = BASELINE_KIND
    for entry in doc["pairs"].values():
        entry.pop("hypotheses_file", None)
    doc["baseline"] = {
        "from_run": run.get("_path"),
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "previous_created": (previous or {}).get("created"),
    }
    return doc


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in doc.items() if not k.startswith("_")}
    path.write_text(json.dumps(clean, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def label(doc: dict) -> str:
    """A short system label for tables and charts."""
    return str(doc.get("name") or Path(doc.get("_path", "?")).parent.name)
