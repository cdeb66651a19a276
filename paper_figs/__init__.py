"""Paper figures and tables from sweep records: `python -m paper_figs RESULTS... --out DIR`.

Each figure is a function in `saliency.plotting` reading only result records (and the score files
a sweep saved); this package is the command line that runs them. See paper_figs/README.md.
"""
