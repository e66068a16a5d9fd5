"""``python3 agent.pyz stream|upload|guest|adapt|sync|manifest CONFIG``: one program of the
package, given its JSON configuration file (:mod:`.stream`, :mod:`.upload` say what it holds);
``confine ROOT PROGRAM...`` is the one that takes its arguments as they are (:mod:`.confine`).

Only the program asked for is imported: the upload loads none of the decoders.
"""

import importlib
import sys

PROGRAMS = {"stream": "fetch an object onto this machine, serve it over NBD or decode it onto a device",
            "upload": "upload a file as the parts of a multipart upload",
            "guest": "read the operating system a written disk holds (read-only, in a mount namespace of its own)",
            "adapt": "change a written Linux guest so it boots and answers on OCI (in a mount namespace of its own)",
            "confine": "run a guest's own program inside its root, without the powers that lead out of it",
            "sync": "serve a device over NBD for writing, writing only the blocks that differ",
            "manifest": "hash a device's 64 KiB blocks into a block manifest (all, or the ones listed)"}
TAKES_ARGUMENTS = ("confine",)


def usage():
    return "usage: python3 agent.pyz PROGRAM CONFIG\n\n" + "".join(
        "  %-8s %s\n" % (name, what) for name, what in sorted(PROGRAMS.items()))


def main(argv):
    """Run the program ``argv[0]`` names with the configuration file ``argv[1]``; its exit status."""
    if argv in (["-h"], ["--help"]):
        sys.stdout.write(usage())
        return 0
    if argv and argv[0] in TAKES_ARGUMENTS:
        return importlib.import_module("." + argv[0], __package__).main_argv(argv[1:])
    if len(argv) != 2 or argv[0] not in PROGRAMS:
        sys.stderr.write(usage())
        return 2
    program = importlib.import_module("." + argv[0], __package__)
    return program.main(argv[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
