"""Networks and math of discrete flow matching: importable without Ray.

Submodules: ``path`` (schedulers, mixture path), ``rng`` (counter-based randomness),
``solver`` (jump rule and samplers), ``backbone`` (time/step-conditioned transformer),
``flow_model`` (teacher/student wrapper), ``checkpoint`` (safetensors I/O), ``losses``,
``data`` (synthetic language, corpora), ``train`` and ``eval``.
"""

__version__ = "0.1.0"
