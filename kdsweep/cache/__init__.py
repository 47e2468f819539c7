"""The teacher-logit cache: top-k teacher logits in HDF5, exact at any KD temperature in a declared range.

The modules, from the file format outwards (``docs/cache-format.md`` documents the files):

- :mod:`kdsweep.cache.format`: what a file stores and the maths of it: the temperature grid,
  the tail log-normaliser and its coding, the top-k summary of a position's logits, and the
  probabilities read back from it (pure functions, no I/O);
- :mod:`kdsweep.cache.fingerprint`: what a cache was made from, and how two such records differ;
- :mod:`kdsweep.cache.writer`: running the teacher and writing a file, resumably; merging shards;
- :mod:`kdsweep.cache.reader`: :class:`~kdsweep.cache.reader.TeacherLogitCache`, random access
  by sequence for training and evaluation;
- :mod:`kdsweep.cache.verify`: ``kdsweep cache verify`` and ``inspect``;
- :mod:`kdsweep.cache.cli`: the ``kdsweep cache`` commands.
"""
