"""Tokenize once, cache on disk, and serve length-bucketed, per-batch-padded batches."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

PAD_MULTIPLE = 8  # few distinct padded lengths: fewer kernel shapes, fewer recompiles


def pad_multiple_for(device: torch.device) -> int:
    """GPUs: widths a multiple of 8 (tensor-core tiles, few kernel shapes). CPU: no rounding; CPU
    matmuls gain nothing from it, and each padded token costs a real token's work (measured on
    MiniLM: rounding to 8 made a training step about 12% slower)."""
    return 1 if device.type == "cpu" else PAD_MULTIPLE


@dataclass
class TokenizedSet:
    """Ragged token ids stored flat: row i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64, len n+1
    labels: Optional[np.ndarray]  # int64 or None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def cache_dir() -> Path:
    return Path(os.environ.get("BUDGETLORA_CACHE", Path.home() / ".cache" / "budgetlora")) / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cache_key(tokenizer, texts: list[str], max_length: int) -> str:
    digest = hashlib.sha256()
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(str(max_length).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()[:32]


def _tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    pieces, lengths = [], []
    for start in range(0, len(texts), 2048):
        encoded = tokenizer(texts[start:start + 2048], truncation=True, max_length=max_length,
                            add_special_tokens=True, return_attention_mask=False,
                            return_token_type_ids=False)["input_ids"]
        for row in encoded:
            pieces.append(np.asarray(row, dtype=np.int32))
            lengths.append(len(row))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return ids, offsets


def tokenize(tokenizer, texts: list[str], labels: Optional[np.ndarray], max_length: int,
             use_cache: bool = True) -> TokenizedSet:
    """Token ids for `texts`, from the disk cache when the same tokenizer saw the same texts."""
    path = cache_dir() / f"{_cache_key(tokenizer, texts, max_length)}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                return TokenizedSet(cached["ids"], cached["offsets"], labels)
        except (OSError, ValueError, KeyError):
            pass  # a corrupt cache entry is rebuilt below
    ids, offsets = _tokenize(tokenizer, texts, max_length)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
                np.savez(handle, ids=ids, offsets=offsets)
            os.replace(handle.name, path)
        except OSError:
            pass  # the cache is an optimisation; an unwritable home must not fail the run
    return TokenizedSet(ids, offsets, labels)


def bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                     bucket_factor: int = 50) -> list[np.ndarray]:
    """One epoch of training batches: shuffled, then sorted by length inside windows of
    `bucket_factor` batches so each batch pads little, then the batch order is shuffled again.
    Deterministic in (seed, epoch), which makes resuming at a batch index exact."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * bucket_factor
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    # a short final batch would add one odd shape and a noisy step: drop it when others exist
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches = [b for b in batches if len(b) == batch_size] or batches
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def sorted_batches(lengths: np.ndarray, batch_tokens: int, max_batch: int) -> list[np.ndarray]:
    """Inference batches of similar length, sized by a token budget; callers restore the order."""
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[min(start + max_batch, len(order)) - 1]])
        size = max(1, min(max_batch, batch_tokens // max(longest, 1)))
        batches.append(order[start:start + size])
        start += size
    return batches


def collate(data: TokenizedSet, index: np.ndarray, pad_id: int,
            pad_multiple: int = PAD_MULTIPLE, pad_to: Optional[Sequence[int]] = None) -> dict[str, torch.Tensor]:
    """Rows `index` padded to their longest (rounded up to `pad_multiple`), or to the smallest of
    the fixed widths `pad_to` that fits (compiled models: one graph per width)."""
    lengths = data.lengths[index]
    width = int(lengths.max())
    fitting = [w for w in (pad_to or ()) if w >= width]
    width = min(fitting) if fitting else -(-width // pad_multiple) * pad_multiple
    input_ids = np.full((len(index), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    for row, (i, n) in enumerate(zip(index, lengths)):
        start = data.offsets[i]
        input_ids[row, :n] = data.ids[start:start + n]
        mask[row, :n] = 1
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
    if data.labels is not None:
        batch["labels"] = torch.from_numpy(data.labels[index])
    return batch


def epoch_batches(data: TokenizedSet, batch_size: int, seed: int, epoch: int,
                  skip: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(batch position, indices) for one epoch, from position `skip` on (for resume)."""
    batches = bucketed_batches(data.lengths, batch_size, seed, epoch)
    for position in range(skip, len(batches)):
        yield position, batches[position]
