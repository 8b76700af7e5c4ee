"""Recipes: one short ``run(cfg)`` per job, composing the library; no loops or logic of their own."""
