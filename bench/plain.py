"""Plain sampling against itself: the noise floor every other ratio should be read against."""
from .harness import Case

CASES = [
    Case("plain vs plain (noise floor)", "sd15", lambda model, clip, vae: model.clone(), memory_clones=10),
]
