"""Study presets: demo.toml and reference.toml (read with ``ser_toolkit.study.load_config``)."""
