"""01_vector: the steering vector, and adding it to a model.

- :mod:`.value`: :class:`~.value.SteeringVector`, the value object (directions, dose unit, file format);
- :mod:`.extract`: reading it from a model (hidden states at the assistant tag, mean difference);
- :mod:`.steering`: the :class:`~.steering.Steering` spec and the hook context managers;
- :mod:`.step`: the 01_vector step (``run_stage(ctx) -> VectorResult``); :mod:`.figures`: its plots.
"""

from .extract import capture_layers, extract_vector, last_token_states, load_contexts, separation
from .figures import figures
from .step import VectorResult, run_stage
from .steering import (POSITIONS, SLOT_ATTR, PositionsNotSet, Steering, check_vector_matches, steer, steering,
                       steering_slots)
from .value import SteeringVector, persona_hash

__all__ = ["capture_layers", "extract_vector", "last_token_states", "load_contexts", "separation", "figures",
           "VectorResult", "run_stage", "POSITIONS", "SLOT_ATTR", "PositionsNotSet", "Steering", "check_vector_matches",
           "steer", "steering", "steering_slots", "SteeringVector", "persona_hash"]
