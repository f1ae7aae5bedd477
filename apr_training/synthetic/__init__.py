"""Synthetic multi-scene benchmark: procedural indoor scenes, a numpy ray caster, trajectories and writers."""
