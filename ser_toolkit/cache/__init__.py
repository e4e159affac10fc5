"""The HDF5 input cache: model-ready 16 kHz mono waveforms, the utterance table and the config.

Layout (schema 1)::

    /                      attrs: sertk_schema, sertk_complete, config (JSON), summary (JSON)
    /audio                 all waveforms end to end, one contiguous 1-D array (float32 or int16)
    /utterances/<column>   one 1-D dataset per column: id, path, emotion, emotion_index,
                           speaker, gender, corpus, extra (JSON), offset, length,
                           fingerprint, clipped

One contiguous array with an offset/length table makes a random read one
``pread`` (see docs/benchmarks.md for the comparison with one HDF5 dataset per
utterance). Build with :func:`ser_toolkit.cache.build.build_cache`, read with
:class:`ser_toolkit.cache.reader.CacheReader`.
"""

SCHEMA_VERSION = 1
