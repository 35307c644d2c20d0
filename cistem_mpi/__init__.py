"""cistem-mpi: cisTEM's single-particle cryo-EM pipeline as an MPI application."""

__version__ = "0.1.0"
