"""The HDF5 input cache: model-ready 16 kHz mono waveforms, the utterance table and the config.

Layout (schema 2)::

    /                      attrs: sertk_schema, sertk_complete, config (JSON), summary (JSON),
                           content_digest (see :mod:`ser_toolkit.cache.identity`)
    /audio                 all waveforms end to end, one 1-D array (float32 or int16), chunked
                           with an HDF5 fletcher32 checksum per chunk
    /utterances/<column>   one 1-D dataset per column: id, path, emotion, emotion_index,
                           speaker, gender, corpus, extra (JSON), offset, length,
                           fingerprint, clipped, audio_digest

One array with an offset/length table makes a random read one or two chunk
reads (see docs/benchmarks.md). Build with :func:`ser_toolkit.cache.build.build_cache`,
read with :class:`ser_toolkit.cache.reader.CacheReader`; docs/cache.md describes
what is hashed, when a cache is rebuilt and what is refused.
"""

SCHEMA_VERSION = 2
