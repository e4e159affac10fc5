"""Training: data pipeline (``data``), the loop (``loop``), run directories (``runs``)."""
