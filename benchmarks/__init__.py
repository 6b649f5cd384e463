"""Benchmark scripts (run as ``python benchmarks/<name>.py``); the names they share live here."""

#: ``--precision`` of the timing benchmarks: the network runs in fp32, or under autocast to bf16 / fp16 (data
#: consistency stays fp32). ``fp32`` plays the part of accelerate's ``no`` (:data:`utils.recon_options.PRECISIONS`).
NETWORK_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
