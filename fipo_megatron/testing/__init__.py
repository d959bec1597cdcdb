"""Test support: multi-process launch on CPU (gloo) and tiny local models. Not used in production."""
