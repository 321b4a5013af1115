"""Console entry points with upstream's names (``dattri_retrain`` ...)."""
