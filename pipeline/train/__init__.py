"""Training on Ray: the streaming statistics pass, the id-hash train/validation split, the Ray Train
worker loop and its checkpoints, and the training run that writes the model artifact.

May import Ray, the model core (``pipeline.core``), ``pipeline.io``, ``pipeline.errors``,
``pipeline.runtime`` and ``schemas``; never ``pipeline.score`` or ``jobs``.
"""
