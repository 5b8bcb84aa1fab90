"""``python -m headstart`` (also what ``accelerate launch -m headstart`` runs)."""

from headstart.cli import run

if __name__ == "__main__":
    run()
