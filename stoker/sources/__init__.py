"""One module per signal source, each producing typed samples; no Prometheus code here."""
