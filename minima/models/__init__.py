"""Model dirs: the one loader (family, dtype, device, safetensors only) and parameter / FLOP counts.

May import minima.core and minima.data.
"""
