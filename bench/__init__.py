"""rtv-db benchmarks: the price of isolation against hand-written SQL, and how it scales.

Run ``python -m bench`` (or ``make bench``); ``--smoke`` runs tiny sizes in well under a minute.
Results go to ``docs/benchmarks/`` (results.md, results.json, results.png, plans.md).
"""
