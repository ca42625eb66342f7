"""01_vector: the steering vector, and adding it to a model.

- :mod:`.value`: :class:`~.value.SteeringVector`, the value object (directions, dose unit, file format);
- :mod:`.extract`: reading it from a model (hidden states at the assistant tag, mean difference);
- :mod:`.steering`: the :class:`~.steering.Steering` spec and the hook context managers;
- :mod:`.step`: the 01_vector step (``run_step(ctx) -> VectorResult``); :mod:`.figures`: its plots.
"""
