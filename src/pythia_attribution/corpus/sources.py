"""Readers that turn a registry artifact into natural-text documents or fact tables.

Each reader takes the artifact file and the manifest's ``Source`` entry and returns plain Python
data; what is read is exactly what the manifest names (archive members, Bible books).
"""

from __future__ import annotations

import json
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pythia_attribution.corpus.manifest import Source
from pythia_attribution.errors import UserError


@dataclass(frozen=True)
class NaturalDoc:
    source: str
    title: str
    text: str


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    region: str


def normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _read_member(archive: Path, member: str) -> bytes:
    try:
        if archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive, "r:gz") as tar:
                fh = tar.extractfile(member)
                if fh is None:
                    raise KeyError(member)
                return fh.read()
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    except KeyError:
        raise UserError(f"{archive.name}: no member '{member}' (named in the manifest)") from None


def _members(archive: Path, pattern: str) -> list[str]:
    """Archive members matching a manifest glob (sorted, so the order never depends on the archive)."""
    regex = re.compile(re.escape(pattern).replace(r"\*", "[^/]*") + "$")
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tar:
            names = tar.getnames()
    else:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    found = sorted(n for n in names if regex.match(n))
    if not found:
        raise UserError(f"{archive.name}: no member matches '{pattern}' (named in the manifest)")
    return found


def read_text_files(archive: Path, source: Source) -> list[NaturalDoc]:
    """One document per text file (e.g. one Shakespeare play per file)."""
    docs = []
    for member in source.members:
        raw = _read_member(archive, member).decode("utf-8", errors="replace")
        title = Path(member).stem
        docs.append(NaturalDoc(source.name, title, normalize(raw)))
    return docs


def read_kjv_jsonl(archive: Path, source: Source) -> list[NaturalDoc]:
    """One document per chapter of the named books, verses joined by spaces."""
    (member,) = source.members
    wanted = list(source.books or [])
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in _read_member(archive, member).decode("utf-8").splitlines():
        if not line.strip():
            continue
        verse = json.loads(line)
        if wanted and verse["book"] not in wanted:
            continue
        chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"].strip())
    missing = [b for b in wanted if not any(book == b for book, _ in chapters)]
    if missing:
        raise UserError(f"{archive.name}: book '{missing[0]}' (named in the manifest) not found")
    order = {b: i for i, b in enumerate(wanted)}
    keys = sorted(chapters, key=lambda k: (order.get(k[0], 0), k[1]))
    return [
        NaturalDoc(
            source.name, f"{book} {chapter}", f"{book} {chapter}\n\n" + " ".join(chapters[(book, chapter)])
        )
        for book, chapter in keys
    ]


def read_countryinfo(archive: Path, source: Source) -> list[Country]:
    """Countries with a single capital from countryinfo's per-country JSON files."""
    countries = []
    for pattern in source.members:
        for member in _members(archive, pattern):
            data = json.loads(_read_member(archive, member))
            name, capital = data.get("name"), data.get("capital")
            if isinstance(name, str) and isinstance(capital, str) and name and capital:
                countries.append(
                    Country(name.strip(), capital.strip(), str(data.get("region") or "").strip())
                )
    return sorted(set(countries), key=lambda c: c.name)


READERS = {
    "text_files": read_text_files,
    "kjv_jsonl": read_kjv_jsonl,
    "countryinfo": read_countryinfo,
}


def read_source(archive: Path, source: Source):
    if source.reader not in READERS:
        raise UserError(
            f"source '{source.name}': unknown reader '{source.reader}' (known: {', '.join(READERS)})"
        )
    return READERS[source.reader](archive, source)


def split_document(doc: NaturalDoc, max_chars: int) -> list[NaturalDoc]:
    """Split a long document at blank lines into parts of at most ``max_chars`` characters."""
    if max_chars <= 0 or len(doc.text) <= max_chars:
        return [doc]
    parts, current = [], []
    size = 0
    for para in doc.text.split("\n\n"):
        if current and size + len(para) + 2 > max_chars:
            parts.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        parts.append("\n\n".join(current))
    return [NaturalDoc(doc.source, f"{doc.title} part {i + 1}", text) for i, text in enumerate(parts)]
