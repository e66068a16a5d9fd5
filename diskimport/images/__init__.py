"""What an upload is: image formats and their hostile-image checks, compressed and packed
uploads, machine descriptors (OVA, OVF, manifests), and the written disk's own check."""
