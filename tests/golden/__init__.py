"""Golden score matrices of every attributor (see ``cases.py`` and ``make_golden.py``)."""
