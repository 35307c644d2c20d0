"""cistem-mpi: cisTEM's single-particle cryo-EM pipeline as an MPI application."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``cistem_mpi.api`` on first use (``import cistem_mpi`` stays light: the CLI imports only what it runs)."""
    if name == "api":
        import importlib

        return importlib.import_module("cistem_mpi.api")
    raise AttributeError(f"module 'cistem_mpi' has no attribute {name!r}")
