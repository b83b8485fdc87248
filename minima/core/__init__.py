"""Foundations every other package builds on: config, presets, artifacts, errors, logs, io, registry.

Imports nothing else from minima.
"""
