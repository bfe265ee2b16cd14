"""Coordinator side: the ServerApp, ``python -m server.run``, certificates, the federated demo."""
