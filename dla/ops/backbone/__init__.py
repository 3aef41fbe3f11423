"""The backbone stage: one state read out per query (SPEC §3.1).

It is the `single` policy (the plain backbone: linear attention, Mamba-2's SSD, DeltaNet, Gated
DeltaNet) and DLA's open block, which restarts at every boundary (`reset`). `naive.py` is its
token-by-token reference.
"""
