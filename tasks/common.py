"""What every herd task shares: step references, retry policy, cache keys."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from stages.errors import TransientIOError


class StepRef(BaseModel):
    """A finished, content-addressed stage output: where it is and what it holds."""

    name: str
    key: str
    path: str
    digest: str
    docs: int = 0
    stats: dict = {}
    cached: bool = False
    run_id: str | None = None


def retry_transient(task, task_run, state) -> bool:
    """Retry only on ``TransientIOError`` (flaky network/filesystem), never on bad data or configs."""
    try:
        state.result()
    except TransientIOError:
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


def key_from_params(context, parameters) -> str:
    """Prefect cache key: the stage's content address (config hash + input digests) passed as ``key``."""
    return f"herd-{parameters['name']}-{parameters['key']}"


def manifest_exists(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def strip_examples(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "examples"}


def latest_file(home: str | Path) -> Path:
    return Path(home) / "latest.json"


def set_latest(home: str | Path, **refs: str) -> None:
    """Record the newest output of a stage (tokenizer, tokens, runs_csv, fit) for commands that default to it."""
    import json

    from stages.common import write_json_atomic

    path = latest_file(home)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(refs)
    write_json_atomic(path, data)


def get_latest(home: str | Path, key: str) -> str | None:
    import json

    path = latest_file(home)
    return json.loads(path.read_text()).get(key) if path.exists() else None


def copy_tree(src: str | Path, dst: str | Path) -> None:
    """Copy a stored stage output to a user-named folder, atomically (the old folder stays until done)."""
    import shutil

    from stages.common import atomic_dir

    with atomic_dir(Path(dst)) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
