"""`make bench`: time and memory ratios of StyleKit patches against plain sampling, in one run.

Each module here (one per method family) lists `CASES`; scripts/bench.py runs them all and writes
a markdown table and a PNG bar chart under out/bench/.
"""
