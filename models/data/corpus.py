"""A tokenized plain-text corpus for training a discrete-flow teacher on real text.

Pipeline:

    texts = load_texts("corpus/")                      # one document per .txt file
    tok = train_bpe_tokenizer(texts, vocab_size=4096)  # byte-level BPE, offline
    corpus = TokenizedCorpus.from_texts(texts, tok, CorpusConfig(seq_len=128), source="corpus/")
    train, heldout = corpus.split(0.05, seed=0)
    x = train.batch(32, generator)                     # (32, 128) int64

Token ids: ``<|endoftext|>`` (EOS) is id 0, the data tokens are ids 0..V-1 (EOS, the 256 byte
symbols and the learned merges) and ``[MASK]`` is id V, the last id, exactly as in the
synthetic language. The corpus is one int64 stream ``doc_1 EOS doc_2 EOS ...`` cut into
non-overlapping windows of ``seq_len`` tokens (the last partial window is dropped), so windows
cross document boundaries and the model sees EOS in context.

Literal ``[MASK]`` or ``<|endoftext|>`` strings inside a document are encoded as ordinary
bytes, so the only EOS ids in the stream are document boundaries and [MASK] never occurs in
the data. Saved corpora use safe formats only (safetensors, tokenizer JSON, JSON); no pickle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from tsdfm.models.data.synthetic import MASK_TOKEN
from tsdfm.models.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 0
MIN_VOCAB_SIZE = 300  # 256 byte symbols + EOS + at least 43 merges
CORPUS_FORMAT = "tsdfm-text-corpus"
CORPUS_VERSION = 1
WINDOWS_FILE = "windows.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CORPUS_FILE = "corpus.json"


# ---------------------------------------------------------------------------- tokenizer
def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (offline, deterministic).

    Args:
        texts: documents to learn merges from.
        vocab_size: V, the most data tokens to learn: EOS (id 0) + 256 byte symbols + merges.
            A small corpus may support fewer merges, so read the real size from
            ``tokenizer.get_vocab_size() - 1``. [MASK] is added after training as id V.
        min_frequency: a pair must occur this often to be merged.

    Returns:
        A tokenizer with ``get_vocab_size() == V + 1``, EOS as id 0 and [MASK] as id V, whose
        ``decode(encode(text).ids)`` returns ``text`` for any text without special strings.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"tokenizer vocab_size must be >= {MIN_VOCAB_SIZE} (256 byte symbols + "
            f"{EOS_TOKEN} + merges), got {vocab_size}"
        )
    if min_frequency < 1:
        raise ConfigError(f"tokenizer min_frequency must be >= 1, got {min_frequency}")
    docs = [t for t in texts if t.strip()]
    if not docs:
        raise DataError("cannot train a tokenizer on no text; pass at least one non-empty text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(EOS_TOKEN, special=True)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    tok.add_special_tokens([AddedToken(MASK_TOKEN, special=True)])
    _check_tokenizer(tok)
    return tok


def _check_tokenizer(tok: Tokenizer) -> None:
    """EOS must be id 0 and [MASK] the last id; raise DataError otherwise."""
    eos, mask, size = tok.token_to_id(EOS_TOKEN), tok.token_to_id(MASK_TOKEN), tok.get_vocab_size()
    if eos != EOS_TOKEN_ID or mask != size - 1:
        raise DataError(
            f"tokenizer needs {EOS_TOKEN} as id 0 and {MASK_TOKEN} as the last id {size - 1}, "
            f"got {eos} and {mask}; build it with train_bpe_tokenizer"
        )


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, with special-token strings in the text encoded as plain bytes."""
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = previous


# ---------------------------------------------------------------------------- raw text
def load_texts(path: str | Path) -> list[str]:
    """Documents under ``path``: a text file (one document) or a directory of ``.txt`` files.

    Files in a directory are found recursively and read in sorted order of their relative
    paths, each as one UTF-8 document; empty and whitespace-only files are skipped.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"text path {p} does not exist; pass a .txt file or a directory of .txt files"
        )
    if p.is_dir():
        files = sorted(
            (f for f in p.rglob("*.txt") if f.is_file()), key=lambda f: f.relative_to(p).as_posix()
        )
        if not files:
            raise DataError(f"directory {p} contains no .txt files; add UTF-8 .txt documents")
    else:
        files = [p]
    texts = [t for t in (_read_text(f) for f in files) if t.strip()]
    if not texts:
        raise DataError(f"{p} contains no text ({len(files)} file(s), all empty)")
    return texts


def _read_text(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{f} is not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8"
        ) from None


# ---------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class CorpusConfig:
    """How a token stream is cut into training windows.

    Args:
        seq_len: L, tokens per window.
        max_windows: keep at most this many windows (the first ones), or all if None.
    """

    seq_len: int = 128
    max_windows: int | None = None

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"corpus seq_len must be >= 2, got {self.seq_len}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(
                f"corpus max_windows must be >= 1 or None (all windows), got {self.max_windows}"
            )


class TokenizedCorpus:
    """Non-overlapping (N, L) int64 windows of a tokenized text stream, plus its tokenizer.

    Args:
        windows: (N, L) int64 token ids in [0, V), N >= 1, L == config.seq_len.
        tokenizer: a tokenizer with EOS as id 0 and [MASK] as its last id V.
        config: the windowing config.
        source: where the text came from (for messages and provenance).
        num_documents: documents in the source stream, if known.
        num_stream_tokens: tokens in the source stream before cutting, if known.
        eos_token_id: the id that ends each document (EOS, id 0), or None for the windows of
            a teacher of another family cut with its own tokenizer
            (:meth:`from_teacher_texts`: no document separator, and no check of the
            tokenizer's EOS and [MASK] ids).
    """

    def __init__(
        self,
        windows: torch.Tensor,
        tokenizer: Tokenizer,
        config: CorpusConfig,
        source: str = "<memory>",
        num_documents: int | None = None,
        num_stream_tokens: int | None = None,
        eos_token_id: int | None = EOS_TOKEN_ID,
    ):
        if eos_token_id is not None:
            _check_tokenizer(tokenizer)
        self._eos_token_id = eos_token_id
        windows = torch.as_tensor(windows)
        if windows.dtype != torch.int64 or windows.dim() != 2:
            raise DataError(
                f"corpus windows must be a 2-D int64 tensor, got {windows.dtype} of shape "
                f"{tuple(windows.shape)}"
            )
        if windows.shape[0] < 1 or windows.shape[1] != config.seq_len:
            raise DataError(
                f"corpus windows must have shape (N >= 1, seq_len={config.seq_len}), got "
                f"{tuple(windows.shape)}"
            )
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        self.num_documents = num_documents
        self.num_stream_tokens = num_stream_tokens
        V = self.vocab_size
        lo, hi = int(windows.min()), int(windows.max())
        if lo < 0 or hi >= V:
            raise DataError(
                f"corpus token ids must lie in [0, {V}) ([MASK]={V} may not occur), "
                f"got [{lo}, {hi}]"
            )
        self.windows = windows.contiguous()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def from_texts(
        texts: Iterable[str],
        tokenizer: Tokenizer,
        config: CorpusConfig,
        source: str = "<texts>",
    ) -> TokenizedCorpus:
        """Tokenize documents, append EOS to each, concatenate and cut into windows."""
        _check_tokenizer(tokenizer)
        docs = [t for t in texts if t.strip()]
        if not docs:
            raise DataError(f"corpus {source} has no text; add non-empty documents")
        L = config.seq_len
        ids = encode_documents(tokenizer, docs)
        stream = np.fromiter(
            (i for doc in ids for i in (*doc, EOS_TOKEN_ID)),
            dtype=np.int64,
            count=sum(len(doc) + 1 for doc in ids),
        )
        if len(stream) < L:
            raise DataError(
                f"corpus {source} has {len(stream)} tokens ({len(docs)} document(s), one "
                f"{EOS_TOKEN} each) but needs at least seq_len={L} for one window; add text "
                "or lower seq_len"
            )
        n = len(stream) // L
        if config.max_windows is not None:
            n = min(n, config.max_windows)
        windows = torch.from_numpy(stream[: n * L].reshape(n, L).copy())
        return TokenizedCorpus(windows, tokenizer, config, source, len(docs), len(stream))

    @staticmethod
    def from_teacher_texts(
        texts: Iterable[str], tokenizer: Any, config: CorpusConfig, source: str = "<texts>"
    ) -> TokenizedCorpus:
        """Windows of documents in an adapter teacher's own tokenizer, in solver ids.

        ``tokenizer`` is the teacher's tokenizer seen in solver ids
        (:class:`tsdfm.models.teachers.adapter.SolverTokenizer`): each document is encoded
        without special tokens and mapped to solver ids; tokens the teacher never draws
        (its special tokens, e.g. ``[UNK]`` of an unknown word) and [MASK] are dropped, so a
        window holds only tokens the teacher can generate. Documents are concatenated without
        a separator (a masked LM's [SEP] is never drawn) and cut into windows.
        """
        docs = [t for t in texts if t.strip()]
        if not docs:
            raise DataError(f"corpus {source} has no text; add non-empty documents")
        V = tokenizer.vocab.vocab_size
        never = set(tokenizer.vocab.never_internal())
        stream = [i for doc in docs for i in tokenizer.encode_ids(doc) if i < V and i not in never]
        L = config.seq_len
        if len(stream) < L:
            raise DataError(
                f"corpus {source} has {len(stream)} tokens the teacher can draw (in its own "
                f"tokenizer, {len(docs)} document(s)) but needs at least seq_len={L} for one "
                "window; add text in the teacher's language"
            )
        n = len(stream) // L
        if config.max_windows is not None:
            n = min(n, config.max_windows)
        windows = torch.tensor(stream[: n * L], dtype=torch.int64).reshape(n, L)
        return TokenizedCorpus(
            windows, tokenizer, config, source, len(docs), len(stream), eos_token_id=None
        )

    @staticmethod
    def from_path(path: str | Path, tokenizer: Tokenizer, config: CorpusConfig) -> TokenizedCorpus:
        """:meth:`from_texts` on :func:`load_texts` of ``path``."""
        return TokenizedCorpus.from_texts(load_texts(path), tokenizer, config, source=str(path))

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return self.windows.shape[0]

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1]

    @property
    def vocab_size(self) -> int:
        """V, the number of data tokens (EOS included, [MASK] excluded); for the windows of an
        adapter teacher, the V data tokens of its solver vocabulary (with or without a mask)."""
        if self._eos_token_id is None:
            return self.tokenizer.vocab.vocab_size
        return self.tokenizer.get_vocab_size() - 1

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    def __repr__(self) -> str:
        return (
            f"TokenizedCorpus(source={self.source!r}, windows={len(self)}, "
            f"seq_len={self.seq_len}, vocab_size={self.vocab_size})"
        )

    # ------------------------------------------------------------------ use
    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Token ids → text, with EOS and [MASK] written out."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def split(self, holdout_fraction: float, seed: int) -> tuple[TokenizedCorpus, TokenizedCorpus]:
        """Deterministic disjoint (train, heldout) split of the windows.

        round(N · holdout_fraction) windows (at least 1, at most N − 1) are held out, chosen by
        a permutation drawn from ``torch.Generator().manual_seed(seed)``; both parts keep
        their windows in corpus order. Windows are split, not documents, so a document that
        spans a window boundary can contribute to both parts.
        """
        if not 0.0 < holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        N = len(self)
        if N < 2:
            raise DataError(
                f"corpus {self.source} has {N} window; splitting needs at least 2, so add text "
                "or lower seq_len"
            )
        n_held = min(N - 1, max(1, round(N * holdout_fraction)))
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        held, train = perm[:n_held].sort().values, perm[n_held:].sort().values
        return self._subset(train, "train"), self._subset(held, "heldout")

    def _subset(self, index: torch.Tensor, part: str) -> TokenizedCorpus:
        return TokenizedCorpus(
            self.windows[index],
            self.tokenizer,
            self.config,
            f"{self.source}[{part}]",
            eos_token_id=self.eos_token_id,
        )

    def batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(B, L) int64 windows drawn uniformly with replacement using ``generator``."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        return self.windows[idx]

    # ------------------------------------------------------------------ serialisation
    def save(self, directory: str | Path) -> Path:
        """Write ``windows.safetensors``, ``tokenizer.json`` and ``corpus.json`` to a directory."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"windows": self.windows}, str(d / WINDOWS_FILE), metadata={"format": "pt"})
        self.tokenizer.save(str(d / TOKENIZER_FILE))
        meta = {
            "format": CORPUS_FORMAT,
            "format_version": CORPUS_VERSION,
            "config": asdict(self.config),
            "source": self.source,
            "num_windows": len(self),
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "mask_token_id": self.mask_token_id,
            "eos_token_id": self.eos_token_id,
            "num_documents": self.num_documents,
            "num_stream_tokens": self.num_stream_tokens,
            "windows_sha256": _digest(self.windows),
        }
        (d / CORPUS_FILE).write_text(json.dumps(meta, indent=1))
        return d

    @staticmethod
    def load(directory: str | Path) -> TokenizedCorpus:
        """Read a corpus written by :meth:`save`, checking that its files agree."""
        from safetensors.torch import load_file

        d = Path(directory)
        if not d.is_dir():
            raise DataError(f"corpus directory {d} does not exist; build it with corpus.save")
        for name in (WINDOWS_FILE, TOKENIZER_FILE, CORPUS_FILE):
            if not (d / name).is_file():
                raise DataError(f"corpus directory {d} has no {name}; rebuild the corpus")
        try:
            meta = json.loads((d / CORPUS_FILE).read_text())
            if meta.get("format") != CORPUS_FORMAT:
                raise DataError(
                    f"{d / CORPUS_FILE} is not a corpus file (format={meta.get('format')!r}, "
                    f"expected {CORPUS_FORMAT!r})"
                )
            if meta.get("format_version") != CORPUS_VERSION:
                raise DataError(
                    f"{d / CORPUS_FILE} has format_version {meta.get('format_version')}, this "
                    f"code reads {CORPUS_VERSION}; rebuild the corpus"
                )
            config = CorpusConfig(**meta["config"])
            windows = load_file(str(d / WINDOWS_FILE))["windows"]
            tokenizer = Tokenizer.from_file(str(d / TOKENIZER_FILE))
            corpus = TokenizedCorpus(
                windows,
                tokenizer,
                config,
                meta["source"],
                meta["num_documents"],
                meta["num_stream_tokens"],
                eos_token_id=meta.get("eos_token_id", EOS_TOKEN_ID),
            )
            expected = (meta["num_windows"], meta["seq_len"], meta["vocab_size"])
            expected_digest = meta["windows_sha256"]
        except DataError:
            raise
        except Exception as e:
            # KeyError/TypeError/ConfigError from corpus.json, SafetensorError from the windows,
            # and a bare Exception from Tokenizer.from_file on a malformed tokenizer.json.
            raise DataError(f"corpus directory {d} is malformed ({e}); rebuild it") from None
        got = (len(corpus), corpus.seq_len, corpus.vocab_size)
        if got != expected or _digest(corpus.windows) != expected_digest:
            raise DataError(
                f"corpus directory {d} is inconsistent: {CORPUS_FILE} describes (windows, "
                f"seq_len, vocab_size)={expected} but the files hold {got} or other tokens; "
                "rebuild it"
            )
        return corpus


def _digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------- demo text
_DEMO_SENTENCES = [
    "The old mill stood by the river, and its wheel turned slowly in the morning light.",
    "A small boat drifted past the reeds while the fisherman mended his nets.",
    "Every evening the baker left a loaf of bread on the step for the widow next door.",
    "The children ran across the meadow, chasing the shadows of the clouds.",
    "Snow fell all night, and by dawn the village lay silent under a white blanket.",
    "The captain studied the map by candlelight and marked the safest passage.",
    "In the garden the roses climbed the wall and leaned toward the sun.",
    "She opened the letter with trembling hands and read it twice before she spoke.",
    "The road wound up the hill between stone walls and crooked apple trees.",
    "At the market the farmers sold eggs, cheese, honey and baskets of pears.",
    "The lighthouse keeper climbed the stairs each night to light the great lamp.",
    "A cold wind came down from the mountains and rattled the shutters of the inn.",
    "The teacher wrote a long sum on the board and asked who could solve it.",
    "Two travellers shared their supper by the fire and told stories of distant towns.",
    "The dog slept in the doorway, one ear raised at every sound from the lane.",
    "When the bells rang at noon, the workers put down their tools and rested.",
    "The library was quiet except for the ticking of the clock above the shelves.",
    "He planted beans in neat rows and watered them before the heat of the day.",
    "The ship left the harbour at high tide, its sails full of the western wind.",
    "Across the valley a thin line of smoke rose from the shepherd's hut.",
    "The merchant counted his coins twice and locked them in an iron box.",
    "Rain drummed on the roof while the family sat together around the table.",
    "The young soldier wrote home to say that he was well and would return in spring.",
    "Birds gathered on the telegraph wires, ready to fly south before the frost.",
    "The doctor walked three miles through the storm to reach the sick child.",
    "On the hill above the town there was an old chapel with a broken bell.",
    "The cook stirred the soup and tasted it, then added a pinch of salt.",
    "Nobody knew who had left the lantern burning in the empty barn.",
    "The river rose after the spring rains and flooded the lower fields.",
    "She kept a diary in which she wrote down the weather and the names of visitors.",
    "The blacksmith's hammer rang out from the forge at the end of the street.",
    "They waited at the station for an hour, but the evening train did not come.",
    "The orchard was heavy with plums, and the wasps were drunk on the fallen fruit.",
    "An old map hung in the hall, showing islands that no sailor had ever found.",
    "The boy learned to read from a battered book of fables about foxes and crows.",
    "By the end of summer the wheat was gold and the farmers began the harvest.",
    "The queen rode out at dawn with her hounds and a dozen riders behind her.",
    "In winter the pond froze hard, and the whole town came out to skate.",
    "The clockmaker fitted the last tiny gear and listened to the steady tick.",
    "A stranger arrived at the inn with a heavy trunk and asked for a quiet room.",
    "The students argued late into the night about the meaning of the old poem.",
    "Far out at sea, the sailors saw the first light of the coast at midnight.",
    "The gardener raked the leaves into piles and burned them in the autumn dusk.",
    "Her grandmother taught her to knit, to bake, and to keep a secret.",
    "The bridge was narrow and old, and the carts crossed it one at a time.",
    "When the moon rose, the owls began to call from the edge of the wood.",
    "The painter set up his easel on the cliff and worked until the light was gone.",
    "Every stone in the wall had been carried up from the river by hand.",
]


def write_demo_corpus(
    directory: str | Path,
    num_documents: int = 8,
    sentences_per_document: int = 12,
    seed: int = 0,
) -> Path:
    """Write a small deterministic English-like corpus as ``doc_000.txt``, ``doc_001.txt``, ...

    Each document draws ``sentences_per_document`` distinct sentences from a fixed list,
    ordered by a SHA-256 hash of (seed, document, sentence), and groups them four to a
    paragraph. The bytes depend only on the arguments (no RNG library is involved), and the
    defaults give about 6 KB. Existing files of the same names are overwritten.

    Returns:
        The directory, ready for :func:`load_texts`.
    """
    if num_documents < 1 or not 1 <= sentences_per_document <= len(_DEMO_SENTENCES):
        raise ConfigError(
            f"demo corpus needs num_documents >= 1 and 1 <= sentences_per_document <= "
            f"{len(_DEMO_SENTENCES)}, got {num_documents} and {sentences_per_document}"
        )
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for doc in range(num_documents):

        def key(i: int, doc: int = doc) -> str:
            return hashlib.sha256(f"{seed}/{doc}/{i}".encode()).hexdigest()

        order = sorted(range(len(_DEMO_SENTENCES)), key=key)[:sentences_per_document]
        sentences = [_DEMO_SENTENCES[i] for i in order]
        paragraphs = [" ".join(sentences[k : k + 4]) for k in range(0, len(sentences), 4)]
        (d / f"doc_{doc:03d}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return d
