"""Lineage in one command: the demo pipeline (smoke preset, shortened) under a Prefect test server with a real MLflow
store and registry, then `herd lineage models:/policy@champion` walked down to the raw files with every digest
re-hashed; base and SFT registered with their inputs; each policy version carrying its lineage figure; and a
crashed registration rerun reusing the version it registered."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from stages.presets import smoke

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def own_store(home: Path, package_cache: Path):
    """A HERD_HOME and MLflow store of this module's own: its `policy` rounds must not meet other modules'."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "cache").symlink_to(package_cache, target_is_directory=True)
    old = {k: os.environ.get(k) for k in ("HERD_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["HERD_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.create_experiment("herd", artifact_location=(home / "mlartifacts").as_uri())
    try:
        yield home
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if old["MLFLOW_TRACKING_URI"]:
            mlflow.set_tracking_uri(old["MLFLOW_TRACKING_URI"])


def _cli_env(home: Path) -> dict[str, str]:
    """The environment of a `herd` command run against this module's store and the test harness's Prefect server
    (the harness sets its URL in Prefect's settings, not in the environment: without it the command would start a
    Prefect server of its own for ``home`` and leave it running)."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "HERD_HOME": str(home), "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
            "PREFECT_API_URL": PREFECT_API_URL.value()}


def demo_config():
    """The smoke preset, shortened where lineage does not look: curation steps run in this process (one datatrove
    task, no worker processes to start), a fixed debug-size base (no IsoFLOP sweep), two rounds (V2 has a parent
    version), a few benchmark items; the mixture renormalises its shares over the sources smoke fetches (it has no
    'qa' source)."""
    from stages.evaluation.harness import HarnessConfig

    cfg = smoke()
    p = cfg.pretraining
    pre = p.derive(size="debug", train=p.train.derive(steps=20, downstream_every=0).model_dump())
    cur = cfg.curation.derive(executor=cfg.curation.executor.derive(tasks=1, workers=1).model_dump())
    return cfg.derive(curation=cur.model_dump(), pretraining=pre.model_dump(),
                      alignment=cfg.alignment.derive(rounds=2).model_dump(),
                      mix=cfg.mix.derive(missing_sources="renormalise").model_dump(),
                      benchmarks=HarnessConfig(tasks="core", limit=2, n_boot=10).model_dump())


@pytest.fixture(scope="module")
def demo(prefect_mlflow, package_cache, tmp_path_factory):
    from flows.pipeline import pipeline_flow

    cfg = demo_config()
    with own_store(tmp_path_factory.mktemp("lineage") / "home", package_cache) as home:
        result = pipeline_flow(cfg)
        yield {"result": result, "home": home, "cfg": cfg}


def _version(name: str, alias: str | None = None, version: int | None = None):
    client = mlflow.MlflowClient()
    return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, str(version))


def test_base_and_sft_are_registered_with_their_inputs(demo):
    res = demo["result"]
    # main -> ctx-128 -> anneal, each a version of `base` tagged with its stage and naming the model it continued
    versions = {v.tags["herd.stage"]: v for v in mlflow.MlflowClient().search_model_versions("name='base'")}
    assert set(versions) == {"main", "ctx-128", "anneal"}
    main, ctx, base = versions["main"], versions["ctx-128"], versions["anneal"]
    (sft,) = mlflow.MlflowClient().search_model_versions("name='sft'")
    assert base.tags["herd.model_dir"] == res["pretrain"]["model_dir"] and main.tags["herd.size"] == "debug"
    assert main.tags["herd.model_dir"] == res["pretrain"]["main_model_dir"]
    assert base.tags["herd.parent_model_dir"] == ctx.tags["herd.model_dir"]
    assert ctx.tags["herd.parent_model_dir"] == main.tags["herd.model_dir"] and ctx.tags["herd.seq_len"] == "128"
    assert main.tags["herd.tokens_train"].endswith("/train") and main.tags["herd.tokenizer"] == res["tokenizer"]["path"]
    assert sft.tags["herd.model_dir"] == res["sft"]["model_dir"]
    assert sft.tags["herd.base_model"] == base.tags["herd.model_dir"]
    assert sft.tags["herd.base_model_digest"] == base.tags["herd.digest"]
    assert sft.tags["herd.sft_data"].endswith("conversations.jsonl.gz") and sft.tags["herd.sft_data_digest"]


def test_lineage_walks_from_the_champion_to_the_raw_files_and_every_digest_matches(demo):
    from stages.curation.pipeline import enabled_steps
    from tasks.lineage import check_digests, lineage, nodes

    champion = _version("policy", alias="champion")
    tree = lineage("models:/policy@champion")
    root, ns = tree["root"], nodes(tree)
    assert root["model"] == {"name": "policy", "version": int(champion.version),
                             "aliases": sorted(["champion", f"rlhf-v{champion.tags['herd.round']}"])}
    by_name = {n["name"]: n for n in ns}
    by_id = {n["id"]: n for n in ns}
    runs = {n["run_id"] for n in ns}
    # policy version -> parent versions -> RLHF steps -> reward-model versions -> preference batches + exports
    rounds = range(1, int(champion.tags["herd.round"]) + 1)
    for n in rounds:
        v = _version("policy", alias=f"rlhf-v{n}")
        assert f"policy v{v.version}" in by_name
        assert set(v.tags["herd.step_runs"].split(",")) <= runs
        for cat in ("helpfulness", "safety"):
            rm = by_name[f"rm-{cat} v{v.tags[f'herd.rm_{cat}_version']}"]
            assert rm["run_name"] == f"rm/{cat}/train" and rm["run_id"] == _version(
                f"rm-{cat}", version=int(v.tags[f"herd.rm_{cat}_version"])).run_id
        for b in v.tags["herd.batches"].split(","):
            batch = by_name[f"preferences/{b}"]
            assert batch["run_name"] == "preferences/ingest" and batch["path"].endswith(f"{b}/data.parquet")
            (export,) = [c for c in batch["children"] if c.get("context") == "export"]
            assert export.get("seen") or (export["kind"] == "export" and Path(export["path"]).is_file())
            if not export.get("seen"):  # the simulated annotator's run: the pairs it labelled, sampled by a policy
                assert export["run_name"] == "preferences/annotate" and export["run_role"] == "made"
                (pairs,) = [c for c in export["children"] if c["name"] == "pairs-to-annotate"]
                assert by_id[pairs["id"]]["run_name"] == "preferences/collect"
    # -> SFT model and data -> base model -> tokenizer and token shards -> mixture -> curated shards -> raw files
    # (base: the anneal's model <- the context stage's <- the main run's)
    sft, base, ctx, main = by_name["sft v1"], by_name["base v3"], by_name["base v2"], by_name["base v1"]
    assert sft["run_name"] == "sft/train" and sft["path"] == demo["result"]["sft"]["model_dir"]
    assert by_name["sft-conversations"]["run_name"] == "sft/data"
    assert base["run_name"] == "pretrain/anneal" and base["path"] == demo["result"]["pretrain"]["model_dir"]
    assert ctx["run_name"] == "pretrain/ctx-128" and ctx["id"] in {c["id"] for c in base["children"]}
    assert main["run_name"] == "pretrain/train" and main["path"] == demo["result"]["pretrain"]["main_model_dir"]
    assert main["id"] in {c["id"] for c in ctx["children"]}
    assert {by_name[s]["run_name"] for s in ("tokens-train", "tokens-heldout")} == {"tokenizer/tokenize"}
    assert "mix" in {by_id[c["id"]]["run_name"] for c in by_name["tokens-train"]["children"]}  # tokens <- mixture
    assert by_name["tokenizer"]["run_name"] == "tokenizer/train"
    assert by_name["mixture"]["run_name"] == "mix" and by_name["curated"]["run_name"] == "curate/report"
    for step in ["ingested", *enabled_steps(demo["cfg"].curation)]:
        assert by_name[step]["run_name"] == f"curate/{'ingest' if step == 'ingested' else step}"
    raw = {n["path"] for n in ns if n["run_name"] == "data/fetch"}
    fetched = Path(demo["result"]["fetch"]["path"])
    assert raw == {str(p) for p in fetched.glob("*.jsonl.gz")} and raw
    # one branch, top to bottom, passes every stage in order
    path, node = [], root
    while not node.get("seen") and node["children"]:
        path.append(node["kind"])
        node = next((c for c in node["children"] if not c.get("seen") and _reaches(c, "data")), None) or {"seen": 1}
    assert _subsequence(["policy", "sft", "base", "tokenizer", "mix", "curate"], path), path
    by_run = lineage(sft["run_id"])["root"]  # a run id: what that run read
    assert by_run["run_name"] == "sft/train" and "base v3" in {c["name"] for c in by_run["children"]}
    rows = check_digests(tree)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    assert len(rows) == len([n for n in ns if n["path"]]) > 30


def _reaches(node: dict, kind: str) -> bool:
    return node.get("kind") == kind or any(_reaches(c, kind) for c in node.get("children", []) if not c.get("seen"))


def _subsequence(wanted: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(any(x == w for x in it) for w in wanted)


def test_every_policy_version_carries_its_lineage_figure(demo):
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='policy'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    for v in versions:
        arts = {a.path for a in client.list_artifacts(v.run_id)}
        assert {"lineage.png", "lineage.json", "lineage.txt"} <= arts
        tree = mlflow.artifacts.load_dict(f"runs:/{v.run_id}/lineage.json")
        assert tree["root"]["name"] == f"policy v{v.version}" and tree["root"]["children"]
        png = Path(mlflow.artifacts.download_artifacts(f"runs:/{v.run_id}/lineage.png"))
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


def test_herd_lineage_prints_the_chain_and_the_tree(demo):
    from tasks.lineage import lineage

    env = _cli_env(demo["home"])
    cmd = [sys.executable, "-m", "herd.cli", "lineage", "models:/policy@champion"]
    text = subprocess.run(cmd + ["--check"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert text.returncode == 0, text.stderr[-2000:]
    lines = text.stdout.splitlines()
    assert lines[0] == "lineage of models:/policy@champion" and lines[1].startswith("policy v")
    assert any("sft v1" in x for x in lines) and any("data/fetch" in x for x in lines)
    assert lines[-1] == "digests: every store path hashes to its recorded digest"
    js = subprocess.run(cmd + ["--format", "json"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert js.returncode == 0, js.stderr[-2000:]
    assert json.loads(js.stdout) == lineage("models:/policy@champion")
    bad = subprocess.run(cmd[:-1] + ["models:/policy@nope"], env=env, capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert bad.returncode == 2 and "models:/policy@nope" in bad.stderr


def test_the_pipeline_chooses_its_mixture_by_proxies_and_trains_on_it(demo):
    """Llama 3's mixture experiment in the pipeline: a proxy per sampled mixture (the prior first) and one for the
    chosen mixture, shares.json and its figure, the chosen mixture re-sampled and re-tokenized with the proxies'
    tokenizer before the sweep, the report card's mixture section; then `herd mix --shares auto` samples the
    same shares."""
    from stages.mix_search import read_shares

    res, home = demo["result"], demo["home"]
    search = res["mix_search"]
    k = demo["cfg"].pretraining.mix_search.mixtures
    assert len(search["proxies"]) == k + 1 and search["proxies"][0]["shares"] == pytest.approx(search["prior"])
    assert sum(search["shares"].values()) == pytest.approx(1.0) and set(search["shares"]) == set(search["prior"])
    assert search["measured"] is not None and search["beats_prior"] == (search["measured"] < search["prior_measured"])
    path = Path(search["path"])
    assert read_shares(path) == pytest.approx(search["shares"])
    assert (path.parent / "mix_search.png").stat().st_size > 10_000
    names = [r.info.run_name for r in mlflow.search_runs(experiment_names=["herd"], output_format="list",
                                                         max_results=2000)]
    assert sum(n.startswith("mix-search/proxy-") for n in names) == k + 2  # the prior, k mixtures, the chosen one
    assert {"mix-search/fit", "mix-search/chosen"} <= set(names)
    # the pretraining data is the chosen mixture, tokenized with the tokenizer the proxies used
    table = json.loads((Path(res["mix"]["output"]) / "table.json").read_text())
    assert {r["source"]: r["target_share"] for r in table["sources"] if r["target_share"] > 0} == \
        pytest.approx(search["shares"])
    main = next(v for v in mlflow.MlflowClient().search_model_versions("name='base'") if v.tags["herd.stage"] == "main")
    man = json.loads((Path(main.tags["herd.tokens_train"]).parent / "manifest.json").read_text())
    assert {str(Path(f).parent.parent) for f in man["inputs"]} == {res["mix"]["output"]}
    assert res["mix"]["output"].endswith("-auto") and man["tokenizer_dir"] == res["tokenizer"]["path"]
    assert "## Data mixture (chosen by proxy experiments)" in res["report"]["markdown"]
    # the CLI samples the latest search's shares
    env = _cli_env(home)
    out = home / "mixed-cli"
    cmd = [sys.executable, "-m", "herd.cli", "mix", "--input", res["curation"]["output"] + "/kept", "--output",
           str(out), "--tokens", "20000", "--shares", "auto", "--preset", "smoke"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads((out / "table.json").read_text())
    assert {r["source"]: r["target_share"] for r in got["sources"] if r["target_share"] > 0} == \
        pytest.approx(search["shares"])
    bad = subprocess.run(cmd[:-4] + ["--shares", str(home / "nope.json")], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "nope.json" in bad.stderr and "Traceback" not in bad.stderr
    # `herd mix-search` on the same shards finds every proxy trained (stored by run, config and data) and chooses
    # the same mixture
    again = subprocess.run([sys.executable, "-m", "herd.cli", "mix-search", "--preset", "smoke", "--data",
                            search["tokens"], "--output", str(home / "search-cli")], env=env, capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert read_shares(home / "search-cli" / "shares.json") == pytest.approx(search["shares"])
    assert "leave-one-out Spearman" in again.stdout and "herd mix --shares auto" in again.stdout
    none = subprocess.run([sys.executable, "-m", "herd.cli", "mix-search", "--preset", "smoke", "--data",
                           str(home)], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert none.returncode == 2 and "no token manifest" in none.stderr and "Traceback" not in none.stderr


# ------------------------------------------------------------------ a crashed registration, rerun


def _round_inputs(root: Path, weights: bytes) -> dict:
    from stages.alignment import ChampionRule

    for name, data in (("sft", b"sft weights"), ("policy", weights)):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "model.safetensors").write_bytes(data)
    rate = {"rate": 0.1, "ci_low": 0.0, "ci_high": 0.2, "prompts": 8}
    vs = {"judge": {"win_rate": 0.6, "ci_low": 0.55, "ci_high": 0.7}, "rm": {"win_rate": 0.6, "ci_low": 0.5,
                                                                             "ci_high": 0.7}}
    return dict(policy_dir=str(root / "policy"), steps=[{"algorithm": "dpo", "run_id": "r", "files": {}}],
                parent={"version": 0, "round": 0, "model_dir": str(root / "sft")}, champion=None,
                evaluation={"vs": {"sft": vs}, "policy": {"violation": rate, "false_refusal": rate},
                            "baselines": {"sft": {"violation": rate, "false_refusal": rate}}, "run_id": "e"},
                rms={"helpfulness": {"version": 1}, "safety": {"version": 1}}, batches=[], max_new_tokens=4,
                rule=ChampionRule(), parent_run_id=None)


def test_a_rerun_registration_reuses_the_version_of_its_round(prefect_mlflow, tmp_path, package_cache,
                                                               monkeypatch):
    import tasks.alignment as alignment

    register = alignment.register_policy_task.fn
    with own_store(tmp_path / "home", package_cache):
        args = _round_inputs(tmp_path, b"v1 weights")

        def crash(*a, **k):
            raise RuntimeError("killed after registering")

        with monkeypatch.context() as m:  # killed between registering the version and tagging it
            m.setattr(alignment, "champion_decision", crash)
            with pytest.raises(RuntimeError):
                register(1, **args)
        client = mlflow.MlflowClient()
        (v,) = client.search_model_versions("name='policy'")
        assert v.tags["herd.round"] == "1" and "champion_decision" not in v.tags
        again = register(1, **args)  # the rerun
        assert again["version"] == int(v.version) and again["reused"] and again["champion"]
        assert register(1, **args)["version"] == int(v.version)  # and once more, after a complete registration
        (v,) = client.search_model_versions("name='policy'")
        assert v.tags["champion_decision"].startswith("moved") and v.tags["herd.digest"]
        assert client.get_model_version_by_alias("policy", "rlhf-v1").version == v.version
        assert {"lineage.png", "lineage.json"} <= {a.path for a in client.list_artifacts(v.run_id)}
        # round 2, new weights: the next version number, no gap
        nxt = register(2, **_round_inputs(tmp_path / "r2", b"v2 weights"))
        assert nxt["version"] == int(v.version) + 1 and not nxt["reused"]
