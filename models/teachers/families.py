"""The teacher families an adapter exists for, and how a checkpoint's family is told.

A family says what the adapter must normalise: the source (mask or uniform), whether the
network runs its own code (``trust_remote_code``), what time input it takes, and the output
convention. The family of a directory is read from its ``config.json`` (no model is built):

========== ====================================================== =========================
family     detected by                                            loads with
========== ====================================================== =========================
tsdfm      ``format: tsdfm-checkpoint``                           this project's FlowModel
masked-lm  ``model_type`` a native masked LM / ``*ForMaskedLM``   AutoModelForMaskedLM
mdlm       ``model_type: mdlm`` or an ``MDLM`` auto_map class     its own code (remote)
duo        ``model_type: duo`` or a ``DUO`` auto_map class        its own code (remote)
========== ====================================================== =========================

Families recognised but not adaptable (:data:`UNSUPPORTED`) are refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from tsdfm.models.errors import CheckpointError


@dataclass(frozen=True)
class Family:
    """What an adapter of one family assumes.

    Attributes:
        name: the ``--teacher-format`` value.
        source: mask | uniform: the solver's source distribution for this teacher.
        remote_code: the network's class lives in the checkpoint (needs trust_remote_code).
        time_input: none (time-invariant under the mask source) | sigma (total noise
            σ = −log κ(t), the MDLM/Duo convention).
        summary: one line for ``teacher check`` and the docs.
    """

    name: str
    source: str
    remote_code: bool
    time_input: str
    summary: str


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("tsdfm", "mask", False, "none", "this project's checkpoint format"),
        Family(
            "masked-lm",
            "mask",
            False,
            "none",
            "native transformers masked LM (BERT, RoBERTa, ModernBERT, ...): p(x_1 | x_t) = "
            "its MLM head at the masked positions",
        ),
        Family(
            "mdlm",
            "mask",
            True,
            "none",
            "MDLM (remote code): SUBS parameterisation, mask id = vocab_size − 1, "
            "forward(input_ids, timesteps)",
        ),
        Family(
            "duo",
            "uniform",
            True,
            "sigma",
            "Duo (remote code): uniform source, conditioned on σ = −log α with α = κ(t)",
        ),
    )
}

# native model types whose AutoModelForMaskedLM head is the adapter's denoiser
MASKED_LM_TYPES = (
    "bert",
    "roberta",
    "modernbert",
    "distilbert",
    "xlm-roberta",
    "camembert",
    "electra",
    "albert",
    "deberta",
    "deberta-v2",
    "megatron-bert",
    "mpnet",
)

UNSUPPORTED: dict[str, str] = {
    "bd3lm": "BD3-LM is block-autoregressive, not a full-sequence denoiser",
    "llada": "LLaDA has no adapter yet (an 8B AutoModel with mask id 126336 inside the vocabulary)",
    "dream": "Dream has no adapter yet (shifted logits: the logit at i predicts token i+1)",
    "sedd": "SEDD's DiT (scores, not p(x_1 | x_t)) has no adapter yet",
    "fsdfm": "FS-DFM's released DiT has no adapter yet (this project's own network imports "
    "with --layout tsdfm)",
}


def family(name: str) -> Family:
    """The family called ``name`` (a ``--teacher-format`` value), or a one-line error."""
    if name not in FAMILIES:
        raise CheckpointError(f"unknown teacher format {name!r}; use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def auto_map_classes(raw: dict) -> dict[str, str]:
    """config.json's ``auto_map`` (Auto class → ``module.Class``), {} when it has none."""
    auto = raw.get("auto_map")
    return {str(k): str(v) for k, v in auto.items()} if isinstance(auto, dict) else {}


def detect(raw: dict, where: str) -> Family:
    """The family of a checkpoint whose config.json is ``raw`` (see the module docstring)."""
    if raw.get("format") == "tsdfm-checkpoint":
        return FAMILIES["tsdfm"]
    model_type = str(raw.get("model_type", "")).lower()
    classes = " ".join(auto_map_classes(raw).values()).lower()
    for name, why in UNSUPPORTED.items():
        if model_type == name or f".{name}" in classes:
            raise CheckpointError(f"{where}: {why}; see docs/teachers.md for the families")
    for name in ("mdlm", "duo"):
        if model_type == name or f".{name}" in classes:
            return FAMILIES[name]
    architectures = [str(a) for a in raw.get("architectures") or []]
    if model_type in MASKED_LM_TYPES or any(a.endswith("ForMaskedLM") for a in architectures):
        return FAMILIES["masked-lm"]
    raise CheckpointError(
        f"{where}: cannot tell the teacher family from config.json (model_type "
        f"{model_type or 'missing'}); pass --teacher-format with one of {', '.join(FAMILIES)}"
    )
