"""The plain-Python core of the importer: qemu-img, image inspection, OCI operations, the
worker session. Nothing here imports Prefect, so each part can be read and tested alone."""
