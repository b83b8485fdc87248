"""Inference: the batched generation engine, the OpenAI-compatible server, terminal chat, an API client.

May import minima.core, minima.data and minima.models.
"""
