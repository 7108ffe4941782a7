"""The supervisor, its command line and configuration."""
