"""Drawing the sampled teacher signal: ``draws`` ids per position from the teacher's softmax.

Sampling runs in torch on the logits' device, one document at a time with that document's
own generator, seeded from the codec's seed and the document's id: a document's samples do
not depend on which other documents share its batch or on where a resumed capture
restarted, so the same seed and input give byte-identical shards.
"""

from __future__ import annotations

import hashlib

import torch

from kdpipe.compress.codecs.sampled import sample_order


def document_seed(seed: int, doc_id: str) -> int:
    """The generator seed of one document: 63 bits of sha256(seed, doc id)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def document_generator(seed: int, doc_id: str, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(document_seed(seed, doc_id))


def sample_rows(logits: torch.Tensor, draws: int, *, temperature: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, V] logits -> ``draws`` samples per row from ``softmax(logits / temperature)``
    (float32), as (ids int64 [n, draws], counts int32 [n, draws]): each row's distinct ids
    in sample order (count descending, ties by id), padded with -1 and 0."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    drawn = torch.multinomial(probs, draws, replacement=True, generator=generator)
    drawn = torch.sort(drawn, dim=-1).values
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = new.long().cumsum(-1) - 1                 # each draw's distinct-id slot
    ids = torch.full_like(drawn, -1).scatter_(1, slot, drawn)
    counts = torch.zeros_like(drawn, dtype=torch.int32).scatter_add_(
        1, slot, torch.ones_like(drawn, dtype=torch.int32))
    return sample_order(ids, counts, logits.shape[-1])
