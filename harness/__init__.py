"""svdbench engine: load, calibrate, collect statistics, run a method, evaluate, record, report."""
