"""The demo pool, built once and cached: a tokenizer, a base pretrained on every domain, and one
expert fine-tuned from the base per domain, each saved with ``save_pretrained``.

    pool = build_or_load_pool(FULL.pool, corpus, default_cache_dir())
    ExpertPool(pool.base_dir, pool.experts, device="cpu", dtype=torch.float32)

The cache folder is named by a hash of the settings and of the corpus text, so changing either
builds a new pool beside the old one. Each piece (tokenizer, base, every expert) is written to a
temporary folder and renamed into place, and ``pool.json`` is written last: an interrupted build
keeps its finished pieces and resumes with the next one; a pool with ``pool.json`` is complete.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from hf_mergelaw.files import read_json, write_json

from .corpus import Corpus
from .settings import PoolSettings, digest
from .tokenizer import train_tokenizer
from .training import TrainLog, new_model, token_stream, train_causal_lm

# Bump when the build changes what a pool holds, so old caches are not reused.
POOL_FORMAT = 1
MANIFEST = "pool.json"
_TRAIN_LOG = "train_log.json"


@dataclass(frozen=True)
class DemoPool:
    """A complete pool on disk. ``built`` is False when it came from the cache."""

    root: Path
    base_dir: Path
    experts: dict[str, Path]
    built: bool
    manifest: dict[str, Any]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hf-mergelaw/demo`` (``~/.cache/hf-mergelaw/demo``)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "hf-mergelaw" / "demo"


def pool_key(settings: PoolSettings, corpus: Corpus) -> str:
    return digest({"format": POOL_FORMAT, "settings": asdict(settings), "corpus": corpus.digest()})


def build_or_load_pool(
    settings: PoolSettings, corpus: Corpus, cache_dir: Path, *, progress: bool = True
) -> DemoPool:
    """The cached pool for these settings and corpus; trains what is missing first."""
    root = Path(cache_dir) / f"pool-{pool_key(settings, corpus)}"
    manifest_path = root / MANIFEST
    built = not manifest_path.exists()
    if built:
        manifest = build_pool(settings, corpus, root, progress=progress)
        write_json(manifest_path, manifest)
    manifest = read_json(manifest_path, "demo pool manifest")
    return DemoPool(
        root=root,
        base_dir=root / "base",
        experts={name: root / "experts" / name for name in manifest["experts"]},
        built=built,
        manifest=manifest,
    )


def build_pool(
    settings: PoolSettings, corpus: Corpus, root: Path, *, progress: bool = True
) -> dict[str, Any]:
    """Train (or pick up) every piece of the pool under ``root``; returns the manifest."""
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(root / "tokenizer", corpus, settings.vocab_size)
    streams = {d.name: token_stream(tokenizer, d.train) for d in corpus.domains}

    def train_base() -> tuple[LlamaForCausalLM, TrainLog]:
        model = new_model(settings, tokenizer)
        desc = "base (all domains)"
        log = _train(model, list(streams.values()), settings, "base", settings.seed, desc, progress)
        return model, log

    base_log = _saved_model(root / "base", train_base, tokenizer)
    expert_logs = {}
    for index, name in enumerate(corpus.names, 1):

        def train_expert(name: str = name, index: int = index) -> tuple[LlamaForCausalLM, TrainLog]:
            model = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
            desc = f"expert {index}/{len(corpus.names)} ({name})"
            seed = settings.seed + index
            log = _train(model, [streams[name]], settings, "expert", seed, desc, progress)
            return model, log

        expert_logs[name] = _saved_model(root / "experts" / name, train_expert, tokenizer)
    base = LlamaForCausalLM.from_pretrained(root / "base")
    return {
        "format": POOL_FORMAT,
        "settings": asdict(settings),
        "corpus_digest": corpus.digest(),
        "num_parameters": sum(p.numel() for p in base.parameters()),
        "vocab_size": len(tokenizer),
        "domains": {
            d.name: {
                "files": len(d.files),
                "held_out_files": list(d.held_out_files),
                "train_chars": d.train_chars,
                "train_tokens": int(streams[d.name].numel()),
                "held_out_chars": d.held_out_chars,
            }
            for d in corpus.domains
        },
        "base": asdict(base_log),
        "experts": {name: asdict(log) for name, log in expert_logs.items()},
        "build_seconds": time.perf_counter() - start,
    }


def _train(
    model: LlamaForCausalLM,
    streams: list[torch.Tensor],
    settings: PoolSettings,
    stage: str,
    seed: int,
    desc: str,
    progress: bool,
) -> TrainLog:
    """Train the base (``stage="base"``) or an expert with the settings' schedule."""
    return train_causal_lm(
        model,
        streams,
        steps=getattr(settings, f"{stage}_steps"),
        lr=getattr(settings, f"{stage}_lr"),
        batch_size=settings.batch_size,
        seq_len=settings.seq_len,
        seed=seed,
        desc=desc,
        progress=progress,
    )


def _tokenizer(path: Path, corpus: Corpus, vocab_size: int) -> PreTrainedTokenizerFast:
    if not path.exists():
        texts = [text for domain in corpus.domains for text in domain.train]
        _save_atomically(path, train_tokenizer(texts, vocab_size).save_pretrained)
    return PreTrainedTokenizerFast.from_pretrained(path)


def _saved_model(
    path: Path,
    train: Callable[[], tuple[LlamaForCausalLM, TrainLog]],
    tokenizer: PreTrainedTokenizerFast,
) -> TrainLog:
    """The training log of the model saved at ``path``, training and saving it first if absent."""
    if not path.exists():
        model, log = train()

        def save(folder: Path) -> None:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            write_json(folder / _TRAIN_LOG, asdict(log))

        _save_atomically(path, save)
    return TrainLog(**read_json(path / _TRAIN_LOG, "demo training log"))


def _save_atomically(path: Path, save: Callable[[Path], Any]) -> None:
    """Let ``save`` fill a temporary folder beside ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
