"""Tiny random-weight teachers of other families, saved as their own libraries save them.

Native masked LMs (BERT, RoBERTa, ModernBERT) come from their transformers configs and
``save_pretrained``; the remote-code families (MDLM-like, Duo-like) from the fixture code in
tests/fixtures/teachers/, loaded through transformers' dynamic-module path
(``trust_remote_code=True``) and saved with their code beside the weights. Every model has a
word-level tokenizer over a few words plus the family's special tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "teachers"
WORDS = [f"w{i}" for i in range(12)]
SEQ_LEN = 8


def word_tokenizer(specials: list[str], words: list[str] = WORDS, mask_at: int | None = None):
    """A ``tokenizers.Tokenizer`` (WordLevel, whitespace) with ``specials`` first (the one
    named by ``mask_at`` moved to that id), then the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = [*specials, *words]
    if mask_at is not None:
        mask = next(s for s in specials if "mask" in s.lower())
        vocab.remove(mask)
        vocab.insert(mask_at, mask)
    unk = next(s for s in specials if "unk" in s.lower())
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(specials))
    return tok, vocab


def _save_tokenizer(tok, directory: Path, **special) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(str(directory))


def bert(directory: Path, seed: int = 0) -> Path:
    """BERT masked LM: [PAD] [UNK] [CLS] [SEP] specials, [MASK] at id 7 (inside the words)."""
    from transformers import BertConfig, BertForMaskedLM

    tok, vocab = word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], mask_at=7)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ_LEN,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    BertForMaskedLM(cfg).save_pretrained(str(directory))
    _save_tokenizer(
        tok,
        directory,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    return directory


def roberta(directory: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """RoBERTa masked LM: <s> <pad> </s> <unk> first, <mask> last (id M − 1)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok, vocab = word_tokenizer(specials, mask_at=len(specials) - 1 + len(WORDS))
    cfg = RobertaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ_LEN + 2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = RobertaForMaskedLM(cfg)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    _save_tokenizer(
        tok,
        directory,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    return directory


def modernbert(directory: Path, seed: int = 0) -> Path:
    """ModernBERT masked LM, [MASK] at id 3 and two padding rows past the tokenizer; two
    layers, a global one and a sliding-window one (window 4 < L), so both attention paths
    run."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    tok, vocab = word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], mask_at=3)
    ids = {w: i for i, w in enumerate(vocab)}
    cfg = ModernBertConfig(
        vocab_size=len(vocab) + 2,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=SEQ_LEN,
        global_attn_every_n_layers=2,
        local_attention=4,
        pad_token_id=ids["[PAD]"],
        cls_token_id=ids["[CLS]"],
        sep_token_id=ids["[SEP]"],
        bos_token_id=ids["[CLS]"],
        eos_token_id=ids["[SEP]"],
    )
    torch.manual_seed(seed)
    ModernBertForMaskedLM(cfg).save_pretrained(str(directory))
    _save_tokenizer(
        tok,
        directory,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    return directory


def _remote(directory: Path, name: str, module: str, cls: str, seed: int, **fields) -> Path:
    from transformers import AutoConfig, AutoModelForMaskedLM

    directory.mkdir(parents=True, exist_ok=True)
    for f in (FIXTURES / name).glob("*.py"):
        shutil.copyfile(f, directory / f.name)
    config = {
        "model_type": module,
        "auto_map": {
            "AutoConfig": f"configuration_{module}.{cls}Config",
            "AutoModelForMaskedLM": f"modeling_{module}.{cls}",
        },
        **fields,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    cfg = AutoConfig.from_pretrained(str(directory), trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(cfg, trust_remote_code=True)
    model.save_pretrained(str(directory))
    return directory


def mdlm_like(directory: Path, seed: int = 0) -> Path:
    """MDLM-like (remote code): 12 words + [UNK] + <|endoftext|>, mask id = vocab_size − 1
    (one past the tokenizer, as MDLM's 50257 is one past GPT-2's tokens)."""
    tok, vocab = word_tokenizer(["[UNK]", "<|endoftext|>"])
    _remote(
        directory,
        "mdlm_like",
        "mdlm",
        "MDLM",
        seed,
        vocab_size=len(vocab) + 1,
        model_length=SEQ_LEN,
        time_conditioning=False,
    )
    tok.save(str(directory / "tokenizer.json"))
    return directory


def duo_like(directory: Path, seed: int = 0) -> Path:
    """Duo-like (remote code): uniform source over 12 words + [UNK], conditioned on σ."""
    tok, vocab = word_tokenizer(["[UNK]"])
    _remote(directory, "duo_like", "duo", "DUO", seed, vocab_size=len(vocab), model_length=SEQ_LEN)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def solver_tokenizer(vocab_size: int, mask: bool):
    """A word-level tokenizer over solver ids: ``s0`` … ``s{V-1}``, then ``[MASK]`` = V under
    the mask source (what a compass of an adapter teacher reads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"s{i}": i for i in range(vocab_size)}
    if mask:
        vocab["[MASK]"] = vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="s0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def compass_for(teacher: Path, directory: Path, trust_remote_code: bool = False, seed: int = 1):
    """A random tiny compass that reads ``teacher``'s solver states and records it as the
    teacher it learned from (its identity from the files, as the build driver sees it)."""
    from tsdfm.models.checkpoint import save_checkpoint
    from tsdfm.models.compass import compass_config
    from tsdfm.models.flow_model import CompassModel
    from tsdfm.models.teachers import teacher_files

    files = teacher_files(teacher, "teacher", trust_remote_code=trust_remote_code)
    cfg = compass_config(
        files.config,
        d_model=16,
        n_layers=1,
        n_heads=2,
        provenance={"teacher_identity": files.identity},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CompassModel(cfg).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
    tok = solver_tokenizer(files.config.vocab_size, files.config.source == "mask")
    save_checkpoint(directory, model, tok)
    return directory
