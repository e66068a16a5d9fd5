"""The programs that run on the worker VM: ``stream`` brings an object onto it, ``upload`` sends a
file from it into an object, ``guest`` reads the operating system a written disk holds.

The orchestrator ships this package to the worker as one zip archive (:mod:`diskimport.worker_vm.agent_archive`)
and runs it with the worker's ``python3``: ``python3 agent.pyz stream|upload|guest CONFIG``. So every module
here uses the standard library only, runs on Python 3.6 or newer, and imports its siblings
relatively (the package is ``agent`` inside the archive).
"""
