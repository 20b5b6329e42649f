"""Converters from other projects' released weights to model folders of this package.

Every converter reads its input with :mod:`dalle.convert.safe_pickle` (no code from the
file runs) and writes safetensors and a JSON config, plus ``converted.json`` saying
what the folder was converted from (``dalle info --model`` shows it).
"""
