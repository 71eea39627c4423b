"""Data sources: where training and measurement draw real sequences from.

A source gives batches of real token sequences (and a held-out split), the tokenizer a
checkpoint trained on it carries, the files it stores beside that checkpoint and a description
for its config. :class:`SyntheticSource` draws fresh sequences of the synthetic language;
:class:`CorpusSource` cuts fixed-length windows of a tokenized text corpus. Trainers, compass
metrics and evaluators all take data through here, so ``tsdfm.models.eval`` never reaches into
``tsdfm.models.train`` for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from tsdfm.models.data.corpus import CorpusConfig, TokenizedCorpus, load_texts, train_bpe_tokenizer
from tsdfm.models.data.synthetic import SyntheticLanguage
from tsdfm.models.errors import DataError
from tsdfm.models.paths import confined

if TYPE_CHECKING:
    from tsdfm.models.checkpoint import Checkpoint

LANGUAGE_FILE = "language.json"


class DataSource(Protocol):
    """What the teacher trainer needs from its data."""

    vocab_size: int
    seq_len: int

    def batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor: ...

    def heldout(self, batch_size: int, generator: torch.Generator) -> torch.Tensor: ...

    def tokenizer(self) -> Any: ...

    def checkpoint_files(self) -> dict[str, str]: ...

    def describe(self) -> dict: ...


class SyntheticSource:
    """Fresh sequences of the synthetic language for every batch (an infinite dataset)."""

    def __init__(self, language: SyntheticLanguage):
        self.language = language
        self.vocab_size = language.vocab_size
        self.seq_len = language.seq_len

    def batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return self.language.sample(batch_size, generator)

    heldout = batch  # fresh samples are held out by construction

    def tokenizer(self):
        return self.language.tokenizer(with_mask=True)

    def checkpoint_files(self) -> dict[str, str]:
        return {LANGUAGE_FILE: json.dumps(self.language.to_dict())}

    def describe(self) -> dict:
        return {
            "kind": "synthetic",
            "language": LANGUAGE_FILE,
            "entropy_per_token": self.language.entropy_per_token(),
        }


class CorpusSource:
    """Fixed-length windows of a tokenized text corpus, with a held-out split."""

    def __init__(self, corpus: TokenizedCorpus, holdout_fraction: float = 0.05, seed: int = 0):
        self.corpus = corpus
        self.train, self.held = corpus.split(holdout_fraction, seed)
        self.vocab_size = corpus.vocab_size
        self.seq_len = corpus.seq_len

    @staticmethod
    def from_path(path: str | Path, seq_len: int, vocab_size: int, seed: int = 0) -> CorpusSource:
        """Read .txt files, train a byte-level BPE of ``vocab_size`` tokens, cut windows."""
        texts = load_texts(path)
        tokenizer = train_bpe_tokenizer(texts, vocab_size)
        return CorpusSource(
            TokenizedCorpus.from_texts(texts, tokenizer, CorpusConfig(seq_len), str(path)),
            seed=seed,
        )

    def batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return self.train.batch(batch_size, generator)

    def heldout(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return self.held.batch(batch_size, generator)

    def tokenizer(self):
        return self.corpus.tokenizer

    def checkpoint_files(self) -> dict[str, str]:
        return {}

    def describe(self) -> dict:
        return {
            "kind": "corpus",
            "source": self.corpus.source,
            "windows": len(self.corpus),
            "eos_token_id": self.corpus.eos_token_id,
        }


def load_language(directory: Path, data_info: dict) -> SyntheticLanguage:
    """The synthetic language stored beside a checkpoint (``data.language``)."""
    if data_info.get("kind") != "synthetic":
        raise DataError("this checkpoint was not trained on the synthetic language")
    name = data_info.get("language", LANGUAGE_FILE)
    return SyntheticLanguage.load(confined(directory, name, "config.json data.language"))


def default_data_source(teacher: Checkpoint, corpus: str | Path | None = None) -> DataSource:
    """The teacher's own data: the synthetic language stored beside it, or, for a text teacher,
    the windows of ``corpus`` (a .txt file or folder) cut with the teacher's own tokenizer and
    split as its training run split them. For a teacher of another family (an adapter,
    ``data.kind: external``) the corpus is needed and is cut with that teacher's tokenizer
    into solver ids (:meth:`TokenizedCorpus.from_teacher_texts`)."""
    kind = teacher.config.data.get("kind")
    if kind == "external":  # an adapter teacher: its own tokenizer, in solver ids
        family = teacher.config.data.get("family", "external")
        if corpus is None:
            raise DataError(
                f"teacher {teacher.spec} is a {family} model; pass a text corpus in its "
                "language (--corpus PATH, a .txt file or folder): it is cut with the teacher's "
                "own tokenizer"
            )
        if teacher.tokenizer is None:
            raise DataError(
                f"teacher {teacher.spec} has no tokenizer.json to cut the corpus with; save "
                "the tokenizer with the model (save_pretrained)"
            )
        windows = TokenizedCorpus.from_teacher_texts(
            load_texts(corpus),
            teacher.tokenizer,
            CorpusConfig(seq_len=teacher.config.seq_len),
            str(corpus),
        )
        return CorpusSource(windows)
    if corpus is not None:
        if kind == "synthetic":
            raise DataError(
                f"teacher {teacher.spec} was trained on the synthetic language, which is its "
                "data; drop --corpus"
            )
        if teacher.tokenizer is None:
            raise DataError(f"teacher {teacher.spec} has no tokenizer.json to cut the corpus with")
        windows = TokenizedCorpus.from_path(
            corpus, teacher.tokenizer, CorpusConfig(seq_len=teacher.config.seq_len)
        )
        return CorpusSource(windows)
    if kind != "synthetic":
        raise DataError(
            f"teacher {teacher.spec} was trained on {kind or 'unknown'} data; pass its corpus "
            "(--corpus PATH, the text the teacher was trained on)"
        )
    return SyntheticSource(load_language(teacher.directory, teacher.config.data))
