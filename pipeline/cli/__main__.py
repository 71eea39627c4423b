"""``python -m tsdfm.pipeline.cli``: the same as the ``tsdfm-pipeline`` script."""

from tsdfm.pipeline.cli import main

main()
