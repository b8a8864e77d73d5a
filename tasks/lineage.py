"""What a model was made of, in one tree, read from the records the stages already leave in MLflow.

Every stage run logs its inputs and outputs as MLflow datasets (name, store path, digest: ``log_dataset`` in
``tasks.tracking``), and registered versions carry ``herd.model_dir``. ``lineage(ref)`` starts from a registered
version (``models:/policy@champion``, ``models:/sft/1``) or a run id and follows every input back to the run
that made it:

1. the run that logged the same digest as an output (the earliest: later runs that reused a content-addressed
   folder log it again);
2. else the registered version whose folder it is (the reward models: their version's run trained them);
3. else the latest earlier run that wrote that path, or a folder holding it (the tokenizer reads the mixture's
   shard files one by one; curation reads the fetched files under its own digest).

Walked from the champion that gives: policy version -> parent versions -> RLHF steps -> reward-model versions ->
preference batches (each with the annotator export it was ingested from; for the simulated annotator's, the pairs
file it labelled and the policy those pairs were sampled from) -> SFT model and data -> base model ->
token shards and tokenizer -> mixture -> curated shards, step by step -> raw source files. Each node holds its
digest, the MLflow run that made it (``run_role: "read"`` when no run made it: a file the user gave) and its store
path; a node reached again is written once and then referred to (``"seen": true``). ``check_digests`` re-hashes
every store path against what was recorded; ``figure`` draws the graph (attached to each ``policy`` version).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import mlflow

from stages.errors import ConfigError
from tasks.tracking import DIGEST_CHARS, experiment_id

log = logging.getLogger(__name__)

CONTEXT_RANK = {"parent": 0, "init": 0, "reward": 1, "training": 2}  # a step's parent first, then its RMs, data


@dataclass(frozen=True)
class Record:
    """One dataset as one run logged it."""

    name: str
    path: str
    digest: str
    context: str
    run_id: str | None
    start: int  # the run's start time (ms); what a run reads was made before it started


def _source_path(source: str) -> str:
    try:
        uri = json.loads(source).get("uri", "")
    except (ValueError, AttributeError):
        uri = source
    uri = uri.removeprefix("file://")
    return os.path.normpath(uri) if uri else ""


def _version_dict(v, aliases: dict[str, str]) -> dict:
    return {"name": v.name, "version": int(v.version), "run_id": v.run_id, "tags": dict(v.tags),
            "aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version))}


class Records:
    """Every run's datasets and every registered version of the ``herd`` experiment, indexed once."""

    def __init__(self, client: mlflow.MlflowClient | None = None):
        self.client = client or mlflow.MlflowClient()
        self.runs: dict[str, object] = {}
        self.reads: dict[str, list[Record]] = defaultdict(list)  # run id -> what it read (every context but output)
        self.writes: dict[str, list[Record]] = defaultdict(list)  # run id -> what it wrote
        self.made: dict[str, list[Record]] = defaultdict(list)  # digest -> output records
        self.made_at: dict[str, list[Record]] = defaultdict(list)  # path -> output records
        self.logged_at: dict[str, list[Record]] = defaultdict(list)  # path -> any record
        token = None
        while True:
            page = self.client.search_runs([experiment_id()], max_results=1000, page_token=token)
            for run in page:
                self._add(run)
            token = page.token
            if not token:
                break
        self.versions: list[dict] = []
        for rm in self.client.search_registered_models(max_results=1000):
            for v in self.client.search_model_versions(f"name='{rm.name}'"):
                self.versions.append(_version_dict(v, rm.aliases or {}))
        self.versions.sort(key=lambda v: (v["name"], v["version"]))
        self.version_at = {os.path.normpath(v["tags"]["herd.model_dir"]): v for v in self.versions
                           if v["tags"].get("herd.model_dir")}  # the newest version of a folder wins

    def _add(self, run) -> None:
        rid, start = run.info.run_id, run.info.start_time or 0
        self.runs[rid] = run
        for di in run.inputs.dataset_inputs if run.inputs else []:
            ctx = next((t.value for t in di.tags if t.key == "mlflow.data.context"), "input")
            rec = Record(di.dataset.name, _source_path(di.dataset.source), di.dataset.digest, ctx, rid, start)
            self.logged_at[rec.path].append(rec)
            if ctx == "output":
                self.made[rec.digest].append(rec)
                self.made_at[rec.path].append(rec)
                self.writes[rid].append(rec)
            else:
                self.reads[rid].append(rec)

    def start(self, run_id: str | None) -> int:
        run = self.runs.get(run_id or "")
        return (run.info.start_time or 0) if run else 0

    def run_name(self, run_id: str | None) -> str:
        run = self.runs.get(run_id or "")
        return run.info.run_name if run else ""

    def maker(self, rec: Record) -> Record | None:
        """The output record of the run that made what ``rec`` names (None: no run made it)."""
        def before(recs):
            return [r for r in recs if r.start <= rec.start and r.run_id != rec.run_id]

        made = before(self.made.get(rec.digest, []))
        if made:  # the same folder first: a copy elsewhere (a user-named output) has the same digest
            return min(made, key=lambda r: (r.path != rec.path, r.start))
        v = self.version_at.get(rec.path)
        if v and v["run_id"] in self.runs and v["run_id"] != rec.run_id:
            return Record(rec.name, rec.path, rec.digest, "output", v["run_id"], self.start(v["run_id"]))
        p = Path(rec.path)
        for folder in (p, *p.parents):  # the path itself, else the nearest folder a run wrote that holds it
            at = before(self.made_at.get(str(folder), []))
            if at:
                return max(at, key=lambda r: r.start)
        return None

    def resolve(self, ref: str) -> tuple[dict | None, Record | None, str | None]:
        """``ref`` -> (registered version, the record of its model folder, or the run id when ``ref`` is a run)."""
        if not ref.startswith("models:/"):
            if ref in self.runs:
                return None, None, ref
            raise ConfigError(f"{ref!r} is neither a run of the herd experiment nor models:/NAME@ALIAS or "
                              "models:/NAME/VERSION (e.g. models:/policy@champion)")
        body = ref.removeprefix("models:/")
        name, sep, alias = body.partition("@")
        if not sep:
            name, _, number = body.rpartition("/")
        match = [v for v in self.versions if v["name"] == name
                 and (alias in v["aliases"] if sep else str(v["version"]) == number)]
        if not match:
            known = sorted({v["name"] for v in self.versions})
            raise ConfigError(f"{ref}: no such registered model version (registered: {', '.join(known) or 'none'}; "
                              "aliases: see the MLflow UI under Models)")
        v = match[0]
        folder = os.path.normpath(v["tags"].get("herd.model_dir", ""))
        digest = v["tags"].get("herd.digest", "")[:DIGEST_CHARS] or next(
            (r.digest for r in sorted(self.logged_at.get(folder, []), key=lambda r: r.context != "output")), "")
        return v, Record(v["name"], folder, digest, "output", None, 1 << 62), None


def _kind(name: str, run_name: str, version: dict | None) -> str:
    if version:
        return version["name"]
    return run_name.split("/", 1)[0] if run_name else name


class _Walk:
    def __init__(self, records: Records):
        self.r = records
        self.nodes: dict[str, dict] = {}
        self.trail: set[str] = set()

    def node(self, rec: Record, context: str = "") -> dict | None:
        made = self.r.maker(rec)
        src = made or Record(rec.name, rec.path, rec.digest, rec.context, rec.run_id, rec.start)
        key = f"{src.path}@{src.digest}"
        if key in self.trail:  # never a cycle (a run reading what it wrote)
            return None
        if key in self.nodes:
            self._read_as(self.nodes[key], rec)
            return {"id": key, "name": self.nodes[key]["name"], "seen": True,
                    **({"context": context} if context else {})}
        version = self.r.version_at.get(src.path)
        if version and version["tags"].get("herd.digest", src.digest)[:DIGEST_CHARS] != src.digest:
            version = None  # the folder was registered with other weights
        run_id = made.run_id if made else rec.run_id
        run_name = self.r.run_name(run_id)
        name = f"{version['name']} v{version['version']}" if version else (src.name or Path(src.path).name)
        node = {"id": key, "name": name, "kind": _kind(src.name, run_name if made else "", version),
                "digest": src.digest, "digests": [src.digest], "files": [], "run_id": run_id, "run_name": run_name,
                "run_role": "made" if made else "read", "path": src.path,
                **({"context": context} if context else {}),
                **({"model": {k: version[k] for k in ("name", "version", "aliases")}} if version else {}),
                "children": []}
        self._read_as(node, rec)
        self.nodes[key] = node
        self.trail.add(key)
        if made:
            node["children"] = self.children(made.run_id)
        node["children"] += self.export(src, run_id)
        self.trail.discard(key)
        return node

    @staticmethod
    def _read_as(node: dict, rec: Record) -> None:
        """A reader may record its own digest of the node (curation ingest hashes a file with its name), or read
        files inside the node's folder (the tokenizer reads the mixture's shards): kept to be checked too."""
        if rec.path == node["path"]:
            if rec.digest and rec.digest not in node["digests"]:
                node["digests"].append(rec.digest)
        elif {"path": rec.path, "digest": rec.digest} not in node["files"]:
            node["files"].append({"path": rec.path, "digest": rec.digest})

    def children(self, run_id: str) -> list[dict]:
        reads = self.r.reads.get(run_id, [])
        order = sorted(reads, key=lambda c: (CONTEXT_RANK.get(c.context, 3), -self._made_start(c)))
        out: list[dict] = []
        for c in order:
            n = self.node(c, c.context)
            if n is not None and all(n["id"] != o["id"] for o in out):  # several files of one folder: one child
                out.append(n)
        return out

    def _made_start(self, rec: Record) -> int:
        made = self.r.maker(rec)
        return made.start if made else 0

    def export(self, batch: Record, run_id: str | None) -> list[dict]:
        """A preference batch names the annotator export it was ingested from (its manifest, next to the data)."""
        man = Path(batch.path).parent / "manifest.json"
        if Path(batch.path).name != "data.parquet" or not man.is_file():
            return []
        m = json.loads(man.read_text())
        if not m.get("source_file"):
            return []
        key = f"{os.path.normpath(m['source_file'])}@{m.get('source_sha256', '')}"
        if key in self.nodes:
            return [{"id": key, "name": self.nodes[key]["name"], "seen": True, "context": "export"}]
        sha = m.get("source_sha256", "")
        path = os.path.normpath(m["source_file"])
        node = {"id": key, "name": f"annotator export {Path(m['source_file']).name}", "kind": "export",
                "digest": sha, "digests": [sha], "files": [], "run_id": run_id, "run_name": self.r.run_name(run_id),
                "run_role": "read", "path": path, "context": "export", "children": []}
        self.nodes[key] = node
        # an export herd's simulated annotator wrote: its run read the pairs file, made from a policy's samples
        made = self.r.maker(Record(node["name"], path, sha[:DIGEST_CHARS], "export", run_id,
                                   self.r.start(run_id) if run_id else batch.start))
        if made is not None and made.path == path:
            node.update(run_id=made.run_id, run_name=self.r.run_name(made.run_id), run_role="made")
            self.trail.add(key)
            node["children"] = self.children(made.run_id)
            self.trail.discard(key)
        return [node]


def lineage(ref: str, records: Records | None = None) -> dict:
    """The tree of what ``ref`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a run id) was made of:
    ``{"ref", "root": node}``, each node ``{"id", "name", "kind", "digest", "run_id", "run_name", "path",
    "model"?, "children"}`` (``{"id", "name", "seen": true}`` where a node was written out before)."""
    records = records or Records()
    version, rec, run_id = records.resolve(ref)
    walk = _Walk(records)
    if run_id is not None:  # what the run read; a run that read nothing (a fetch): what it wrote
        children = walk.children(run_id) or [n for o in records.writes.get(run_id, []) if (n := walk.node(o))]
        root = {"id": f"run:{run_id}", "name": records.run_name(run_id), "kind": "run", "digest": "", "digests": [],
                "files": [], "run_id": run_id, "run_name": records.run_name(run_id), "run_role": "made", "path": "",
                "children": children}
    else:
        root = walk.node(rec)
        if root.get("model") is None:  # the registered folder's weights differ from what was recorded
            root["model"] = {k: version[k] for k in ("name", "version", "aliases")}
            root["name"] = f"{version['name']} v{version['version']}"
    return {"ref": ref, "root": root}


def nodes(tree: dict) -> list[dict]:
    """Every node written out in full, depth first (each once)."""
    out, stack = [], [tree["root"]]
    while stack:
        n = stack.pop()
        if n.get("seen"):
            continue
        out.append(n)
        stack.extend(reversed(n.get("children", [])))
    return out


def _label(n: dict) -> str:
    model = n.get("model")
    tags = f" [{', '.join(model['aliases'])}]" if model and model["aliases"] else ""
    return f"{n['name']}{tags}"


def render(tree: dict, home: str | Path | None = None) -> str:
    """The tree as text: one line per node, ``name [aliases]  digest  run name (run id)  store path`` (paths under
    ``home`` written ``$HERD_HOME/...``); nodes written out before, one line per run of them: ``a, b (see above)``."""
    lines = [f"lineage of {tree['ref']}"]
    prefix_home = str(home).rstrip("/") + "/" if home else None

    def where(path: str) -> str:
        return "$HERD_HOME/" + path[len(prefix_home):] if prefix_home and path.startswith(prefix_home) else path

    def line(n: dict) -> str:
        run = f"{n['run_name'] or '-'} ({(n['run_id'] or '-')[:8]})" + (" read it" if n["run_role"] == "read" else "")
        return f"{_label(n)}  {(n['digest'] or '-')[:12]}  {run}  {where(n['path'] or '')}".rstrip()

    def walk(n: dict, prefix: str, last: bool, top: bool) -> None:
        lines.append(line(n) if top else f"{prefix}{'└── ' if last else '├── '}{line(n)}")
        groups: list = []  # children written out here, and runs of children seen before
        for c in n.get("children", []):
            if c.get("seen") and groups and isinstance(groups[-1], list):
                groups[-1].append(c["name"])
            else:
                groups.append([c["name"]] if c.get("seen") else c)
        inner = "" if top else prefix + ("    " if last else "│   ")
        for i, g in enumerate(groups):
            end = i == len(groups) - 1
            if isinstance(g, list):
                lines.append(f"{inner}{'└── ' if end else '├── '}{', '.join(g)}  (see above)")
            else:
                walk(g, inner, end, False)

    walk(tree["root"], "", True, True)
    return "\n".join(lines)


def digests_of(path: str | Path) -> set[str]:
    """What herd's stages record as the digest of ``path``, recomputed from the files: a file's sha256 (and the
    curation ingest's name+sha256); a folder's tree digest, of all files or the ``*.safetensors`` weights, or its
    ``tokenizer.json``; a preference batch's content digest (over its records)."""
    import hashlib

    from stages.common import file_sha256, tree_sha256

    p = Path(path)
    if p.is_file():
        sha = file_sha256(p)
        out = {sha, hashlib.sha256(p.name.encode() + sha.encode()).hexdigest()}
        if p.name == "data.parquet":
            import pyarrow.parquet as pq

            ids = pq.read_table(p, columns=["record_sha256"]).column(0).to_pylist()
            out.add(hashlib.sha256("\n".join(ids).encode()).hexdigest())
        return out
    if p.is_dir():
        out = {tree_sha256(p), tree_sha256(p, "*.safetensors")}
        if (p / "tokenizer.json").is_file():
            out.add(file_sha256(p / "tokenizer.json"))
        return out
    return set()


def check_digests(tree: dict) -> list[dict]:
    """Each node's recorded digest(s) against its store path re-hashed now: ``[{"id", "path", "ok", "missing"}]``
    (``ok`` when every recorded digest is what the files hash to)."""
    def matches(path: str, recorded: list[str]) -> tuple[bool, bool]:
        actual = digests_of(path)
        return bool(actual) and all(any(a[: len(d)] == d for a in actual) for d in recorded if d), not actual

    rows = []
    for n in nodes(tree):
        if not n["path"]:
            continue
        ok, missing = matches(n["path"], n["digests"])
        for f in n.get("files", []):  # files read inside the node's folder, each under its own digest
            f_ok, f_missing = matches(f["path"], [f["digest"]])
            ok, missing = ok and f_ok, missing or f_missing
        rows.append({"id": n["id"], "name": n["name"], "path": n["path"], "ok": ok, "missing": missing})
    return rows


COLOURS = {"policy": "#4c72b0", "alignment": "#8fa9d6", "rm-helpfulness": "#dd8452", "rm-safety": "#c44e52",
           "preferences": "#f0b27a", "export": "#f7dc6f", "sft": "#55a868", "base": "#8172b3", "pretrain": "#8172b3",
           "tokenizer": "#937860", "mix": "#da8bc3", "curate": "#8c8c8c", "data": "#ccb974"}


def figure(tree: dict):
    """The lineage as a layered graph (top: the model; each row one step further back), a matplotlib Figure."""
    from matplotlib.figure import Figure

    depth: dict[str, int] = {}
    order: list[str] = []
    edges: list[tuple[str, str]] = []
    full = {n["id"]: n for n in nodes(tree)}

    def walk(n: dict, d: int) -> None:
        if n["id"] not in depth:
            depth[n["id"]] = d
            order.append(n["id"])
        if n.get("seen"):
            return
        for c in n.get("children", []):
            edges.append((n["id"], c["id"]))
            walk(c, d + 1)

    walk(tree["root"], 0)
    rows: dict[int, list[str]] = defaultdict(list)
    for i in order:
        rows[depth[i]].append(i)
    width = max(len(r) for r in rows.values())
    fig = Figure(figsize=(max(8.0, 2.6 * width), max(4.0, 0.95 * len(rows) + 1)))
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.95))
    pos = {i: ((k + 0.5) / len(r) * width, -d) for d, r in rows.items() for k, i in enumerate(r)}
    for a, b in edges:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        ax.annotate("", xy=(x0, y0 - 0.22), xytext=(x1, y1 + 0.22),
                    arrowprops={"arrowstyle": "->", "color": "#999999", "lw": 0.6})
    for i, (x, y) in pos.items():
        n = full[i]
        text = f"{_label(n)}\n{(n['digest'] or '')[:10]}  {n['run_name'] or ''}"
        ax.text(x, y, text, ha="center", va="center", fontsize=6.5,
                bbox={"boxstyle": "round,pad=0.3", "fc": COLOURS.get(n["kind"], "#e0e0e0"), "ec": "#555555",
                      "lw": 0.5, "alpha": 0.9})
    ax.set_xlim(0, width)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.axis("off")
    ax.set_title(f"lineage of {tree['ref']}", fontsize=9)
    return fig


def attach(name: str, version: int | str, records: Records | None = None) -> dict:
    """Log the lineage of a registered version to its run: ``lineage.json`` and the figure ``lineage.png``."""
    tree = lineage(f"models:/{name}/{version}", records)
    client = mlflow.MlflowClient()
    run_id = client.get_model_version(name, str(version)).run_id
    client.log_dict(run_id, tree, "lineage.json")
    client.log_text(run_id, render(tree), "lineage.txt")
    client.log_figure(run_id, figure(tree), "lineage.png")
    return tree
