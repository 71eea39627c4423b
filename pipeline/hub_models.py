"""The project's models as huggingface_hub expects them: ``from_pretrained``, ``save_pretrained``
and ``push_to_hub`` (``PyTorchModelHubMixin``) on :class:`FlowModel` and :class:`CompassModel`.

They are ``tsdfm.models.flow_model``'s classes with the mixin added; a loaded model is one of
these and works wherever the plain one does (``isinstance(m, flow_model.FlowModel)``). The files
are a checkpoint folder as ``tsdfm.models.checkpoint`` writes it (config.json in this project's
schema, model.safetensors, tokenizer.json, the data file config.json names): loading goes
through ``load_checkpoint`` (pickles refused, the tokenizer checked against the vocabulary, a
checkpoint of another role refused), saving through ``save_checkpoint``, so a saved model's
identity is that of the checkpoint it came from. A loaded model keeps its tokenizer
(``model.tokenizer``) and data files (``model.checkpoint_files``) to save them along.
``push_to_hub`` publishes through the project's flow (:func:`tsdfm.pipeline.hub.publish`: pull
request → merge → tag ``vN``, the generated model card), so ``from_pretrained(repo_id,
revision="v1")`` reads it back.

These live in the pipeline layer, not beside the networks, because they load and publish: the
model layer imports neither the checkpoint loader nor the Hub publisher (tests/test_layers.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin

from tsdfm.models import flow_model
from tsdfm.models.checkpoint import load_checkpoint, save_checkpoint
from tsdfm.models.errors import CheckpointError
from tsdfm.models.refs import parse_hub_ref
from tsdfm.models.roles import registered_roles, role_class
from tsdfm.pipeline.hub import push_to_hub as publish_checkpoint
from tsdfm.pipeline.hub import revision_spec


class HubModelMixin(
    PyTorchModelHubMixin,
    library_name="tsdfm-pipeline",
    tags=["tsdfm", "discrete-flow-matching"],
):
    """``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` (module docstring)."""

    tokenizer = None  # a tokenizers.Tokenizer; a checkpoint carries one
    checkpoint_files: dict[str, bytes] | None = None  # name → bytes of its data files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, revision=None, **kwargs):
        """The model of a checkpoint folder or Hub repo (``org/name`` with ``revision``, or
        ``org/name@revision`` as everywhere in this project); ``map_location`` (default
        "cpu") is where the weights go. In eval mode, with its tokenizer and data files."""
        spec = str(pretrained_model_name_or_path)
        ref = None if Path(spec).expanduser().exists() else parse_hub_ref(spec)
        if ref is not None and ref.revision is not None:
            if revision is not None:
                raise CheckpointError(
                    f"{spec} names its revision and revision={revision!r} names another; "
                    "pass one of them"
                )
            spec, revision = ref.repo_id, ref.revision
        return super().from_pretrained(spec, revision=revision, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        map_location: str | torch.device = "cpu",
        **unused,
    ):
        spec = revision_spec(model_id, revision, CheckpointError)
        roles = tuple(r for r in registered_roles() if issubclass(cls, role_class(r)))
        ckpt = load_checkpoint(spec, map_location, role=roles)
        with torch.random.fork_rng(devices=[]):  # the weights are copied in next
            model = cls(ckpt.config)
        model.load_state_dict(ckpt.model.state_dict(), strict=True)
        model.to(map_location).eval()
        model.tokenizer = ckpt.tokenizer
        data = ckpt.data_file()
        name = ckpt.config.data.get("language")
        found = data is not None and data.is_file()  # a compass may name one it lacks
        model.checkpoint_files = {name: data.read_bytes()} if found else {}
        return model

    def _save_pretrained(self, save_directory) -> None:
        if self.tokenizer is None:
            raise CheckpointError(
                f"this {type(self).__name__} has no tokenizer, and a checkpoint carries its "
                "tokenizer.json: set model.tokenizer (a tokenizers.Tokenizer) first, or load "
                "the model with from_pretrained"
            )
        save_checkpoint(save_directory, self, self.tokenizer, self.checkpoint_files or {})

    def push_to_hub(self, repo_id: str, *, config=None, model_card_kwargs=None, **publish):
        """Publish this model to the model repo ``repo_id`` as the next version ``vN``.

        Saves it (:meth:`save_pretrained`) into a temporary folder and publishes that with
        :func:`tsdfm.pipeline.hub.push_to_hub` (``publish``'s keywords: ``private``, ``token``,
        ``version``, ``license``, ``log``, …); returns its ``PublishResult`` (``.version``:
        the tag to pass as ``revision``). ``config`` and ``model_card_kwargs`` of the
        huggingface_hub signature are not used: config.json and the card are the project's.
        """
        with tempfile.TemporaryDirectory() as tmp:
            folder = f"{tmp}/checkpoint"
            self.save_pretrained(folder)
            return publish_checkpoint(folder, repo_id, **publish)


class FlowModel(flow_model.FlowModel, HubModelMixin):
    """A teacher or student (``tsdfm.models.flow_model.FlowModel``) with the Hub mixin."""


class CompassModel(flow_model.CompassModel, HubModelMixin):
    """A compass (``tsdfm.models.flow_model.CompassModel``) with the Hub mixin."""


__all__ = ["CompassModel", "FlowModel", "HubModelMixin"]
