"""Text into passages for embedding: cut only between sentences, paragraph ends preferred, with overlap.

`sentence_chunks` does the cutting, for ingested documents and the demo articles alike. On top of
it, `chunk_text` adds what arbitrary files need: paragraphs from
blank lines, a hard cut at word boundaries for a "sentence" longer than a chunk (a PDF table, text
without punctuation), and an overlap of whole trailing sentences of the chunk before. Deterministic:
the same text and settings always give the same passages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lakegate.errors import InvalidArgument

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_OVERLAP", "SENTENCE_END", "chunk_text", "paragraphs", "sentence_chunks"]

#: Characters. all-MiniLM-L6-v2 reads 256 word pieces (~1,000 characters of English); longer is cut.
DEFAULT_CHUNK_SIZE = 800
DEFAULT_OVERLAP = 0
MIN_CHUNK_SIZE = 100
MAX_CHUNK_SIZE = 4000

_BLANK_LINES = re.compile(r"\n\s*\n")

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def sentence_chunks(paragraphs: Sequence[str], *, low: int = 400, high: int = 800) -> list[str]:
    """Split text into chunks of about low..high characters, only ever between sentences.

    Paragraph ends are preferred cut points: a chunk is closed at a paragraph end once it reaches
    `low`; inside a paragraph it is closed only when the next sentence would push it past `high`.
    """
    chunks: list[str] = []
    current = ""
    for paragraph in paragraphs:
        for sentence in SENTENCE_END.split(paragraph.strip()):
            if current and len(current) + 1 + len(sentence) > high and len(current) >= low:
                chunks.append(current)
                current = ""
            current = f"{current} {sentence}" if current else sentence
        if len(current) >= low:
            chunks.append(current)
            current = ""
    if current:
        # A short tail reads better joined to the chunk before it than standing alone.
        if chunks and len(chunks[-1]) + len(current) < high + low // 2:
            chunks[-1] = f"{chunks[-1]} {current}"
        else:
            chunks.append(current)
    return chunks


def paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines, each with its whitespace collapsed to single spaces."""
    found = (" ".join(block.split()) for block in _BLANK_LINES.split(text))
    return [p for p in found if p]


def _hard_cut(sentence: str, size: int) -> list[str]:
    """A sentence longer than `size` as pieces of at most `size` characters, cut between words."""
    pieces: list[str] = []
    current = ""
    for word in sentence.split(" "):
        while len(word) > size:  # a single "word" longer than a chunk (a URL, a hash): cut it
            if current:
                pieces.append(current)
                current = ""
            pieces.append(word[:size])
            word = word[size:]
        if current and len(current) + 1 + len(word) > size:
            pieces.append(current)
            current = ""
        current = f"{current} {word}" if current else word
    if current:
        pieces.append(current)
    return pieces


def _fitted(paragraph: str, size: int) -> list[str]:
    """The paragraph, or, when a sentence of it is longer than `size`, its pieces as paragraphs."""
    sentences = SENTENCE_END.split(paragraph)
    if all(len(s) <= size for s in sentences):
        return [paragraph]
    out: list[str] = []
    kept: list[str] = []
    for sentence in sentences:
        if len(sentence) <= size:
            kept.append(sentence)
            continue
        if kept:
            out.append(" ".join(kept))
            kept = []
        out.extend(_hard_cut(sentence, size))
    if kept:
        out.append(" ".join(kept))
    return out


def _tail(chunk: str, overlap: int) -> str:
    """The longest run of whole trailing sentences of `chunk` within `overlap` characters."""
    tail = ""
    for sentence in reversed(SENTENCE_END.split(chunk)):
        candidate = f"{sentence} {tail}" if tail else sentence
        if len(candidate) > overlap:
            break
        tail = candidate
    return tail


def chunk_text(text: str, *, size: int = DEFAULT_CHUNK_SIZE, overlap: int = DEFAULT_OVERLAP) -> list[str]:
    """Passages of about size/2..size characters (plus up to `overlap` repeated from the one before).

    Cuts fall between sentences, at a paragraph end when one is near; a sentence longer than `size`
    is cut between words. Each passage after the first starts with the whole trailing sentences of
    the passage before that fit in `overlap` characters (none when its last sentence is longer).
    Empty or blank text gives no passage.

    Raises:
        InvalidArgument: `size` outside MIN_CHUNK_SIZE..MAX_CHUNK_SIZE, or `overlap` not in 0..size/2.
    """
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise InvalidArgument(
            f"Chunk size {size} is out of range.", hint=f"Use {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} characters."
        )
    if not 0 <= overlap <= size // 2:
        raise InvalidArgument(f"Overlap {overlap} is out of range.", hint=f"Use 0 to {size // 2} characters.")
    fitted = [piece for paragraph in paragraphs(text) for piece in _fitted(paragraph, size)]
    if not fitted:
        return []
    chunks = sentence_chunks(fitted, low=size // 2, high=size)
    if overlap == 0:
        return chunks
    overlapped = [chunks[0]]
    for before, chunk in zip(chunks, chunks[1:], strict=False):
        tail = _tail(before, overlap)
        overlapped.append(f"{tail} {chunk}" if tail else chunk)
    return overlapped
