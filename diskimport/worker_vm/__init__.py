"""The orchestrator's side of the worker VM: the SSH session, argument lists, qemu-img,
the transfer and the slice writer, the export's upload, iSCSI, and the agent's archive."""
