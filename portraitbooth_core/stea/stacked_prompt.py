"""PhotoMaker's "stacked ID embedding" on a tokenized prompt: the class word's token repeated
once per identity token, the trigger word after it removed.

PhotoMaker (TencentARC) writes "a photo of a man img": `img` marks the class word and is
dropped, and the class word's last BPE piece is repeated K times (K = photos for v1, 2 x
photos for v2) before the text encoders run; copy k later receives identity token k. Here
the same edit is made on ComfyUI's token chunks ({encoder key: [[start, ..., end, pad...]]}),
for several subjects at once, with the trigger optional (the class word alone works, as on
SD1.5), and with prompt weights and 77-token chunks kept: a chunk that overflows pushes its
tail into the next one (a new chunk at the end if needed), so every other token keeps its
order, weight and chunk-relative context as far as the 75-token windows allow.

Positions come from each encoder's own token ids; SDXL's two tokenizers share CLIP's BPE,
and the caller checks that both agree. ComfyUI-free: tokens are plain tuples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .class_words import ClassHit, ClassWordError

TRIGGER_WORD = "img"  # PhotoMaker's trigger; followed the class word in its training captions


@dataclass(frozen=True)
class StackSite:
    """One subject's class word: where its last piece is, how many copies it becomes, and
    how many trigger tokens follow it (removed)."""
    chunk: int
    index: int  # inside the chunk (0 is the start token)
    copies: int
    trigger_tokens: int = 0


def _content_end(chunk: Sequence[tuple], end_id: int) -> int:
    for i in range(1, len(chunk)):
        token = chunk[i][0]
        if isinstance(token, int) and token == end_id:
            return i
    return len(chunk)


def trigger_after(chunks: Sequence[Sequence[tuple]], hit: ClassHit, trigger: Sequence[int], end_id: int) -> int:
    """How many tokens of `trigger` directly follow the hit (0 or len), across a chunk border."""
    following: list = []
    for c in range(hit.chunk, len(chunks)):
        first = hit.index + 1 if c == hit.chunk else 1
        following += [t[0] for t in chunks[c][first:_content_end(chunks[c], end_id)]]
        if len(following) >= len(trigger):
            break
    return len(trigger) if trigger and following[:len(trigger)] == list(trigger) else 0


def stack_class_tokens(chunks: Sequence[Sequence[tuple]], sites: Sequence[StackSite], start_id: int, end_id: int,
                       pad_id: int) -> tuple[list[list[tuple]], list[list[int]]]:
    """(new chunks, per site the flat positions of its copies) for one encoder's chunks.

    Each chunk is [start, content..., end, pad...] of one fixed length; the content may grow
    to length - 2. Copies carry the class piece's own entry (weight, word id).
    """
    if not chunks:
        raise ClassWordError("the prompt tokenized to nothing")
    length = len(chunks[0])
    if length < 3 or any(len(c) != length for c in chunks):
        raise ClassWordError(f"token chunks of unequal or tiny lengths: {[len(c) for c in chunks]}")
    room = length - 2
    outside = [s for s in sites if not (s.chunk < len(chunks) and 0 < s.index < length - 1)]
    if outside:
        raise ClassWordError(f"class-word position outside the prompt: {outside}")
    by_place = {(s.chunk, s.index): n for n, s in enumerate(sites)}
    if len(by_place) != len(sites):
        raise ClassWordError("two subjects were given the same class word")
    # Content as (entry, tag): tag (site, copy) marks a copy so its position survives the re-flow.
    contents: list[list[tuple[tuple, tuple[int, int] | None]]] = []
    skip = 0  # trigger tokens still to drop; a trigger may open the next chunk
    for c, chunk in enumerate(chunks):
        stop = _content_end(chunk, end_id)
        out: list[tuple[tuple, tuple[int, int] | None]] = []
        for i in range(1, stop):
            if skip:
                skip -= 1
                continue
            n = by_place.get((c, i))
            if n is None:
                out.append((tuple(chunk[i]), None))
                continue
            site = sites[n]
            if site.copies < 1:
                raise ClassWordError(f"a class word needs at least one copy, got {site.copies}")
            out.extend((tuple(chunk[i]), (n, k)) for k in range(site.copies))
            skip = site.trigger_tokens
        contents.append(out)
    # A chunk that held only a dropped trigger would encode as an extra empty chunk.
    contents = [content for n, content in enumerate(contents) if content or n == 0]
    # Re-flow: overflow moves, in order, to the front of the next chunk.
    c = 0
    while c < len(contents):
        if len(contents[c]) > room:
            tail = contents[c][room:]
            del contents[c][room:]
            if c + 1 == len(contents):
                contents.append([])
            contents[c + 1][:0] = tail
        c += 1
    template = chunks[0][0]
    extra = tuple(template[2:])  # word ids etc.: the special tokens' own values
    special = lambda token: (token, 1.0, *(0 for _ in extra))  # noqa: E731
    new_chunks, positions = [], [[0] * s.copies for s in sites]
    for c, content in enumerate(contents):
        chunk = [special(start_id)] + [entry for entry, _ in content] + [special(end_id)]
        chunk += [special(pad_id)] * (length - len(chunk))
        for i, (_, tag) in enumerate(content):
            if tag is not None:
                positions[tag[0]][tag[1]] = c * length + 1 + i
        new_chunks.append(chunk)
    return new_chunks, positions


__all__ = ["StackSite", "TRIGGER_WORD", "stack_class_tokens", "trigger_after"]
