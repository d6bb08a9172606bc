"""Clients for the inference server's HTTP API (Python in `clients.python`; JavaScript in `clients/js`)."""
