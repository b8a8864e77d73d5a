"""Security and robustness: models load only from safetensors, checkpoints and arrays never unpickle, and paths
taken from configs, batch ids, URLs or file content stay inside their roots."""

from __future__ import annotations

import ast
import json
import pickle
import threading
from pathlib import Path

import fsspec
import pytest

from stages.common import confined
from stages.errors import ConfigError, DataValidationError, MissingAssetError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("stages", "tasks", "flows", "herd", "infra")


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was loaded (and would have run any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _pickle_bomb(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}, protocol=2))
    return path


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    from stages.model import ModelConfig, build_model

    d = tmp_path_factory.mktemp("llama") / "model"
    build_model(ModelConfig.from_flavour("debug"), 64, seed=0).save_pretrained(d)  # config.json + model.safetensors
    return d


# ---------------------------------------------------------------------------------------------- safetensors only


def test_a_model_folder_with_only_pickled_weights_is_refused(tmp_path, saved_llama):
    from stages.model import load_causal_lm
    from stages.reward import load_reward_model

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((saved_llama / "config.json").read_text())  # loadable, but for the weights
    marker = tmp_path / "unpickled"
    _pickle_bomb(folder / "pytorch_model.bin", marker)
    for load in (load_causal_lm, load_reward_model):
        with pytest.raises(MissingAssetError, match=r"safetensors.*pytorch_model\.bin|pytorch_model\.bin.*safetensors"):
            load(folder)
    with pytest.raises(MissingAssetError, match="safetensors"):
        load_reward_model(folder, from_causal_lm=True)
    assert not marker.exists()


def test_safetensors_win_over_a_pickle_in_the_same_folder(tmp_path, saved_llama):
    import shutil

    from stages.model import load_causal_lm

    folder = tmp_path / "both"
    shutil.copytree(saved_llama, folder)
    marker = tmp_path / "unpickled"
    _pickle_bomb(folder / "pytorch_model.bin", marker)
    model = load_causal_lm(folder)
    assert model.config.vocab_size == 64 and not marker.exists()


def test_a_checkpoint_state_that_is_a_pickle_is_refused_on_resume(tmp_path):
    from stages.model import ModelConfig
    from stages.pretrain import PretrainConfig, pretrain
    from tests.stages._tokens import random_split

    data = random_split(tmp_path / "tok", n_docs=30)
    cfg = PretrainConfig(steps=4, seq_len=32, batch_tokens=128, micro_batch_size=2, warmup_steps=1, log_every=1,
                         num_threads=1, peak_flops=1e12, eval_tokens=64, checkpoint_every=2)
    model = ModelConfig.from_flavour("debug", attn_implementation="eager")
    part = pretrain(cfg, model, data, None, tmp_path / "run", stop_after_steps=2)
    state = Path(part.checkpoint_dir) / "state.pt"
    import torch

    assert set(torch.load(state, map_location="cpu", weights_only=True)) >= {"optimizer", "scheduler", "rng"}
    marker = tmp_path / "unpickled"
    _pickle_bomb(state, marker)
    with pytest.raises(ConfigError, match="state.pt"):
        pretrain(cfg, model, data, None, tmp_path / "run")
    assert not marker.exists()


_MODEL_LOADERS = ("LlamaForCausalLM", "LlamaForSequenceClassification", "AutoModel", "AutoModelForCausalLM",
                  "AutoModelForSequenceClassification", "PreTrainedModel")


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unsafe_loads(path: Path) -> list[str]:
    """Calls in ``path`` that could unpickle: torch.load without weights_only=True, pickle/joblib/dill loads,
    numpy loads with allow_pickle=True, Hugging Face model loads without use_safetensors=True."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno}"
        if name.endswith("torch.load") and _kw(node, "weights_only") is not True:
            bad.append(f"{where}: {name}( without weights_only=True")
        elif name.split(".")[0] in {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle"} and \
                name.rsplit(".", 1)[-1] in {"load", "loads", "Unpickler"}:
            bad.append(f"{where}: {name}(")
        elif name.rsplit(".", 1)[-1] == "load" and name.split(".")[0] in {"np", "numpy"} and \
                _kw(node, "allow_pickle") not in (None, False):
            bad.append(f"{where}: {name}( with allow_pickle")
        elif name.endswith(".from_pretrained") and name.split(".")[-2] in _MODEL_LOADERS and \
                _kw(node, "use_safetensors") is not True and _kw(node, "gguf_file") is None:
            bad.append(f"{where}: {name}( without use_safetensors=True")
    return bad


def test_source_tree_never_unpickles():
    files = sorted(p for d in SOURCES for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 30
    bad = [b for f in files for b in unsafe_loads(f)]
    assert not bad, "loads that may unpickle (use safetensors, weights_only=True, no allow_pickle):\n" + \
        "\n".join(bad)


def test_the_scan_catches_each_kind(tmp_path):
    src = tmp_path / "bad.py"
    src.write_text("import torch, pickle, numpy as np\nfrom transformers import LlamaForCausalLM\n"
                   "torch.load('x')\ntorch.load('x', weights_only=False)\npickle.load(open('x', 'rb'))\n"
                   "np.load('x', allow_pickle=True)\nLlamaForCausalLM.from_pretrained('d')\n"
                   "torch.load('x', weights_only=True)\nnp.load('x')\n"
                   "LlamaForCausalLM.from_pretrained('d', use_safetensors=True)\n")
    assert [b.split(": ", 1)[0].rsplit(":", 1)[1] for b in unsafe_loads(src)] == ["3", "4", "5", "6", "7"]


# ---------------------------------------------------------------------------------------------- confined paths


def test_confined_resolves_dots_and_symlinks(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    assert confined(root / "sub" / "x.json", root, field="f") == (root / "sub" / "x.json").resolve()
    for escape in (root / ".." / "outside" / "x", root / "link" / "x", Path("/etc/passwd"), root):
        with pytest.raises(ConfigError, match="^my.field: .*outside"):
            confined(escape, root, field="my.field")
    with pytest.raises(DataValidationError, match="field 'name'"):
        confined(root / ".." / "x", root, field="name", error=DataValidationError)


@pytest.mark.parametrize("batch_id", ["../../etc", "/etc", "..", ".hidden", "a/b", "ok\n", "a" * 129])
def test_a_batch_id_that_is_not_one_folder_name_is_refused(tmp_path, batch_id):
    from stages.preferences import ingest_file

    src = tmp_path / "export.jsonl"
    src.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "No.", "rating": "better",
                               "category": "helpfulness", "annotator_id": "a"}) + "\n{broken\n")
    root = tmp_path / "home" / "preferences"
    with pytest.raises(ConfigError, match="batch_id"):
        ingest_file(src, root, batch_id=batch_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.jsonl"]  # nothing written anywhere


def test_an_inbox_url_cannot_write_outside_the_cache(tmp_path):
    from tasks.preferences import cache_name, localise

    fs = fsspec.filesystem("memory")  # one store per process: a folder of its own, removed after
    cache = tmp_path / "home" / "preferences" / "cache"
    box = f"/security-{tmp_path.name}/inbox"
    names = [f"{box}/../../../../escape.jsonl", f"{box}/..\\..\\escape.jsonl", f"{box}/.hidden.jsonl",
             f"{box}/ok.jsonl.gz"]
    try:
        for i, name in enumerate(names):
            fs.pipe(name, f"row {i}\n".encode())
            local = Path(localise(f"memory://{name}", cache))
            assert local.parent == cache.resolve() and local.read_text() == f"row {i}\n"
            assert "/" not in cache_name(f"memory://{name}", name) and not local.name.startswith(".")
    finally:
        for name in names:
            if fs.exists(name):
                fs.rm(name)
    assert local.name.endswith("-ok.jsonl.gz")  # the suffix (what the reader dispatches on) survives
    for tail in ("..", ".", "", "../..", "..\\.."):
        name = cache_name(f"s3://bucket/{tail}", f"bucket/{tail}")
        assert "/" not in name and "\\" not in name and name.split("-", 1)[1] not in ("", ".", "..")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    assert len(list(cache.iterdir())) == len(names)


def test_an_inbox_symlink_to_a_file_outside_is_not_an_export(tmp_path):
    from tasks.preferences import inbox_files

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    secret = tmp_path / "secret.jsonl"
    secret.write_text("{}\n")
    (inbox / "leak.jsonl").symlink_to(secret)
    (inbox / "fine.jsonl").write_text("{}\n")
    assert list(inbox_files(str(inbox))) == [str(inbox / "fine.jsonl")]


def test_inbox_scans_take_turns(tmp_path):
    from stages.preferences import inbox_lock

    entered = threading.Event()

    def second() -> None:
        with inbox_lock(tmp_path):
            entered.set()

    with inbox_lock(tmp_path):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.3)  # a second scan waits for the first
    assert entered.wait(10)
    t.join()


def test_e2guardian_lists_stay_inside_their_folder(tmp_path):
    from stages.curation.assets import load_e2guardian_phrases

    root = tmp_path / "phraselists"
    (root / "porn").mkdir(parents=True)
    (tmp_path / "secret").write_text("< a>,< b><50>\n")
    (root / "porn" / "weighted").write_text("< x>,< y><10>\n")
    assert len(load_e2guardian_phrases(root, ["porn/weighted"])) == 1
    with pytest.raises(ConfigError, match="nsfw.e2guardian_lists"):
        load_e2guardian_phrases(root, ["../secret"])
    (root / "porn" / "weighted").write_text(".Include</etc/e2guardian/lists/phraselists/../secret>\n")
    with pytest.raises(DataValidationError, match=r"weighted.*\.Include"):
        load_e2guardian_phrases(root, ["porn/weighted"])


def test_config_paths_stay_under_herd_home(tmp_path, monkeypatch):
    from flows.alignment import sft_base as _base
    from flows.curation import curation_flow
    from stages.presets import smoke

    home = tmp_path / "home"
    (home / "models" / "mine").mkdir(parents=True)
    monkeypatch.setenv("HERD_HOME", str(home))
    cfg = smoke()
    ok = cfg.sft.derive(base=str(home / "models" / "mine"))
    with pytest.raises(ConfigError, match=r"^sft.base: no model weights in .*: run `herd models import mine` first"):
        _base(ok, None, None)
    (home / "models" / "mine" / "model.safetensors").write_bytes(b"")
    assert _base(ok, None, None) == (str((home / "models" / "mine").resolve()),) * 2
    # a relative folder is taken from $HERD_HOME, whatever the working directory (presets name models/NAME)
    monkeypatch.chdir(tmp_path)
    assert _base(cfg.sft.derive(base="models/mine"), None, None)[0] == str((home / "models" / "mine").resolve())
    for base in (str(tmp_path / "elsewhere"), str(home / "models" / ".." / "..")):
        with pytest.raises(ConfigError, match="^sft.base: .*herd sft --base"):
            _base(cfg.sft.derive(base=base), None, None)
    assert _base(cfg.sft.derive(base=str(tmp_path / "elsewhere")), str(tmp_path / "cli"), None)[0] == \
        str(tmp_path / "cli")  # an explicit --base is the user's own choice
    bad = cfg.curation.derive(language=cfg.curation.language.derive(model_path="/etc/passwd").model_dump())
    with pytest.raises(ConfigError, match="^curation.language.model_path"):
        curation_flow.fn([str(tmp_path / "in.jsonl")], None, bad, cfg.fetch)


def test_staleness_counts_batches_the_current_rm_has_not_seen(tmp_path):
    from stages.common import write_json_atomic
    from stages.reward import trained_batches

    rm = tmp_path / "rm" / "model"
    rm.mkdir(parents=True)
    assert trained_batches(rm) is None
    write_json_atomic(tmp_path / "rm" / "manifest.json", {"result": {"batches": ["b1", "b2"]}})
    assert trained_batches(rm) == ["b1", "b2"]
