"""`execute(plan) -> Result`: build the planned tiers, smoke-test them, fall back on OOM, and the
orchestration of probe → plan → execute → store (`tune`, `load`).

build.py loads one tier and applies its memory options, smoke.py runs the short test, ladder.py
walks the ladder, recover.py survives OOM after tuning, tuning.py and tuning_entry.py decide what
is remembered, loader.py is `autoquant.load()`, memory.py reads and frees device memory.
"""
