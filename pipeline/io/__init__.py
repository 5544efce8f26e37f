"""Where data lives: storage (local paths and ``s3://``, through one ``pyarrow.fs`` API) and input
pre-flight (footers of every shard checked against the feature spec before any work starts).

May import ``pipeline.errors`` and ``schemas``; never the model core, the Ray layers or ``jobs``. Ray
itself is imported only inside the function that builds a Ray Dataset over the checked files.
"""
