"""Tokenize once, cache on disk, and serve length-bucketed, per-batch-padded batches."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from budgetlora import atomic
from budgetlora.errors import WriteError

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
    labels: Optional[np.ndarray]  # int64 classes, float32 rows x outputs (multi-label, regression), or None
    full_lengths: Optional[np.ndarray] = None  # int64 token counts before truncation, when known
    segments: Optional[np.ndarray] = None  # int8 segment id per token (text pairs, models that have them)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def first(self, n: int) -> "TokenizedSet":
        """The first `n` rows (all when n >= len)."""
        n = min(n, len(self))
        end = int(self.offsets[n])
        return TokenizedSet(
            self.ids[:end],
            self.offsets[: n + 1],
            None if self.labels is None else self.labels[:n],
            None if self.full_lengths is None else self.full_lengths[:n],
            None if self.segments is None else self.segments[:end],
        )

    def truncation(self, max_length: int) -> dict:
        """How many rows were cut at `max_length`, with percentiles of the untruncated lengths."""
        lengths = self.full_lengths if self.full_lengths is not None else self.lengths
        cut = int(np.count_nonzero(lengths > max_length))
        stats = {
            "rows": len(self),
            "truncated": cut,
            "truncated_fraction": cut / max(len(self), 1),
            "max_length": int(max_length),
        }
        if len(self):
            for q in (50, 90, 99):
                stats[f"p{q}"] = int(np.percentile(lengths, q))
            stats["max"] = int(lengths.max())
        return stats


def cache_dir() -> Path:
    return Path(os.environ.get("BUDGETLORA_CACHE", Path.home() / ".cache" / "budgetlora")) / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def uses_segments(tokenizer) -> bool:
    """Whether the tokenizer marks a pair's second text with segment id 1 (BERT-style pairs;
    RoBERTa-style tokenizers separate the texts with tokens only). The model must have segment
    embeddings too: `model.takes_segments`."""
    try:
        ids = tokenizer("a", "b", return_token_type_ids=True).get("token_type_ids") or []
    except Exception:  # noqa: BLE001 - a tokenizer without pair support: no segments
        return False
    return max(ids, default=0) == 1


def _cache_key(tokenizer, texts: list[str], max_length: int, pairs: Optional[list[str]] = None) -> str:
    digest = hashlib.sha256()
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(str(max_length).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    if pairs is not None:
        digest.update(b"pairs\x00")
        for text in pairs:
            digest.update(text.encode("utf-8", "surrogatepass"))
            digest.update(b"\x00")
    return digest.hexdigest()[:32]


# A token covers at most this many characters (WordPiece reads a longer word as one [UNK]; BPE and
# SentencePiece pieces are shorter): a text cut to max_length x this loses nothing truncation keeps,
# and a 16 MB field is not tokenized whole to keep its first 128 tokens.
CHARS_PER_TOKEN = 100
UNTRUNCATED_CHARS = 200_000  # the length report of a cut row counts at most this many characters


def _encode(
    tokenizer, texts: list[str], max_length: Optional[int], pairs: Optional[list[str]] = None, segments: bool = False
) -> tuple[list[list[int]], Optional[list[list[int]]]]:
    """Token ids (and, with `segments`, a pair's segment ids); a pair is cut longest side first."""
    limit = max_length * CHARS_PER_TOKEN + CHARS_PER_TOKEN if max_length is not None else UNTRUNCATED_CHARS
    texts = [t if len(t) <= limit else t[:limit] for t in texts]
    segments = pairs is not None and segments
    if pairs is not None:
        pairs = [t if len(t) <= limit else t[:limit] for t in pairs]
    encoded = tokenizer(
        texts,
        pairs,
        truncation="longest_first" if max_length is not None else False,
        max_length=max_length,
        add_special_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=segments,
    )
    return encoded["input_ids"], encoded["token_type_ids"] if segments else None


def _tokenize(
    tokenizer,
    texts: list[str],
    max_length: int,
    chunk: int = 2048,
    progress=None,
    pairs: Optional[list[str]] = None,
    segments: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    pieces, segment_pieces, lengths, full = [], [], [], []
    for start in range(0, len(texts), chunk):
        batch = texts[start : start + chunk]
        batch_pairs = pairs[start : start + chunk] if pairs is not None else None
        encoded, types = _encode(tokenizer, batch, max_length, batch_pairs, segments)
        # rows that reach the limit may have been cut: their untruncated length, for the report
        at_limit = [i for i, row in enumerate(encoded) if len(row) >= max_length]
        untruncated = {}
        if at_limit:
            whole, _ = _encode(
                tokenizer,
                [batch[i] for i in at_limit],
                None,
                [batch_pairs[i] for i in at_limit] if batch_pairs is not None else None,
                segments,
            )
            untruncated = dict(zip(at_limit, map(len, whole), strict=False))
        for i, row in enumerate(encoded):
            pieces.append(np.asarray(row, dtype=np.int32))
            if types is not None:
                segment_pieces.append(np.asarray(types[i], dtype=np.int8))
            lengths.append(len(row))
            full.append(untruncated.get(i, len(row)))
        if progress is not None:
            progress(len(batch))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    segment_ids = None
    if pairs is not None and segments:
        segment_ids = np.concatenate(segment_pieces) if segment_pieces else np.zeros(0, dtype=np.int8)
    return ids, offsets, np.asarray(full, dtype=np.int64), segment_ids


def _load_cached(
    path: Path, rows: int, max_length: int, vocab_size: int, with_segments: bool = False
) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    """The cached arrays if the entry is whole and consistent; None means rebuild it (a truncated or
    garbled file must cost one re-tokenization, never a failed run)."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            ids, offsets, full = cached["ids"], cached["offsets"], cached["full_lengths"]
            segments = cached["segments"] if with_segments else None
    except Exception:  # noqa: BLE001 - BadZipFile, EOFError, ValueError, KeyError, OSError: all mean "not usable"
        return None
    if segments is not None and (
        segments.shape != ids.shape
        or segments.dtype != np.int8
        or (len(segments) and not set(np.unique(segments)) <= {0, 1})
    ):
        return None
    lengths = np.diff(offsets) if offsets.ndim == 1 and len(offsets) == rows + 1 else None
    if (
        lengths is None
        or ids.ndim != 1
        or ids.dtype != np.int32
        or offsets[0] != 0
        or offsets[-1] != len(ids)
        or (lengths < 0).any()
        or (lengths > max_length).any()
        or full.shape != (rows,)
        or (len(ids) and (ids.min() < 0 or ids.max() >= vocab_size))
    ):
        return None
    return ids, offsets, full, segments


SPOT_CHECK_ROWS = 64


def _agrees(
    tokenizer,
    texts: list[str],
    cached: tuple,
    max_length: int,
    pairs: Optional[list[str]] = None,
    with_segments: bool = False,
) -> bool:
    """Whether a cache entry holds these texts' tokens, checked on up to 64 rows spread over the
    set (the first, the last, and a fixed sample between): a damaged or planted entry whose shapes
    pass `_load_cached` is rebuilt instead of trusted. The check costs a few milliseconds."""
    ids, offsets, _, segments = cached
    n = len(texts)
    if n == 0:
        return True
    rows = np.unique(np.concatenate([[0, n - 1], np.random.default_rng(n).integers(0, n, SPOT_CHECK_ROWS - 2)]))
    encoded, encoded_segments = _encode(
        tokenizer,
        [texts[i] for i in rows],
        max_length,
        [pairs[i] for i in rows] if pairs is not None else None,
        with_segments,
    )
    for k, (i, row) in enumerate(zip(rows, encoded, strict=False)):
        span = slice(offsets[i], offsets[i + 1])
        if not np.array_equal(ids[span], np.asarray(row, dtype=np.int32)):
            return False
        if encoded_segments is not None and (
            segments is None or not np.array_equal(segments[span], np.asarray(encoded_segments[k], dtype=np.int8))
        ):
            return False
    return True


def tokenize(
    tokenizer,
    texts: list[str],
    labels: Optional[np.ndarray],
    max_length: int,
    use_cache: bool = True,
    progress=None,
    pairs: Optional[list[str]] = None,
    segments: bool = False,
) -> TokenizedSet:
    """Token ids for `texts` (with `pairs`: each row the tokenizer's text pair, with its segment
    ids when `segments` and the tokenizer has them), from the disk cache when the same tokenizer saw
    the same texts. `progress(n)` is called as rows are tokenized (not for a cache hit)."""
    with_segments = pairs is not None and segments and uses_segments(tokenizer)
    key = _cache_key(tokenizer, texts, max_length, pairs) + ("s" if with_segments else "")
    path = cache_dir() / f"{key}.npz"
    vocab_size = len(tokenizer)
    cached = (
        _load_cached(path, len(texts), max_length, vocab_size, with_segments) if use_cache and path.is_file() else None
    )
    if cached is not None and _agrees(tokenizer, texts, cached, max_length, pairs, with_segments):
        return TokenizedSet(cached[0], cached[1], labels, cached[2], cached[3])
    ids, offsets, full, types = _tokenize(
        tokenizer, texts, max_length, progress=progress, pairs=pairs, segments=with_segments
    )
    if use_cache:
        arrays = {"ids": ids, "offsets": offsets, "full_lengths": full}
        if types is not None:
            arrays["segments"] = types
        try:
            with atomic.atomic_path(path) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, **arrays)
        except WriteError:
            pass  # the cache is an optimisation; an unwritable home must not fail the run
    return TokenizedSet(ids, offsets, labels, full, types)


FINGERPRINT_HEX = 32


def tokens_fingerprint(*parts: Optional[TokenizedSet]) -> str:
    """A hash of the token ids and labels of `parts` (a resume refuses training data that changed
    since its checkpoint instead of silently training on other rows)."""
    digest = hashlib.sha256()
    for part in parts:
        if part is None:
            digest.update(b"-")
            continue
        for array in (part.ids, part.offsets, part.labels):
            digest.update(b"|" if array is None else np.ascontiguousarray(array).tobytes())
        if part.segments is not None:  # absent for single texts: fingerprints of earlier runs still match
            digest.update(b"segments" + np.ascontiguousarray(part.segments).tobytes())
    return digest.hexdigest()[:FINGERPRINT_HEX]


def bucketed_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, bucket_factor: int = 50
) -> list[np.ndarray]:
    """One epoch of training batches: shuffled, then sorted by length inside windows of
    `bucket_factor` batches so each batch pads little, then the batch order is shuffled again.
    Deterministic in (seed, epoch), which makes resuming at a batch index exact."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * bucket_factor
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
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
        batches.append(order[start : start + size])
        start += size
    return batches


def collate(
    data: TokenizedSet,
    index: np.ndarray,
    pad_id: int,
    pad_multiple: int = PAD_MULTIPLE,
    pad_to: Optional[Sequence[int]] = None,
) -> dict[str, torch.Tensor]:
    """Rows `index` padded to their longest (rounded up to `pad_multiple`), or to the smallest of
    the fixed widths `pad_to` that fits (compiled models: one graph per width)."""
    lengths = data.lengths[index]
    width = int(lengths.max())
    fitting = [w for w in (pad_to or ()) if w >= width]
    width = min(fitting) if fitting else -(-width // pad_multiple) * pad_multiple
    input_ids = np.full((len(index), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    segments = np.zeros((len(index), width), dtype=np.int64) if data.segments is not None else None
    for row, (i, n) in enumerate(zip(index, lengths, strict=False)):
        start = data.offsets[i]
        input_ids[row, :n] = data.ids[start : start + n]
        mask[row, :n] = 1
        if segments is not None:
            segments[row, :n] = data.segments[start : start + n]
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
    if segments is not None:
        batch["token_type_ids"] = torch.from_numpy(segments)
    if data.labels is not None:
        batch["labels"] = torch.from_numpy(data.labels[index])
    return batch
