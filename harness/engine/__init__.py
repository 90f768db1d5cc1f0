"""The execution engine: capture block inputs, stream blocks through the compute device, collect the
statistics methods declare, store them per block, and compress block by block.

Modules, in the order a cell uses them: :mod:`capture` (every block's inputs and arguments, running one block),
:mod:`collect` (hooks feeding declared statistics, one per distinct input), :mod:`stream` (the
block-by-block pass, dense and compressed streams), :mod:`store` (per-block safetensors with
checksums), :mod:`statistics` (a session's stored statistics, computed on demand), :mod:`compress`
(allocate, factorize on the device, swap modules).
"""
