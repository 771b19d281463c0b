"""The demo model's trainer: synthetic data, the VAE stage, the transformer stage, EMA, resume, export.

``flashportrait train CONFIG`` runs it (see :mod:`.recipe` for the config file and the stages).
"""

# The recipe's stages, in order (here, not in recipe.py, so the CLI can list them without importing torch).
STAGES = ("data", "vae", "dit", "export", "evaluate")
