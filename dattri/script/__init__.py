"""Console scripts with upstream dattri's names (``dattri_retrain``, ``dattri_retrain_nanogpt``)."""
