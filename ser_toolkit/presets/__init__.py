"""Study presets: demo.toml, reference.toml and reference-cpu.toml (read with ``ser_toolkit.study.load_config``)."""
