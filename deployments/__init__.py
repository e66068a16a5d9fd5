"""How the importer is deployed: the local stack runner and what prefect.yaml needs."""
