"""The HDF5 input cache: model-ready 16 kHz mono waveforms, the utterance table and the config.

Layout (schema 2)::

    /                      attrs: sertk_schema, sertk_complete, config (JSON), summary (JSON),
                           content_digest (see :mod:`ser_toolkit.cache.identity`)
    /audio                 all waveforms end to end, one contiguous 1-D array (float32 or int16)
    /utterances/<column>   one 1-D dataset per column: id, path, emotion, emotion_index,
                           speaker, gender, corpus, extra (JSON), offset, length,
                           fingerprint, clipped, audio_digest (identity), crc32 (integrity)

One contiguous array with an offset/length table makes a random read one
slice, checked against the utterance's CRC-32 (see docs/benchmarks.md). Build with :func:`ser_toolkit.cache.build.build_cache`,
read with :class:`ser_toolkit.cache.reader.CacheReader`; docs/cache.md describes
what is hashed, when a cache is rebuilt and what is refused.
"""

SCHEMA_VERSION = 2
