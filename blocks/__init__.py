"""Prefect blocks: OCI credentials, worker shape and import settings."""
