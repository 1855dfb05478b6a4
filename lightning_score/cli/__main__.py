"""``python -m lightning_score.cli``: the ``lightning-score`` command."""

from lightning_score.cli.command import main

if __name__ == "__main__":
    main()
