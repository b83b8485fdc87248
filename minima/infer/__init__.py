"""Generation: the batched engine (:mod:`.engine`), the OpenAI-compatible server (:mod:`.serve`), the
terminal chat (:mod:`.chat`) and a client for OpenAI-compatible endpoints (:mod:`.api_client`).

May import minima.core, minima.data and minima.models.
"""
