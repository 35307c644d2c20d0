"""The project directory tree, exactly as cisTEM lays it out (SPEC §2)."""

from __future__ import annotations

from pathlib import Path

#: Every folder a new project has, in the seed's order.
PROJECT_TREE: tuple[str, ...] = (
    "Assets/ClassAverages",
    "Assets/CTF",
    "Assets/Images",
    "Assets/Images/Scaled",
    "Assets/Images/Spectra",
    "Assets/Movies",
    "Assets/Parameters",
    "Assets/ParticlePosition",
    "Assets/ParticleStacks",
    "Assets/Volumes",
    "Assets/Volumes/OrthViews",
    "Scratch/AutoRefine3D",
    "Scratch/ManualRefine3D",
    "Scratch/Refine2DScratch/Startup",
)


def create_tree(root: Path) -> None:
    """Create the project folders under ``root`` (which must not hold a project yet)."""
    for rel in PROJECT_TREE:
        (root / rel).mkdir(parents=True, exist_ok=True)


def missing_folders(root: Path) -> list[str]:
    """Folders of :data:`PROJECT_TREE` that are absent under ``root``."""
    return [rel for rel in PROJECT_TREE if not (root / rel).is_dir()]
