"""The model core: the VAE, its likelihood families, the table codec and statistics, the scoring
estimators, the training step and plain loop, the independent-columns baseline, the model artifact.

Pure torch, numpy and pyarrow. May import ``pipeline.errors``, ``pipeline.io.storage`` (the artifact is
read and written through it) and ``schemas``; never Ray, never ``pipeline.train``, ``pipeline.score`` or
``jobs``. Everything here runs in one process, on a laptop, a Ray worker or a notebook alike.
"""
