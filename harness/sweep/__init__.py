"""Sweeps: a YAML grid of models x methods x ratios x seeds, run cell by cell, resumable.

``spec`` parses the YAML, ``plan`` expands it into cells with run keys, ``worker`` runs one group
of cells on one loaded model, ``executors`` decide where groups run, ``run`` ties them together.
``status`` reports each cell as pending, running, done or failed, from the records, the workers'
running ``markers``, the scheduler jobs of the ``submissions`` and their states (``slurm``).
"""

from __future__ import annotations

from harness.sweep.spec import SpecError, SweepSpec, load_spec, parse_spec

__all__ = ["SpecError", "SweepSpec", "load_spec", "parse_spec"]
