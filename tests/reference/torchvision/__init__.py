"""Stand-in for the few torchvision functions segment-anything imports (tests only).

segment-anything is the reference for parity tests; torchvision has no CPU build here.
"""
