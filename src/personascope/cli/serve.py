"""`personascope serve` (placeholder, being written)."""


def serve() -> None:
    """OpenAI-compatible server (being written)."""
    raise NotImplementedError
