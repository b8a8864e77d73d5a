"""What the crash tests check of a store after a killed run and its rerun."""

from __future__ import annotations

from pathlib import Path


def half_written(store: Path) -> list[str]:
    """Files of the store outside any complete stage output (a folder holding manifest.json), leaving out the hidden
    temporary folders a killed stage leaves (never read: outputs are found by their final names) and the store's
    own top-level ledgers."""
    bad = []
    for f in store.rglob("*"):
        rel = f.relative_to(store)
        if not f.is_file() or any(part.startswith(".") for part in rel.parts) or len(rel.parts) <= 2:
            continue
        if not any((store / Path(*rel.parts[:k]) / "manifest.json").is_file() for k in range(1, len(rel.parts))):
            bad.append(str(rel))
    return bad
