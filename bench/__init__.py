"""Benchmarks (`make bench`): JSON results in bench/results/ beside a short table.

Every figure is quoted as a ratio to a baseline measured in the same run,
because this machine is shared and absolute numbers are noisy.
"""
