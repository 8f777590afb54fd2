"""personascope: find, watch and steer the character of language models from the inside."""

from personascope.errors import PersonascopeError
from personascope.generation import Generation, generate
from personascope.models import Model, load_model
from personascope.pipelines.monitor import monitor_turns, project
from personascope.residual import Ablate, Add, Cap, Steering, capture, intervene, steering, token_roles
from personascope.vectors import PersonaVector

__version__ = "0.1.0"

__all__ = [
    "Ablate",
    "Add",
    "Cap",
    "Generation",
    "Model",
    "PersonaVector",
    "PersonascopeError",
    "Steering",
    "capture",
    "generate",
    "intervene",
    "load_model",
    "monitor_turns",
    "project",
    "steering",
    "token_roles",
]
