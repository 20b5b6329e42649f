import os

# Before torch is imported anywhere: see dalle/__init__.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
