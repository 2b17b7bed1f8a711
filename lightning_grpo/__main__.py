"""`python -m lightning_grpo` is the `lightning-grpo` command."""

from lightning_grpo.cli import main

if __name__ == "__main__":
    main()
