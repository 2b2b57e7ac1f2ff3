"""The data commands' work, one module a command (`trainer/data_cli.py` composes them)."""
