"""A local emulator of the OCI services this project uses.

The real ``oci`` SDK and CLI talk to it unchanged (``service_endpoint=`` / ``--endpoint``);
compute instances are real ``sshd`` processes on loopback addresses and block volumes
are sparse files. See README.md, "The local OCI".
"""
