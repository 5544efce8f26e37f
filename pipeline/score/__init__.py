"""Scoring on Ray: the batch scorer that Ray Data's scoring tasks (actors on GPUs) run, the Ray Data pipeline
(read -> map_batches -> write), reconciliation and atomic publish of a partition, and the reader of
published partitions.

May import Ray, the model core (``pipeline.core``), ``pipeline.io``, ``pipeline.errors``,
``pipeline.runtime`` and ``schemas``; never ``pipeline.train`` or ``jobs``.
"""
