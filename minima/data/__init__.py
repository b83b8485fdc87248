"""Text and token data: tokenizers and the vocab merge, chat formats, TFRecord records, packing, demo corpus.

May import minima.core only.
"""
