"""Pipeline settings shared by the pipeline tests (test_pipeline, test_slurm_pipeline)."""

#: Settings that keep the short chain quick on 512² images.
FAST = """
[align-movies]
max-iterations = 5

[find-ctf]
box = 256
max-resolution = 8.0
min-defocus = 8000.0
max-defocus = 25000.0
defocus-step = 500.0
"""
