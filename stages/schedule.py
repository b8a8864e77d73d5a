"""Llama 3's pretraining after the main run: long-context stages, then an anneal with checkpoint averaging.

Llama 3 pretrained at 8K tokens, then raised the context in six stages to 128K (RoPE theta 500,000),
moving on only when short-context performance had recovered and long-document perplexity fell; it
ended by annealing the learning rate linearly to zero on upsampled high-quality data and averaging
the checkpoints taken during the anneal (Polyak averaging).

``continue_pretraining(cfg, init_model_dir, ...)`` is one such stage: it continues a saved model with
``stages.pretrain.pretrain`` (document masking, exact resume, its own token budget, upsampled windows)
and then measures what the stage is for:

- held-out loss bucketed by the token's position inside its document (``0-127``, ``128-255``, ...) at
  the stage's length, before (the model it started from) and after;
- short-context held-out loss (at the main run's length) against the main run's model: the stage
  passes when it is within ``short_tolerance`` of it;
- passkey retrieval (Mohtashami & Jaggi 2023): a five-digit number hidden at a random depth in filler
  text, asked for at the end, scored by ranking the true key's log-likelihood among ``passkey_choices``
  keys (chance: 1 / choices), at each length up to the stage's.

It writes ``out_dir/train`` (the pretraining run: ``model/``, and with averaging ``last/``),
``positions.png`` and ``manifest.json`` (last).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

from stages.common import NULL_SINK, MetricsSink, StageConfig, read_manifest, write_json_atomic
from stages.errors import ConfigError, DataValidationError
from stages.model import ModelConfig, load_causal_lm, packed_inputs
from stages.pretrain import IGNORE_INDEX, PretrainConfig, PretrainResult, TokenSplit, pretrain, token_losses, \
    window_weights

log = logging.getLogger(__name__)

HIGH_QUALITY = {"reference": 3.0, "books": 3.0, "code": 3.0}


class ContextStageConfig(StageConfig):
    """One long-context stage: continue the previous model at a longer sequence length."""

    seq_len: int = Field(256, ge=2, description="tokens per packed sequence in this stage (the new context)")
    rope_theta: float = Field(500000.0, gt=0, description="RoPE base frequency from this stage on (Llama 3: 500000)")
    tokens: int = Field(100_000, ge=1, description="training tokens of this stage")
    lr: float | None = Field(None, gt=0, description="peak learning rate (warmup, then cosine to min_lr_ratio of "
                             "it); None: where the main run's schedule ended (its lr x min_lr_ratio)")
    warmup_steps: int = Field(5, ge=0, description="linear warmup steps")
    long_doc_weight: float = Field(4.0, gt=0, description="windows that one document fills at least half of are "
                                   "drawn this many times as often (Llama 3 upsampled long documents)")


class AnnealConfig(StageConfig):
    """The anneal: the learning rate decays linearly to zero on a mix that upsamples high-quality sources,
    and the final base model is the mean of the weights taken along the way."""

    tokens: int = Field(0, ge=0, description="training tokens of the anneal (0: no anneal)")
    lr: float | None = Field(None, gt=0, description="learning rate at the anneal's start; it decays linearly to 0 "
                             "(None: where the main run's schedule ended, its lr x min_lr_ratio)")
    source_weights: dict[str, float] = Field(default_factory=lambda: dict(HIGH_QUALITY),
                                             description="upsampling by source (default: reference, books and code "
                                             "three times as often)")
    average_last: int = Field(4, ge=0, description="weight snapshots averaged into the final model (evenly spaced, "
                              "ending at the last step; 0 or 1: the last weights)")


class ProbeConfig(StageConfig):
    """What each continued stage is measured on."""

    main_seq_len: int = Field(128, ge=2, description="the main run's sequence length (the short-context check)")
    bucket: int = Field(128, ge=1, description="position bucket width of the position-bucketed held-out loss")
    eval_tokens: int = Field(65_536, ge=1, description="held-out tokens scored per measurement")
    short_tolerance: float = Field(0.02, ge=0, description="a stage passes when its short-context held-out loss is "
                                   "at most (1 + this) x the main run's")
    passkey_trials: int = Field(20, ge=0, description="passkey prompts per length (0: no passkey test)")
    passkey_choices: int = Field(10, ge=2, description="keys ranked per prompt (the true one among random others)")
    micro_batch_size: int = Field(4, ge=1, description="sequences per forward when measuring")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="device for the measurements")


class ContinueConfig(StageConfig):
    """A continued pretraining stage: its training run, its shape changes and its measurements."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]*$", description="stage name (ctx-256, anneal, ...)")
    train: PretrainConfig = Field(..., description="the stage's training run")
    rope_theta: float | None = Field(None, gt=0, description="RoPE theta from this stage on (None: the model's own)")
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="measurements")
    positions: bool = Field(True, description="measure position-bucketed loss and passkey before and after")


class ContinueResult(BaseModel):
    name: str
    model_dir: str
    last_model_dir: str | None  # with averaging: the last weights (model_dir: their mean)
    seq_len: int
    rope_theta: float
    train: PretrainResult
    position_loss: dict[str, dict[str, float]]  # "before"/"after" -> bucket "0-127" -> mean loss
    short_loss: float | None  # held-out loss at the main run's length, this stage's model
    short_loss_last: float | None = None  # the same for the last weights, where the model is their average
    main_short_loss: float | None  # the same for the main run's model
    passed: bool | None  # short_loss within tolerance of main_short_loss
    passkey: dict[str, dict[str, float]]  # "before"/"after" -> length -> accuracy
    figure: str | None


def _end_lr(main: PretrainConfig) -> float:
    return main.lr * main.min_lr_ratio if main.min_lr_ratio > 0 else main.lr * 0.1


def context_train_config(main: PretrainConfig, stage: ContextStageConfig) -> PretrainConfig:
    """The main run's settings at the stage's length: about the main batch in tokens (whole sequences), the
    stage's budget, learning rate and long-document upsampling; no averaging, no in-loop benchmarks."""
    seqs = max(1, main.batch_tokens // stage.seq_len)
    mbs = math.gcd(seqs, main.micro_batch_size)
    return main.derive(seq_len=stage.seq_len, batch_tokens=seqs * stage.seq_len, micro_batch_size=mbs, steps=None,
                       max_tokens=max(stage.tokens, seqs * stage.seq_len), lr=stage.lr or _end_lr(main),
                       warmup_steps=stage.warmup_steps, schedule="cosine", long_doc_weight=stage.long_doc_weight,
                       source_weights={}, average_last=0, downstream_every=0, eval_every=0)


def anneal_train_config(main: PretrainConfig, anneal: AnnealConfig, seq_len: int) -> PretrainConfig:
    """The anneal at the final context length: linear decay from ``anneal.lr`` to zero, upsampled sources,
    ``average_last`` snapshots."""
    seqs = max(1, main.batch_tokens // seq_len)
    mbs = math.gcd(seqs, main.micro_batch_size)
    return main.derive(seq_len=seq_len, batch_tokens=seqs * seq_len, micro_batch_size=mbs, steps=None,
                       max_tokens=max(anneal.tokens, seqs * seq_len), lr=anneal.lr or _end_lr(main), warmup_steps=0,
                       schedule="linear", min_lr_ratio=0.0, source_weights=dict(anneal.source_weights),
                       long_doc_weight=1.0, average_last=anneal.average_last, downstream_every=0, eval_every=0)


# ---------------------------------------------------------------------------------------------- measurements


def bucket_names(seq_len: int, bucket: int) -> list[str]:
    return [f"{lo}-{min(lo + bucket, seq_len) - 1}" for lo in range(0, seq_len, bucket)]


@torch.no_grad()
def _window_losses(model, split: TokenSplit, seq_len: int, eval_tokens: int, micro_batch_size: int,
                   device: torch.device):
    """Per-token held-out losses over the first ``eval_tokens`` tokens of ``split`` packed in windows of ``seq_len``
    with document masking: yields (losses (B, T), document positions (B, T), scored mask (B, T)) per micro-batch."""
    n = min(split.n_windows(seq_len), max(1, eval_tokens // seq_len))
    was_training = model.training
    model.eval()
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    starts = np.arange(n, dtype=np.int64) * seq_len
    try:
        for i in range(0, n, micro_batch_size):
            ids, labels, docs = split.windows(starts[i: i + micro_batch_size], seq_len)
            mask, pos = packed_inputs(torch.from_numpy(docs[:, :-1]).to(device), attn_implementation=attn)
            logits = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=mask, position_ids=pos).logits
            tl = token_losses(logits, torch.from_numpy(labels).to(device)).cpu().numpy()
            yield tl, pos.cpu().numpy(), labels != IGNORE_INDEX
    finally:
        model.train(was_training)


def position_losses(model, split: TokenSplit, seq_len: int, bucket: int, eval_tokens: int, micro_batch_size: int,
                    device: torch.device) -> dict[str, float]:
    """Mean held-out loss of the next-token predictions made at each position bucket of their document (at
    position p the model has seen p + 1 tokens of it), over the first ``eval_tokens`` tokens of ``split``
    packed in windows of ``seq_len`` with document masking. Buckets no prediction reached are left out."""
    names = bucket_names(seq_len, bucket)
    sums, counts = np.zeros(len(names)), np.zeros(len(names), dtype=np.int64)
    for tl, pos, valid in _window_losses(model, split, seq_len, eval_tokens, micro_batch_size, device):
        b = pos // bucket  # the prediction made at document position p (from p + 1 tokens)
        np.add.at(sums, b[valid], tl[valid])
        np.add.at(counts, b[valid], 1)
    return {names[k]: float(sums[k] / counts[k]) for k in range(len(names)) if counts[k]}


def heldout_loss(model, split: TokenSplit, seq_len: int, eval_tokens: int, micro_batch_size: int,
                 device: torch.device) -> float:
    """Held-out loss at ``seq_len`` (document masking), over the first ``eval_tokens`` tokens."""
    loss_sum, total = 0.0, 0
    for tl, _, valid in _window_losses(model, split, seq_len, eval_tokens, micro_batch_size, device):
        loss_sum += float(tl[valid].sum())
        total += int(valid.sum())
    return loss_sum / max(1, total)


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def passkey_room(tokenizer, length: int) -> int:
    """Tokens left for filler in a passkey prompt of ``length`` tokens (negative: it does not fit)."""
    enc = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    fixed = PASSKEY_INTRO + " The pass key is 99999. Remember it. 99999 is the pass key. What is the pass key? " \
        "The pass key is 99999"
    return length - len(enc(fixed)) - 4


def passkey_prompt(tokenizer, length: int, key: int, depth: float) -> list[int]:
    """Token ids of a passkey prompt of at most ``length`` tokens (with the key's tokens appended): the key
    line at ``depth`` (0: first, 1: last) of the filler, the question at the end."""
    enc = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    intro, filler = enc(PASSKEY_INTRO + " "), enc(" " + PASSKEY_FILLER)
    needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key.")
    question = enc(" What is the pass key? The pass key is")
    answer = enc(f" {key}")
    room = length - len(intro) - len(needle) - len(question) - len(answer)
    if room < 0:
        raise ConfigError(f"probe.main_seq_len: passkey prompts need more than {length} tokens with this "
                          f"tokenizer; raise it or set probe.passkey_trials to 0")
    reps = room // max(1, len(filler))
    before = int(round(depth * reps))
    return intro + filler * before + needle + filler * (reps - before) + question


@torch.no_grad()
def passkey_accuracy(model, tokenizer, length: int, trials: int, choices: int, seed: int,
                     device: torch.device) -> float:
    """Share of ``trials`` passkey prompts of ``length`` tokens whose true key has the highest log-likelihood
    among ``choices`` five-digit keys (chance: 1 / choices)."""
    rng = np.random.default_rng([seed, length])
    was_training = model.training
    model.eval()
    hits = 0
    for t in range(trials):
        keys = rng.choice(np.arange(10_000, 100_000), size=choices, replace=False)
        prompt = passkey_prompt(tokenizer, length, int(keys[0]), float(rng.uniform(0, 1)))
        answers = [tokenizer(f" {int(k)}", add_special_tokens=False).input_ids for k in keys]
        width = max(map(len, answers))  # right padding: causal attention keeps it out of the scored positions
        ids = torch.tensor([prompt + a + [0] * (width - len(a)) for a in answers], device=device)
        valid = torch.tensor([[1.0] * len(a) + [0.0] * (width - len(a)) for a in answers], device=device)
        logp = torch.log_softmax(model(input_ids=ids).logits[:, len(prompt) - 1: -1].float(), -1)
        scores = (logp.gather(-1, ids[:, len(prompt):, None])[..., 0] * valid).sum(-1)
        hits += int(torch.argmax(scores).item() == 0)
    model.train(was_training)
    return hits / max(1, trials)


def plot_position_losses(curves: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, losses in curves.items():
        ax.plot(list(losses), list(losses.values()), marker="o", label=label)
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _measure(model_dir: str | Path, cfg: ContinueConfig, seq_len: int, heldout: TokenSplit | None, tokenizer,
             device: torch.device, rope_theta: float | None = None) -> tuple[dict[str, float], dict[str, float]]:
    model = load_causal_lm(model_dir, rope_theta=rope_theta, max_seq_len=seq_len).to(device)
    p = cfg.probe
    losses = position_losses(model, heldout, seq_len, p.bucket, p.eval_tokens, p.micro_batch_size, device) \
        if heldout is not None else {}
    keys: dict[str, float] = {}
    if tokenizer is not None and p.passkey_trials:
        length = p.main_seq_len
        while length <= seq_len:
            if passkey_room(tokenizer, length) < 0:  # too short for the prompt with this tokenizer
                length *= 2
                continue
            keys[str(length)] = passkey_accuracy(model, tokenizer, length, p.passkey_trials, p.passkey_choices,
                                                 cfg.train.seed, device)
            length *= 2
    return losses, keys


def continue_pretraining(cfg: ContinueConfig, init_model_dir: str | Path, data_dir: str | Path,
                         heldout_dir: str | Path | None, out_dir: str | Path, *, main_model_dir: str | Path | None = None,
                         tokenizer_dir: str | Path | None = None, sink: MetricsSink = NULL_SINK,
                         stop_after_steps: int | None = None) -> ContinueResult | None:
    """Continue ``init_model_dir`` on ``data_dir`` as ``cfg`` says and measure it (module docstring).

    Returns None when stopped by ``stop_after_steps`` (a later call resumes from the checkpoint). A complete
    ``manifest.json`` short-circuits."""
    from stages.device import resolve_device

    out_dir = Path(out_dir)
    done = read_manifest(out_dir)
    if done is not None and "result" in done:
        return ContinueResult.model_validate(done["result"])
    base = ModelConfig.from_pretrained(init_model_dir)
    theta = cfg.rope_theta or base.rope_theta
    model_cfg = base.derive(max_seq_len=max(base.max_seq_len, cfg.train.seq_len), rope_theta=theta)
    res = pretrain(cfg.train, model_cfg, data_dir, heldout_dir, out_dir / "train", sink=sink,
                   init_model_dir=init_model_dir, stop_after_steps=stop_after_steps)
    if not res.completed:
        return None
    device = resolve_device(cfg.probe.device)
    heldout = TokenSplit(heldout_dir) if heldout_dir is not None and TokenSplit(heldout_dir).n_windows(
        cfg.train.seq_len) else None
    tokenizer = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    positions: dict[str, dict[str, float]] = {}
    passkey: dict[str, dict[str, float]] = {}
    figure = None
    if cfg.positions:
        for label, model_dir in (("before", init_model_dir), ("after", res.model_dir)):
            positions[label], passkey[label] = _measure(model_dir, cfg, cfg.train.seq_len, heldout, tokenizer, device)
        if positions.get("after"):
            figure = str(out_dir / "positions.png")
            plot_position_losses(positions, out_dir / "positions.png",
                                 f"{cfg.name}: held-out loss by position (seq_len {cfg.train.seq_len})")
    short = short_last = main_short = passed = None
    if heldout is not None and main_model_dir is not None:
        p = cfg.probe
        short_split = TokenSplit(heldout_dir)
        short = heldout_loss(load_causal_lm(res.model_dir).to(device), short_split, p.main_seq_len, p.eval_tokens,
                             p.micro_batch_size, device)
        main_short = heldout_loss(load_causal_lm(main_model_dir).to(device), short_split, p.main_seq_len,
                                  p.eval_tokens, p.micro_batch_size, device)
        if res.last_model_dir:
            short_last = heldout_loss(load_causal_lm(res.last_model_dir).to(device), short_split, p.main_seq_len,
                                      p.eval_tokens, p.micro_batch_size, device)
        passed = bool(short <= main_short * (1 + p.short_tolerance))
        if not passed:
            log.warning("%s: short-context held-out loss %.4f is above the main run's %.4f by more than %.0f%%",
                        cfg.name, short, main_short, 100 * p.short_tolerance)
    result = ContinueResult(name=cfg.name, model_dir=res.model_dir, last_model_dir=res.last_model_dir,
                            seq_len=cfg.train.seq_len, rope_theta=theta, train=res, position_loss=positions,
                            short_loss=short, short_loss_last=short_last, main_short_loss=main_short, passed=passed,
                            passkey=passkey,
                            figure=figure)
    write_json_atomic(out_dir / "manifest.json", {"stage": "continue-pretraining", "config": cfg.model_dump(mode="json"),
                                                  "result": result.model_dump(mode="json")})
    return result


def stage_configs(main: PretrainConfig, stages: list[ContextStageConfig], anneal: AnnealConfig,
                  probe: ProbeConfig) -> list[ContinueConfig]:
    """Main -> each context stage -> the anneal (at the last stage's length and theta), as continued stages."""
    out = []
    seq_len = main.seq_len
    for st in stages:
        if st.seq_len <= seq_len:
            raise ConfigError(f"pretraining.context_stages: each stage must lengthen the context (seq_len "
                              f"{st.seq_len} after {seq_len})")
        out.append(ContinueConfig(name=f"ctx-{st.seq_len}", train=context_train_config(main, st),
                                  rope_theta=st.rope_theta, probe=probe))
        seq_len = st.seq_len
    if anneal.tokens:
        out.append(ContinueConfig(name="anneal", train=anneal_train_config(main, anneal, seq_len), probe=probe,
                                  positions=False))
    return out


# ---------------------------------------------------------------------------------------------- anneal test


NEW_SOURCE = "anneal-test"


class AnnealTestConfig(StageConfig):
    """Llama 3's way of judging a small new dataset: anneal a partly trained model with a share of the anneal on
    the dataset and compare its benchmarks with an anneal without it."""

    weight: float = Field(0.3, gt=0, lt=1, description="share of the anneal's windows drawn from the new dataset "
                          "(Llama 3: 30%)")
    anneal: AnnealConfig = Field(default_factory=lambda: AnnealConfig(tokens=40_000),
                                 description="the anneal both runs share (tokens, learning rate, source weights, "
                                 "averaging)")
    max_docs: int = Field(100_000, ge=1, description="documents read from the dataset at most")


class AnnealTestResult(BaseModel):
    with_dataset: ContinueResult
    without_dataset: ContinueResult
    dataset_docs: int
    dataset_tokens: int
    share: float  # expected share of the with-run's windows from the dataset (by the draw weights)
    split: str  # the combined training split


def mix_in_dataset(base_split: str | Path, dataset: str | Path, tokenizer_dir: str | Path, out_dir: str | Path,
                   max_docs: int) -> dict:
    """``base_split`` plus the documents of ``dataset`` (JSONL(.gz) records with a string ``text``), tokenised as
    the base split was (its manifest's BOS/EOS), as one split whose new documents have source ``anneal-test``.
    A bad record is a ``DataValidationError`` naming the file, line and field."""
    from stages.common import atomic_dir, iter_jsonl
    from stages.tokenizer import load_tokenizer

    base_split, dataset, out_dir = Path(base_split), Path(dataset), Path(out_dir)
    if not dataset.is_file():
        raise DataValidationError("no such file (give a JSONL or JSONL.gz file of records with a 'text' field)",
                                  file=str(dataset))
    done = read_manifest(out_dir)
    if done is not None:
        return done
    parent = read_manifest(base_split.parent) or {}
    base = TokenSplit(base_split)
    tok = load_tokenizer(Path(tokenizer_dir))
    eos = parent.get("eos_id", tok.token_to_id("<|end_of_text|>"))
    prefix = [parent["bos_id"]] if (parent.get("config") or {}).get("add_bos") and parent.get("bos_id") is not None \
        else []
    docs: list[list[int]] = []
    for n, rec in iter_jsonl(dataset):
        if len(docs) >= max_docs:
            break
        text = rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise DataValidationError("record has no string text", file=str(dataset), line=n, field="text")
        if text:
            docs.append(prefix + tok.encode(text).ids + [eos])
    if not docs:
        raise DataValidationError("no documents with text", file=str(dataset), field="text")
    dtype = base.tokens.dtype
    with atomic_dir(out_dir) as tmp:
        new = np.concatenate([np.asarray(d, dtype=dtype) for d in docs])
        with open(tmp / "tokens.bin", "wb") as fh:
            fh.write(np.asarray(base.tokens).tobytes())
            fh.write(new.tobytes())
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        offsets = np.concatenate([base.offsets, base.offsets[-1] + np.cumsum(lengths)])
        np.save(tmp / "doc_offsets.npy", offsets)
        names = sorted(set(base.sources.tolist())) + [NEW_SOURCE]
        index = {s: i for i, s in enumerate(names)}
        np.save(tmp / "doc_sources.npy", np.array([index[s] for s in base.sources.tolist()]
                                                  + [index[NEW_SOURCE]] * len(docs), dtype=np.int32))
        (tmp / "sources.json").write_text(json.dumps(names))
        info = {"docs": int(len(offsets) - 1), "tokens": int(offsets[-1]), "dtype": np.dtype(dtype).name,
                "vocab_size": base.vocab_size, "dataset": str(dataset), "dataset_docs": len(docs),
                "dataset_tokens": int(lengths.sum()), "base_split": str(base_split)}
        (tmp / "shard.json").write_text(json.dumps(info))
        write_json_atomic(tmp / "manifest.json", info)
    return info


def anneal_test(cfg: AnnealTestConfig, main: PretrainConfig, probe: ProbeConfig, model_dir: str | Path,
                base_split: str | Path, heldout_dir: str | Path | None, dataset: str | Path,
                tokenizer_dir: str | Path, out_dir: str | Path, *, sink: MetricsSink = NULL_SINK) -> AnnealTestResult:
    """Anneal ``model_dir`` twice on the same budget and seed: on the base split with ``cfg.weight`` of the
    windows drawn from ``dataset``, and on the base split alone. Writes ``out_dir/{tokens,with,without}``."""
    from stages.pretrain import main_documents

    out_dir = Path(out_dir)
    info = mix_in_dataset(base_split, dataset, tokenizer_dir, out_dir / "tokens", cfg.max_docs)
    combined = TokenSplit(out_dir / "tokens")
    seq_len = main.seq_len
    # the dataset's draw weight, so that its windows make cfg.weight of the (weighted) draws
    doc, _ = main_documents(combined, seq_len)
    is_new = combined.sources[doc] == NEW_SOURCE
    if not is_new.any():
        raise DataValidationError(f"the dataset's {info['dataset_tokens']} tokens fill no window of {seq_len} "
                                  "tokens: give more text", file=str(dataset))
    old = window_weights(combined, seq_len, dict(cfg.anneal.source_weights), 1.0)[~is_new].sum()
    w_new = cfg.weight / (1 - cfg.weight) * old / is_new.sum()
    base_cfg = anneal_train_config(main, cfg.anneal, seq_len)
    with_cfg = ContinueConfig(name="anneal-with", train=base_cfg.derive(
        source_weights={**cfg.anneal.source_weights, NEW_SOURCE: float(w_new)}), probe=probe, positions=False)
    without_cfg = ContinueConfig(name="anneal-without", train=base_cfg, probe=probe, positions=False)
    with_res = continue_pretraining(with_cfg, model_dir, out_dir / "tokens", heldout_dir, out_dir / "with",
                                    main_model_dir=model_dir, sink=sink)
    without_res = continue_pretraining(without_cfg, model_dir, base_split, heldout_dir, out_dir / "without",
                                       main_model_dir=model_dir, sink=sink)
    w = window_weights(combined, seq_len, with_cfg.train.source_weights, 1.0)
    return AnnealTestResult(with_dataset=with_res, without_dataset=without_res, dataset_docs=info["dataset_docs"],
                            dataset_tokens=info["dataset_tokens"], share=float(w[is_new].sum() / w.sum()),
                            split=str(out_dir / "tokens"))
