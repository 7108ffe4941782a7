"""The daemon's actors: one OS process each (gateway, auth, sessions, engine, monitor)."""
