"""Process entry of every actor: `python -m inferencecenter.actors.run inferencecenter-NAME`."""

from .actor import actor_entry

if __name__ == "__main__":
    actor_entry()
